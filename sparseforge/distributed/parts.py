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

An N-D neighbourhood becomes a ``NeighborhoodPart``: the grid's own rule at the part's
offsets on it (NATTEN's windows clamp at the whole grid's borders, which no part holds).
Score modifiers that read positions move too. The part's ``t - P`` is the whole's ``j -
p`` less a constant ``delta``: ALiBi takes ``offset=delta`` (an integer added before the
product, so the part's scores are the whole's to the bit), a token-offset ``rel_bias``
table is re-indexed by ``delta`` (a gather, so the table's gradient flows back), and a
pair bias takes its slice; a window-offset ``rel_bias`` table (NATTEN's rpb) stays as it
is, read at the grid coordinates of the part's positions moved by the
``NeighborhoodPart``'s offsets (``scores.RelGrid``). A routing node stays as it is: it
is decided on the whole sequence's pooled summaries, and ``part_selection`` cuts that
decision to the part (the buckets the part's rows and keys fall in, their starts moved
onto the part), which the routed kernels then read like one they routed themselves.
``part_pattern`` returns None for a pattern with no form on a part (a token-offset table
too wide once moved), and the caller evaluates it on original positions instead.
"""

from __future__ import annotations

import torch

from ..ir.affine import MAX_CONSTANT, Affine
from ..ir.neighborhood import Neighborhood, NeighborhoodPart
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
from ..ir.scores import MAX_REL_BIAS_WIDTH, Alibi, PairBias, RelBias, Softcap, strip_scores
from ..routing.selection import BlockSelection, bucket_of
from .routing import POOLED_RULES


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
    part = _Part(a, c, n, m, seq_len)
    modifiers = [_move_modifier(node, part) for node in walk(pattern)
                 if isinstance(node, ScoreModifier)]
    mask = _shift(strip_scores(pattern), part)
    return Intersection((mask, *modifiers)) if modifiers else mask


def _move_modifier(node: ScoreModifier, part: _Part) -> ScoreModifier:
    """A score modifier over the part's rows and keys (see the module doc)."""
    if isinstance(node, Softcap):
        return node
    if isinstance(node, Alibi):
        return Alibi(node.slopes, node.offset + part.delta)
    if isinstance(node, PairBias):  # indexed by row, which is the position here
        return PairBias(node.bias4[..., part.a:part.a + part.n, part.c:part.c + part.m])
    if isinstance(node, RelBias) and not node.window_dims:
        return _moved_rel_bias(node, part)
    if isinstance(node, RelBias):  # window offsets: read on the grid, at the part's offsets
        return node               # (the neighbourhood's NeighborhoodPart carries them)
    raise _NoPartForm


def _moved_rel_bias(node: RelBias, part: _Part) -> RelBias:
    """``table[h, clamp(x + delta, -R, R) + R]`` as a table over the part's own offsets
    ``x = t - P`` in ``[-(m - 1), n - 1]``: radius ``R + |delta|`` (beyond it both clamp to
    the same end), or less when the part's offsets never reach that far."""
    r, delta = node.radius, part.delta
    radius = min(r + abs(delta), max(part.m - 1, part.n - 1, 0))
    if 2 * radius + 1 > MAX_REL_BIAS_WIDTH:
        raise _NoPartForm
    x = torch.arange(-radius, radius + 1, device=node.table.device)
    return RelBias(node.table.index_select(1, (x + delta).clamp(-r, r) + r))


def part_selection(selection: BlockSelection, q_start: int, k_start: int, q_len: int,
                   kv_len: int) -> BlockSelection:
    """The whole sequence's ``selection`` seen from the part ``part_pattern`` made for the
    same arguments: the query buckets its rows fall in and the key buckets its keys fall
    in (in every batch row), their starts on the part's own positions (queries ``P``,
    keys clamped to ``[0, kv_len]``), the selected pairs among them. Buckets keep their
    order, so a pair of the part is selected iff the whole's pair is."""
    shift = q_start - (kv_len - q_len)

    def buckets(starts, first: int, last: int) -> tuple[int, int]:
        c = starts.shape[-1] - 1
        ends = torch.tensor([first, last], device=starts.device)
        idx = bucket_of(ends, starts).clamp(0, c - 1)
        return int(idx[:, 0].min()), int(idx[:, 1].max()) + 1

    q0, q1 = buckets(selection.q_starts, q_start, q_start + q_len - 1)
    k0, k1 = buckets(selection.k_starts, k_start, k_start + kv_len - 1)
    return BlockSelection(selection.selected[:, :, q0:q1, k0:k1].contiguous(),
                          selection.q_starts[:, q0:q1 + 1] - shift,
                          (selection.k_starts[:, k0:k1 + 1] - k_start).clamp(0, kv_len),
                          selection.heads)


class _Part:
    """Where a part sits: its query rows ``i`` are positions ``a + i``, its keys ``t``
    positions ``c + t``. A part's own query position (bottom-right, as every call aligns
    them) is ``P = i + m - n``, so the original position is ``P + shift``."""

    def __init__(self, a: int, c: int, n: int, m: int, seq_len: int):
        self.a, self.c, self.n, self.m, self.seq_len = a, c, n, m, seq_len
        self.shift = a - (m - n)
        #: the whole's ``j - p`` less the part's ``t - P``
        self.delta = c - self.shift

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
    if isinstance(node, Neighborhood):  # the grid's rule, at the part's offsets on it
        if s == 0 and c == 0 and part.n == part.m == node.size:
            return node
        return NeighborhoodPart(node, s, c)
    if isinstance(node, (Union, Intersection)):
        return type(node)(tuple(_shift(x, part) for x in node.parts))
    if isinstance(node, POOLED_RULES):  # its decision is cut to the part: part_selection
        return node
    raise _NoPartForm  # anything without a shifted form


def _window(node: Window, part: _Part) -> Pattern:
    """``(j - p) % d == 0`` and ``-left <= (j - p) / d <= right`` with ``j - p = (t - P) +
    delta``."""
    d, delta = node.dilation, part.delta
    low = _affine(-1, 1, delta + node.left * d)    # t - P + delta >= -left * d
    high = _affine(1, -1, node.right * d - delta)  # t - P + delta <= right * d
    if d == 1:
        return Intersection((low, high))
    if delta % d:  # the offset moves the dilation's phase: p % d == j % d as document ids
        return Intersection((part.ids(d, modulo=True), low, high))
    reach = max(abs(delta) // d + node.left + node.right, 1)
    return Intersection((Window(reach, reach, d), low, high))
