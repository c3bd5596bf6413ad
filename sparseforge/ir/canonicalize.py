"""Canonicalisation: rewrite a pattern expression into a small, stable normal form.

The expression is loaded into a networkx DAG (equal sub-expressions become one vertex),
and rewritten bottom-up in topological order. The passes are local rules:

* flatten nested unions / intersections, drop duplicates, sort children by ``repr``
  (so equal patterns render byte-identical kernels);
* ``full`` is dropped inside ``&`` and absorbs ``|``; ``empty`` does the opposite;
* windows with the same dilation merge: ``&`` intersects their ranges, ``|`` joins
  ranges that overlap or touch; ``causal & window`` clips the window's right side to 0;
  a window with ``right == 0`` inside a union with ``causal`` is absorbed;
* ``sinks``/``global_queries`` merge by max (``|``) or min (``&``); ``sinks(0)`` is empty
  (``global_queries(0)`` is not: with Lq > Lkv the first queries have p < 0);
* ``chunks(a) & chunks(b)`` with ``b % a == 0`` is ``chunks(a)`` (and dually for ``|``);
* ``per_head`` of identical patterns is that pattern;
* score modifiers (``softcap``, ``alibi``, ``rel_bias``) stay operands of the
  intersection they were joined by (they allow every pair, so no rule touches them);
* ``affine`` half-planes are reduced by the gcd of their coefficients; those of one
  variable are ``sinks``, ``global_queries``, ``full`` or ``empty`` where they fit; unit bands (bounds
  on ``j - p``: ``causal``, undilated windows, ``affine(±1, ∓1, c)``) meet into one
  window where the result holds offset 0, and ``affine(1, -1, 0)`` is ``causal``;
* ``top_left`` of a mask that does not read the query position is that mask, and
  ``top_left`` never nests.
"""

from __future__ import annotations

import math

import networkx as nx

from .affine import Affine, TopLeft, reads_query_position
from .nodes import (
    Causal,
    Chunks,
    Empty,
    Full,
    GlobalQueries,
    Intersection,
    Pattern,
    PerHead,
    Sinks,
    Union,
    Window,
)
from .scores import score_terms


def expression_dag(pattern: Pattern) -> nx.DiGraph:
    """The expression as a DAG: an edge parent -> child; shared sub-expressions merge."""
    g = nx.DiGraph()
    stack = [pattern]
    while stack:
        node = stack.pop()
        if node in g and g.out_degree(node) == len(set(node.children)):
            continue
        g.add_node(node)
        for c in node.children:
            g.add_edge(node, c)
            stack.append(c)
    return g


def canonicalize(pattern: Pattern) -> Pattern:
    """Return the canonical form of ``pattern`` (a pure function; input is not changed)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern={type(pattern).__name__}: expected a sparseforge pattern")
    dag = expression_dag(pattern)
    rewritten: dict[Pattern, Pattern] = {}
    for node in reversed(list(nx.topological_sort(dag))):
        kids = tuple(rewritten[c] for c in node.children)
        rewritten[node] = _rewrite(node, kids)
    return rewritten[pattern]


def is_empty(pattern: Pattern) -> bool:
    """True when canonicalisation proves that no pair can ever interact."""
    c = canonicalize(pattern)
    if isinstance(c, PerHead):
        return all(isinstance(p, Empty) for p in c.patterns)
    return isinstance(c, Empty)


def _rewrite(node: Pattern, kids: tuple[Pattern, ...]) -> Pattern:
    if isinstance(node, Sinks) and node.n == 0:
        return Empty()
    if isinstance(node, Affine):
        return _affine(node)
    if isinstance(node, TopLeft):
        inner = kids[0].pattern if isinstance(kids[0], TopLeft) else kids[0]
        return TopLeft(inner) if reads_query_position(inner) else inner
    if isinstance(node, Union):
        return _union(kids)
    if isinstance(node, Intersection):
        return _intersection(kids)
    if isinstance(node, PerHead):
        return kids[0] if all(k == kids[0] for k in kids) else PerHead(kids)
    return node


def _flatten(kind: type, kids: tuple[Pattern, ...]) -> list[Pattern]:
    out: list[Pattern] = []
    for k in kids:
        out.extend(k.parts if isinstance(k, kind) else (k,))
    return out


def _finish(kind: type, parts: list[Pattern], identity: Pattern) -> Pattern:
    unique = sorted(set(parts), key=repr)
    if not unique:
        return identity
    if len(unique) == 1:
        return unique[0]
    return kind(tuple(unique))


def _union(kids: tuple[Pattern, ...]) -> Pattern:
    parts = [p for p in _flatten(Union, kids) if not isinstance(p, Empty)]
    if any(isinstance(p, Full) for p in parts):
        return Full()
    parts = _merge_counts(parts, Sinks, max)
    parts = _merge_counts(parts, GlobalQueries, max)
    parts = _merge_chunks(parts, union=True)
    parts = _join_half_bands(parts)
    windows = _join_windows([p for p in parts if isinstance(p, Window)])
    if any(isinstance(p, Causal) for p in parts):
        windows = [w for w in windows if w.right != 0]
    parts = [p for p in parts if not isinstance(p, Window)] + windows
    return _finish(Union, parts, Empty())


def _intersection(kids: tuple[Pattern, ...]) -> Pattern:
    parts = [p for p in _flatten(Intersection, kids) if not isinstance(p, Full)]
    if any(isinstance(p, Empty) for p in parts):
        return Empty()
    parts = _merge_counts(parts, Sinks, min)
    parts = _merge_counts(parts, GlobalQueries, min)
    parts = _merge_chunks(parts, union=False)
    parts = _meet_bands(parts)
    if any(isinstance(p, Empty) for p in parts):
        return Empty()
    windows = [p for p in parts if isinstance(p, Window)]
    has_causal = any(isinstance(p, Causal) for p in parts)
    if has_causal and windows:
        windows = [Window(w.left, 0, w.dilation) for w in windows]
        parts = [p for p in parts if not isinstance(p, Causal)]
    windows = _meet_windows(windows)
    parts = [p for p in parts if not isinstance(p, Window)] + windows
    out = _finish(Intersection, parts, Full())
    score_terms(out)  # at most one modifier of each kind
    return out


def _merge_counts(parts: list[Pattern], kind: type, pick) -> list[Pattern]:
    same = [p.n for p in parts if isinstance(p, kind)]
    if len(same) <= 1:
        return parts
    return [p for p in parts if not isinstance(p, kind)] + [kind(pick(same))]


def _merge_chunks(parts: list[Pattern], union: bool) -> list[Pattern]:
    sizes = sorted({p.size for p in parts if isinstance(p, Chunks)})
    kept: list[int] = []
    # In a union the coarser chunking absorbs a finer one that divides it; in an
    # intersection the finer one wins.
    for s in (reversed(sizes) if union else sizes):
        if not any((k % s == 0) if union else (s % k == 0) for k in kept):
            kept.append(s)
    return [p for p in parts if not isinstance(p, Chunks)] + [Chunks(s) for s in kept]


def _join_windows(windows: list[Window]) -> list[Window]:
    """Union of windows: join same-dilation windows whose offset ranges overlap or touch."""
    out: list[Window] = []
    for d in sorted({w.dilation for w in windows}):
        # every window holds offset 0, so same-dilation ranges always overlap: the hull
        ws = [w for w in windows if w.dilation == d]
        out.append(Window(max(w.left for w in ws), max(w.right for w in ws), d))
    return out


def _meet_windows(windows: list[Window]) -> list[Window]:
    out: list[Window] = []
    for d in sorted({w.dilation for w in windows}):
        ws = [w for w in windows if w.dilation == d]
        out.append(Window(min(w.left for w in ws), min(w.right for w in ws), d))
    return out


def _affine(node: Affine) -> Pattern:
    """Divide out the gcd (``g * x + c >= 0`` iff ``x + floor(c / g) >= 0`` for an integer
    ``x``); a constant half-plane is full or empty; ``p - j >= 0`` is ``causal``."""
    g = math.gcd(node.q, node.kv)
    if g == 0:
        return Full() if node.const >= 0 else Empty()
    q, kv, const = node.q // g, node.kv // g, node.const // g
    if (q, kv, const) == (1, -1, 0):
        return Causal()
    if (q, kv) == (0, 1) and const >= 0:  # j >= -const: every key
        return Full()
    if (q, kv) == (0, -1):  # j <= const
        return Sinks(const + 1) if const >= 0 else Empty()
    if (q, kv) == (-1, 0) and const >= -1:  # p <= const
        return GlobalQueries(const + 1)
    return Affine(q, kv, const)


def band_bounds(p: Pattern) -> tuple[int | None, int | None] | None:
    """(lowest, highest) offset ``j - p`` a unit band allows (None: unbounded), or None
    when ``p`` is not one."""
    if isinstance(p, Causal):
        return None, 0
    if isinstance(p, Window) and p.dilation == 1:
        return -p.left, p.right
    if isinstance(p, Affine) and (p.q, p.kv) == (1, -1):  # j <= p + const
        return None, p.const
    if isinstance(p, Affine) and (p.q, p.kv) == (-1, 1):  # j >= p - const
        return -p.const, None
    return None


def _band(lo: int | None, hi: int | None) -> list[Pattern]:
    """The fewest nodes allowing exactly the offsets ``lo <= j - p <= hi``."""
    if lo is not None and hi is not None and lo > hi:
        return [Empty()]
    if lo is not None and hi is not None and lo <= 0 <= hi:
        return [Window(-lo, hi)]
    out: list[Pattern] = []
    if hi is not None:
        out.append(Causal() if hi == 0 else Affine(1, -1, hi))
    if lo is not None:
        out.append(Affine(-1, 1, -lo))
    return out


def _meet_bands(parts: list[Pattern]) -> list[Pattern]:
    """Intersection: every unit band's bounds meet into one band."""
    bounds = [b for b in map(band_bounds, parts) if b is not None]
    if len(bounds) <= 1:
        return parts
    los = [lo for lo, _ in bounds if lo is not None]
    his = [hi for _, hi in bounds if hi is not None]
    rest = [p for p in parts if band_bounds(p) is None]
    return rest + _band(max(los) if los else None, min(his) if his else None)


def _join_half_bands(parts: list[Pattern]) -> list[Pattern]:
    """Union: half-planes bounding ``j - p`` on the same side keep the widest one
    (``causal`` is ``j - p <= 0``)."""
    uppers = [p for p in parts if band_bounds(p) is not None and not isinstance(p, Window)
              and band_bounds(p)[0] is None]
    lowers = [p for p in parts if isinstance(p, Affine) and (p.q, p.kv) == (-1, 1)]
    out = [p for p in parts if p not in uppers and p not in lowers]
    if uppers:
        out += _band(None, max(band_bounds(p)[1] for p in uppers))
    if lowers:
        out += _band(min(band_bounds(p)[0] for p in lowers), None)
    return out
