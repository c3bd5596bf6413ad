"""Range analysis: which kv tiles a query tile must visit, and which of those are full.

For query tile ``m`` (rows ``[m*BM, min((m+1)*BM, Lq))``) a pattern yields a list of
``TileSegment``s. A segment is four closed-form kv-tile bounds, half-open:
``[lo, hi)`` may hold allowed pairs, and ``[full_lo, full_hi)`` inside it holds *only*
allowed pairs (every row, every column, all columns < Lkv). Tiles outside every segment
hold no allowed pair. A union is the list of its parts' segments; an intersection is
the pairwise intersection of its parts' segments (distributing over unions).

Primitives first give bounds on key *positions* ``j`` (inclusive), which are turned
into tile bounds in one place, ``_tiles``. All arithmetic is integer (FloorDiv), so the
same expression is exact when evaluated in numpy and when printed into the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..ir.nodes import (
    Causal,
    Chunks,
    Documents,
    Empty,
    Full,
    GlobalQueries,
    Intersection,
    Pattern,
    Sinks,
    Union,
    Window,
)
from .symbolic import (
    BLOCK_M,
    BLOCK_N,
    KV_FULL_TILES,
    KV_LEN,
    KV_TILES,
    P_FIRST,
    P_LAST,
    Q_LEN,
    FloorDiv,
    M,
    ceil_div,
    clamp,
    evaluate,
)

Expr = sympy.Expr


# Raw bounds of a segment, and its normalised bounds, as symbols. ``NORMALISE`` is the
# sequence of steps (each may use the ones before) that turns raw bounds into the walked
# range: lo <= full_lo <= full_hi <= hi, full tiles entirely below Lkv, empty ranges empty.
RAW_LO, RAW_HI, RAW_FULL_LO, RAW_FULL_HI = sympy.symbols("lo_raw hi_raw flo_raw fhi_raw",
                                                         integer=True)
LO, HI, FULL_LO, FULL_HI = sympy.symbols("lo hi flo fhi", integer=True)
NORMALISE = (
    (LO, clamp(RAW_LO, 0, KV_TILES)),
    (HI, clamp(RAW_HI, LO, KV_TILES)),
    (FULL_LO, clamp(RAW_FULL_LO, LO, HI)),
    (FULL_HI, sympy.Max(FULL_LO, sympy.Min(RAW_FULL_HI, HI, KV_FULL_TILES))),
)


@dataclass(frozen=True)
class TileSegment:
    """Raw kv-tile bounds; empty or out-of-range values are fixed by ``NORMALISE``."""

    lo: Expr
    hi: Expr
    full_lo: Expr
    full_hi: Expr

    def __repr__(self) -> str:
        return (f"TileSegment(visit=[{self.lo}, {self.hi}), "
                f"full=[{self.full_lo}, {self.full_hi}))")

    def evaluate(self, env: dict):
        """Numeric normalised (lo, hi, full_lo, full_hi) arrays."""
        env = dict(env)
        env[RAW_LO], env[RAW_HI], env[RAW_FULL_LO], env[RAW_FULL_HI] = (
            evaluate(e, env) for e in (self.lo, self.hi, self.full_lo, self.full_hi))
        for symbol, expr in NORMALISE:
            env[symbol] = evaluate(expr, env)
        return env[LO], env[HI], env[FULL_LO], env[FULL_HI]

    def subs(self, values: dict) -> TileSegment:
        return TileSegment(*(sympy.sympify(e).subs(values)
                             for e in (self.lo, self.hi, self.full_lo, self.full_hi)))


def _tiles(j_lo, j_hi, jf_lo, jf_hi) -> TileSegment:
    """Key-position bounds (inclusive) -> raw kv-tile bounds (half-open).

    ``[j_lo, j_hi]`` bounds every allowed key of any row; ``[jf_lo, jf_hi]`` is allowed
    for every row. An empty position range is any with lo > hi.
    """
    return TileSegment(FloorDiv(j_lo, BLOCK_N), FloorDiv(j_hi, BLOCK_N) + 1,
                       ceil_div(jf_lo, BLOCK_N), FloorDiv(jf_hi + 1, BLOCK_N))


_NO_FULL = (sympy.Integer(1), sympy.Integer(0))  # an empty full range


def primitive_segment(pat: Pattern) -> TileSegment:
    """The one segment of a position-only primitive."""
    last_key = KV_LEN - 1
    if isinstance(pat, Full):
        return _tiles(0, last_key, 0, last_key)
    if isinstance(pat, Causal):
        return _tiles(0, P_LAST, 0, P_FIRST)
    if isinstance(pat, Window):
        left, right, d = pat.left * pat.dilation, pat.right * pat.dilation, pat.dilation
        full = (P_LAST - left, P_FIRST + right) if d == 1 else _NO_FULL
        return _tiles(P_FIRST - left, P_LAST + right, *full)
    if isinstance(pat, Sinks):
        return _tiles(0, pat.n - 1, 0, pat.n - 1)
    if isinstance(pat, GlobalQueries):
        # All keys if the first row is global; all full if the last row is.
        any_row = sympy.Min(1, sympy.Max(0, pat.n - P_FIRST))
        all_rows = sympy.Min(1, sympy.Max(0, pat.n - P_LAST))
        return _tiles(0, any_row * KV_LEN - 1, 0, all_rows * KV_LEN - 1)
    if isinstance(pat, Chunks):
        s = pat.size
        first_chunk, last_chunk = FloorDiv(P_FIRST, s), FloorDiv(P_LAST, s)
        # Full only where the first row's chunk and the last row's chunk coincide.
        return _tiles(first_chunk * s, last_chunk * s + s - 1, last_chunk * s, first_chunk * s + s - 1)
    if isinstance(pat, Documents):
        return _tiles(0, last_key, *_NO_FULL)  # decided per tile at run time
    if isinstance(pat, Empty):
        return _tiles(0, -1, *_NO_FULL)
    raise TypeError(f"no range rule for {type(pat).__name__}")


def _intersect(a: TileSegment, b: TileSegment) -> TileSegment:
    # Raw bounds intersect directly: an empty side stays empty after normalisation.
    # Full tiles of the intersection are those full in both.
    return TileSegment(sympy.Max(a.lo, b.lo), sympy.Min(a.hi, b.hi),
                       sympy.Max(a.full_lo, b.full_lo), sympy.Min(a.full_hi, b.full_hi))


def tile_segments(pattern: Pattern) -> list[TileSegment]:
    """Segments of a canonical, single-head pattern (see module docstring)."""
    if isinstance(pattern, Union):
        out: list[TileSegment] = []
        for part in pattern.parts:
            out.extend(tile_segments(part))
        return out
    if isinstance(pattern, Intersection):
        acc = tile_segments(pattern.parts[0])
        for part in pattern.parts[1:]:
            acc = [_intersect(a, b) for a in acc for b in tile_segments(part)]
        return acc
    return [primitive_segment(pattern)]


def hull_segment(segments: list[TileSegment]) -> TileSegment:
    """One segment covering all of ``segments`` (the dense schedule). Its full range is the
    widest-looking one of a part, which stays correct: a tile full in one part of a
    union is full for the union. Raw empty parts widen the hull only conservatively."""
    lo = sympy.Min(*[s.lo for s in segments])
    hi = sympy.Max(*[s.hi for s in segments])
    return TileSegment(lo, hi, segments[-1].full_lo, segments[-1].full_hi)


def environment(q_len: int, kv_len: int, block_m: int, block_n: int, tiles=None) -> dict:
    """Numeric values for the symbols; ``tiles`` defaults to every query tile."""
    import numpy as np

    if tiles is None:
        tiles = np.arange(max(1, -(-q_len // block_m)))
    return {M: tiles, BLOCK_M: block_m, BLOCK_N: block_n, Q_LEN: q_len, KV_LEN: kv_len}
