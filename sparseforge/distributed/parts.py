"""A pattern seen from one part of the sequence, so the ordinary kernels can run it.

A rank attends a contiguous run of its queries (original positions ``a + i``) to a
contiguous run of keys it holds or received (positions ``c + t``). ``part_pattern``
rewrites the whole sequence's pattern as one over the part's own queries and keys,
exactly, in the alignment every call uses (the part's query position ``P = i + m - n``
for ``n`` queries and ``m`` keys, so ``p = P + a - m + n``): a causal mask becomes a
half-plane ``P - t + const >= 0``, and plain ``causal()`` again on a run against itself,
so the same kernel as one GPU's; sinks and global queries move their edge, windows
their band, documents and mask tables take their slice, and chunks off their grid and
dilated windows off their phase become document ids (``p // size``, ``p % dilation``).
``sf.attention`` then plans that part like any call: closed-form tile bounds, full tiles
without a mask, empty tiles skipped, its own backward.

Some patterns have no such form: N-D neighbourhoods (their windows clamp at the whole
grid's borders, which a part does not hold), routing, and position-dependent score
modifiers (ALiBi, relative-position tables, pair biases). ``part_pattern`` returns None
for them and the caller evaluates them on original positions instead.
"""

from __future__ import annotations

import torch

from ..ir.affine import MAX_CONSTANT, Affine
from ..ir.nodes import (
    Causal,
    Chunks,
    Documents,
    Empty,
    Full,
    GlobalQueries,
    Intersection,
    MaskTable,
    Pattern,
    PerHead,
    ScoreModifier,
    Sinks,
    Union,
    Window,
    walk,
)
from ..ir.scores import Softcap, strip_scores


class _NoPartForm(Exception):
    """A node whose meaning on a part is not a pattern over the part's rows and keys."""


def part_pattern(pattern: Pattern, q_start: int, k_start: int, q_len: int, kv_len: int,
                 seq_len: int) -> Pattern | None:
    """``pattern`` (canonical, for self-attention over ``seq_len`` tokens) restricted to
    queries at positions ``[q_start, q_start + q_len)`` and keys at ``[k_start, k_start +
    kv_len)``, as a pattern over the part's rows and keys; None when it has no such form."""
    try:
        return _part(pattern, q_start, k_start, q_len, kv_len, seq_len)
    except _NoPartForm:
        return None


def _part(pattern, a, c, n, m, seq_len):
    if isinstance(pattern, PerHead):
        return PerHead(tuple(_part(h, a, c, n, m, seq_len) for h in pattern.patterns))
    modifiers = [node for node in walk(pattern) if isinstance(node, ScoreModifier)]
    if any(not isinstance(node, Softcap) for node in modifiers):
        raise _NoPartForm  # ALiBi, rel_bias, pair_bias read positions the part shifts
    mask = _shift(strip_scores(pattern), _Part(a, c, n, m, seq_len))
    return Intersection((mask, *modifiers)) if modifiers else mask


class _Part:
    """Where a part sits: its query rows ``i`` are positions ``a + i``, its keys ``t``
    positions ``c + t``. A part's own query position (bottom-right, as every call aligns
    them) is ``P = i + m - n``, so the original position is ``P + shift``."""

    def __init__(self, a: int, c: int, n: int, m: int, seq_len: int):
        self.a, self.c, self.n, self.m, self.seq_len = a, c, n, m, seq_len
        self.shift = a - (m - n)

    def ids(self, divisor: int, modulo: bool = False) -> Documents:
        """Document ids ``x // divisor`` (or ``x % divisor``) of the part's queries and keys."""
        q, k = torch.arange(self.a, self.a + self.n), torch.arange(self.c, self.c + self.m)
        return Documents(q % divisor, k % divisor) if modulo else Documents(q // divisor, k // divisor)


def _affine(q: int, kv: int, const: int) -> Pattern:
    if abs(const) > MAX_CONSTANT:
        raise _NoPartForm
    return Affine(q, kv, const)


def _shift(node, part: _Part):
    """``node`` at p = P + shift, j = c + t, as a pattern over (P, t)."""
    s, c = part.shift, part.c
    if isinstance(node, (Full, Empty)):
        return node
    if isinstance(node, Causal):  # c + t <= P + s
        return _affine(1, -1, s - c)
    if isinstance(node, Sinks):  # c + t < n_sinks
        return _affine(0, -1, node.n - 1 - c) if node.n > c else Empty()
    if isinstance(node, GlobalQueries):  # P + s < n_global
        return _affine(-1, 0, node.n - 1 - s) if node.n > part.a else Empty()
    if isinstance(node, Affine):
        return _affine(node.q, node.kv, node.const + node.q * s + node.kv * c)
    if isinstance(node, Window):
        return _window(node, part)
    if isinstance(node, Chunks):
        if s == c and s % node.size == 0:  # the same grid of chunks on both sides
            return node
        return part.ids(node.size)
    if isinstance(node, Documents):  # ids by row and key: slices
        a, n = part.a, part.n
        keys = node.ids if node.kv_ids is None else node.kv_ids
        return Documents(node.ids[..., a:a + n], keys[..., c:c + part.m])
    if isinstance(node, MaskTable):
        table = node.table(part.seq_len, part.seq_len)
        return MaskTable(table[..., part.a:part.a + part.n, c:c + part.m])
    if isinstance(node, (Union, Intersection)):
        return type(node)(tuple(_shift(x, part) for x in node.parts))
    raise _NoPartForm  # neighbourhoods, routing, anything without a shifted form


def _window(node: Window, part: _Part) -> Pattern:
    """``(j - p) % d == 0`` and ``-left <= (j - p) / d <= right`` with ``j - p = (t - P) +
    delta``."""
    d, delta = node.dilation, part.c - part.shift
    low = _affine(-1, 1, delta + node.left * d)    # t - P + delta >= -left * d
    high = _affine(1, -1, node.right * d - delta)  # t - P + delta <= right * d
    if d == 1:
        return Intersection((low, high))
    if delta % d:  # the offset moves the dilation's phase: p % d == j % d as document ids
        return Intersection((part.ids(d, modulo=True), low, high))
    reach = max(abs(delta) // d + node.left + node.right, 1)
    return Intersection((Window(reach, reach, d), low, high))
