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

The backward dK/dV kernel needs the inverse: for key tile ``n`` (keys
``[n*BN, min((n+1)*BN, Lkv))``), which query tiles reach it. That is the same analysis
from the key's side (``side="key"``): each primitive states which query positions can
see a key range in closed form (``key_side_segment``), and unions and intersections
combine segments exactly as above. Segments then bound query tiles, full tiles hold
only allowed pairs and only rows < Lq.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import sympy

from ..ir.affine import Affine, TopLeft
from ..ir.neighborhood import Neighborhood, NeighborhoodPart, group_extent, na_key_range, na_query_range
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
    Sinks,
    Union,
    Window,
)
from .symbolic import (
    BLOCK_M,
    BLOCK_N,
    J_FIRST,
    J_LAST,
    KV_FULL_TILES,
    KV_LEN,
    KV_TILES,
    P_FIRST,
    P_LAST,
    Q_FULL_TILES,
    Q_LEN,
    Q_TILES,
    RUN,
    FloorDiv,
    M,
    N,
    SympyOps,
    ceil_div,
    clamp,
    evaluate,
    gt0,
)

Expr = sympy.Expr


# Raw bounds of a segment, and its normalised bounds, as symbols. ``NORMALISE`` is the
# sequence of steps (each may use the ones before) that turns raw bounds into the walked
# range: lo <= full_lo <= full_hi <= hi, full tiles entirely below Lkv, empty ranges empty.
RAW_LO, RAW_HI, RAW_FULL_LO, RAW_FULL_HI = sympy.symbols("lo_raw hi_raw flo_raw fhi_raw",
                                                         integer=True)
LO, HI, FULL_LO, FULL_HI = sympy.symbols("lo hi flo fhi", integer=True)


def _normalise(tiles, full_tiles) -> tuple:
    return ((LO, clamp(RAW_LO, 0, tiles)),
            (HI, clamp(RAW_HI, LO, tiles)),
            (FULL_LO, clamp(RAW_FULL_LO, LO, HI)),
            (FULL_HI, sympy.Max(FULL_LO, sympy.Min(RAW_FULL_HI, HI, full_tiles))))


NORMALISE = _normalise(KV_TILES, KV_FULL_TILES)  # query side: segments bound kv tiles
KEY_NORMALISE = _normalise(Q_TILES, Q_FULL_TILES)  # key side: segments bound query tiles
SIDES = ("query", "key")


@dataclass(frozen=True)
class TileSegment:
    """Raw kv-tile bounds; empty or out-of-range values are fixed by ``NORMALISE``.

    ``lets``: named intermediates ``(symbol, expression)`` the bounds use, in order (each
    may use the ones before); the kernel computes each once per program. N-D layouts
    share them between their segments, which keeps bounds (and kernels) short.

    ``runs``: a *family* of that many segments, the bounds' ``RUN`` symbol taking the
    values ``0 .. runs - 1``. A family's runs must be in ascending order of ``lo`` (a
    box of tiles, one run per outer row): the kernel then walks them in a loop, so its
    size and compile time do not grow with the number of runs (a 3-D neighbourhood's key
    box is 9 or more runs). The lets may not use ``RUN``."""

    lo: Expr
    hi: Expr
    full_lo: Expr
    full_hi: Expr
    lets: tuple = ()
    runs: int = 1

    def __repr__(self) -> str:
        family = f", runs={self.runs}" if self.runs > 1 else ""
        return (f"TileSegment(visit=[{self.lo}, {self.hi}), "
                f"full=[{self.full_lo}, {self.full_hi}){family})")

    def run_bounds(self, env: dict, side: str = "query"):
        """Numeric normalised bounds (see ``evaluate``) of each run, in order."""
        for run in range(self.runs):
            yield self.evaluate({**env, RUN: run}, side)

    def expanded(self) -> list[TileSegment]:
        """The runs as single segments (``RUN`` replaced by each value)."""
        if self.runs == 1:
            return [self]
        return [dataclasses.replace(self.subs({RUN: sympy.Integer(r)}), runs=1)
                for r in range(self.runs)]

    def evaluate(self, env: dict, side: str = "query"):
        """Numeric normalised (lo, hi, full_lo, full_hi) arrays (of one run: ``env``
        gives ``RUN`` for a family)."""
        env = dict(env)
        for symbol, expr in self.lets:
            env[symbol] = evaluate(expr, env)
        env[RAW_LO], env[RAW_HI], env[RAW_FULL_LO], env[RAW_FULL_HI] = (
            evaluate(e, env) for e in (self.lo, self.hi, self.full_lo, self.full_hi))
        for symbol, expr in normalise_steps(side):
            env[symbol] = evaluate(expr, env)
        return env[LO], env[HI], env[FULL_LO], env[FULL_HI]

    def subs(self, values: dict) -> TileSegment:
        def sub(e):
            e = sympy.sympify(e)
            if len(str(e)) < 400:
                return e.subs(values)
            with sympy.evaluate(False):  # simplifying large bounds takes seconds
                return e.xreplace(values)

        return TileSegment(*(sub(e) for e in (self.lo, self.hi, self.full_lo, self.full_hi)),
                           tuple((symbol, sub(e)) for symbol, e in self.lets), self.runs)


def expand_runs(segments) -> list[TileSegment]:
    """Every run of every segment as a single segment."""
    return [one for seg in segments for one in seg.expanded()]


def walked(segments, schedule: str) -> tuple[TileSegment, ...]:
    """What a kernel walks: the segments in order, a lone family as its loop, or
    (``schedule="hull"``) one range covering them all. Several segments are sorted in the
    kernel, so a family among them is expanded into its runs."""
    segments = list(segments)
    if schedule == "hull":
        return (hull_segment(segments),)
    return tuple(segments) if len(segments) == 1 else tuple(expand_runs(segments))


def walk_count(segments) -> int:
    """How many ranges a kernel walks per tile (each run of a family counts)."""
    return sum(seg.runs for seg in segments)


def merged_lets(segments) -> tuple:
    """The intermediates of several segments, each once, in order."""
    out: dict = {}
    for seg in segments:
        for symbol, expr in seg.lets:
            out.setdefault(symbol, expr)
    return tuple(out.items())


def _tiles(j_lo, j_hi, jf_lo, jf_hi) -> TileSegment:
    """Key-position bounds (inclusive) -> raw kv-tile bounds (half-open).

    ``[j_lo, j_hi]`` bounds every allowed key of any row; ``[jf_lo, jf_hi]`` is allowed
    for every row. An empty position range is any with lo > hi.
    """
    return TileSegment(FloorDiv(j_lo, BLOCK_N), FloorDiv(j_hi, BLOCK_N) + 1,
                       ceil_div(jf_lo, BLOCK_N), FloorDiv(jf_hi + 1, BLOCK_N))


_NO_FULL = (sympy.Integer(1), sympy.Integer(0))  # an empty full range


def primitive_segment(pat: Pattern, top_left: bool = False) -> TileSegment:
    """The one segment of a position-only primitive (``top_left``: inside ``top_left``,
    where the query position is the row, ``p - (Lkv - Lq)``)."""
    last_key = KV_LEN - 1
    shift = (KV_LEN - Q_LEN) if top_left else 0
    p_first, p_last = P_FIRST - shift, P_LAST - shift
    if isinstance(pat, Full):
        return _tiles(0, last_key, 0, last_key)
    if isinstance(pat, Causal):
        return _tiles(0, p_last, 0, p_first)
    if isinstance(pat, Window):
        left, right, d = pat.left * pat.dilation, pat.right * pat.dilation, pat.dilation
        full = (p_last - left, p_first + right) if d == 1 else _NO_FULL
        return _tiles(p_first - left, p_last + right, *full)
    if isinstance(pat, Sinks):
        return _tiles(0, pat.n - 1, 0, pat.n - 1)
    if isinstance(pat, GlobalQueries):
        # All keys if the first row is global; all full if the last row is.
        any_row = sympy.Min(1, sympy.Max(0, pat.n - p_first))
        all_rows = sympy.Min(1, sympy.Max(0, pat.n - p_last))
        return _tiles(0, any_row * KV_LEN - 1, 0, all_rows * KV_LEN - 1)
    if isinstance(pat, Chunks):
        s = pat.size
        first_chunk, last_chunk = FloorDiv(p_first, s), FloorDiv(p_last, s)
        # Full only where the first row's chunk and the last row's chunk coincide.
        return _tiles(first_chunk * s, last_chunk * s + s - 1, last_chunk * s, first_chunk * s + s - 1)
    if isinstance(pat, (Documents, MaskTable)):
        return _tiles(0, last_key, *_NO_FULL)  # decided per tile at run time
    if isinstance(pat, Empty):
        return _tiles(0, -1, *_NO_FULL)
    if isinstance(pat, Neighborhood):
        return _tiles(*_neighborhood_bounds(pat, p_first, p_last, na_key_range))
    if isinstance(pat, NeighborhoodPart):  # the grid's bounds, moved to the part's keys
        q_off, kv_off = pat.q_offset, pat.kv_offset
        bounds = _neighborhood_bounds(pat.grid, p_first + q_off, p_last + q_off, na_key_range)
        return _tiles(*(b - kv_off for b in bounds))
    if isinstance(pat, Affine):
        return _tiles(*_half_plane(pat.q, pat.kv, pat.const, p_first, p_last, 0, last_key,
                                   KV_LEN))
    raise TypeError(f"no range rule for {type(pat).__name__}")


def _half_plane(a: int, b: int, c: int, x_first, x_last, y_first, y_last, y_count):
    """Inclusive (lo, hi, full_lo, full_hi) of the ``y`` with ``a * x + b * y + c >= 0`` for
    some / every ``x`` in ``[x_first, x_last]``, ``y`` in ``[y_first, y_last]`` (the query
    side: x the query position, y the key; the key side swaps them). The bound on ``y`` is
    monotone in ``x``, so its extremes are at the range's ends: the widest where ``a x``
    is largest."""
    widest, narrowest = (x_last, x_first) if a > 0 else (x_first, x_last)
    if b == 0:  # whole lines of y: on for some x / for every x
        on_some, on_every = gt0(a * widest + c + 1), gt0(a * narrowest + c + 1)
        return (y_first, y_first - 1 + on_some * y_count, y_first,
                y_first - 1 + on_every * y_count)
    if b > 0:  # y >= ceil(-(a x + c) / b)
        return (ceil_div(-(a * widest + c), b), y_last,
                ceil_div(-(a * narrowest + c), b), y_last)
    return (y_first, FloorDiv(a * widest + c, -b),  # y <= floor((a x + c) / -b)
            y_first, FloorDiv(a * narrowest + c, -b))


def _neighborhood_bounds(pat: Neighborhood, first, last, rule):
    """Inclusive (lo, hi, full_lo, full_hi) flat positions on the other side of the flat
    positions ``[first, last]``, in original token order (no tiled layout; the planner's
    layout, ``planner/layout.py``, is where neighbourhoods get tight N-D tiles). 1-D with
    dilation 1 is exact (``rule`` is ``na_key_range`` or ``na_query_range``); otherwise
    whole rows of dimension 0: those ``rule`` reaches from the rows ``[first, last]``
    span, per dilation group (exact in dimension 0), and no full tiles."""
    n, size = pat.shape[0], pat.size
    inside = gt0(size - first) * gt0(last + 1)  # some position of the range is in the grid
    first, last = sympy.Max(first, 0), sympy.Min(last, size - 1)
    if pat.ndim == 1 and pat.dilation[0] == 1:
        lo, hi, flo, fhi = rule(first, last, n, pat.kernel[0], pat.stride[0], pat.causal[0],
                                SympyOps)
        lo, hi = sympy.Max(lo, 0), sympy.Min(hi, n - 1)
        return lo, lo - 1 + (hi - lo + 1) * inside, sympy.Max(flo, 0), sympy.Min(fhi, n - 1)
    row = pat.row_strides[0] if pat.ndim > 1 else 1
    lo, hi = _dim0_reach(pat, FloorDiv(first, row), FloorDiv(last, row), rule)
    lo, hi = lo * row, (hi + 1) * row - 1
    return (lo, lo - 1 + (hi - lo + 1) * inside, *_NO_FULL)


#: dilation groups of dimension 0 bounded one by one; above this, a band (few grids
#: dilate dimension 0 this much, and each group adds to the printed bounds)
_MAX_GROUPS = 8


def _dim0_reach(pat: Neighborhood, x_first, x_last, rule):
    """Inclusive dimension-0 coordinates ``rule`` reaches from coordinates ``[x_first,
    x_last]`` (in the grid). Per dilation group: the group-local coordinates the range
    holds (clamped into the group: a group the range misses adds a real token's reach,
    which only widens the bound), then ``rule`` on them."""
    n, d, k, s, c = (pat.shape[0], pat.dilation[0], pat.kernel[0], pat.stride[0],
                     pat.causal[0])
    if d > _MAX_GROUPS:  # no token reaches (2 * kernel + stride) * dilation rows away
        reach = (2 * k + s) * d
        return sympy.Max(x_first - reach, 0), sympy.Min(x_last + reach, n - 1)
    los, his = [], []
    for g in range(d):
        ng = group_extent(n, d, g, SympyOps)
        i_first = sympy.Min(sympy.Max(ceil_div(x_first - g, d), 0), ng - 1)
        i_last = sympy.Min(sympy.Max(FloorDiv(x_last - g, d), i_first), ng - 1)
        lo, hi, _, _ = rule(i_first, i_last, ng, k, s, c, SympyOps)
        los.append(sympy.Max(lo, 0) * d + g)
        his.append(sympy.Min(hi, ng - 1) * d + g)
    return _min(*los), _max(*his)


def _query_tiles(i_lo, i_hi, if_lo, if_hi) -> TileSegment:
    """Query-row bounds (inclusive) -> raw query-tile bounds (half-open); the key-side
    twin of ``_tiles``."""
    return TileSegment(FloorDiv(i_lo, BLOCK_M), FloorDiv(i_hi, BLOCK_M) + 1,
                       ceil_div(if_lo, BLOCK_M), FloorDiv(if_hi + 1, BLOCK_M))


def key_side_segment(pat: Pattern, top_left: bool = False) -> TileSegment:
    """The one segment of a primitive seen from key tile ``n``: which query rows can see
    some key of the tile (visit) and which see all of them (full). Stated on query
    positions p = i + Lkv - Lq (p = i inside ``top_left``), converted to rows at the end."""
    delta = 0 if top_left else KV_LEN - Q_LEN
    last_row = Q_LEN - 1

    def rows(p_lo, p_hi, pf_lo, pf_hi):
        return _query_tiles(p_lo - delta, p_hi - delta, pf_lo - delta, pf_hi - delta)

    if isinstance(pat, (Full, Documents, MaskTable)):
        full = (0, last_row) if isinstance(pat, Full) else _NO_FULL
        return _query_tiles(0, last_row, *full)
    if isinstance(pat, Causal):  # j <= p
        return rows(J_FIRST, last_row + delta, J_LAST, last_row + delta)
    if isinstance(pat, Window):  # p in [j - right*d, j + left*d]
        left, right = pat.left * pat.dilation, pat.right * pat.dilation
        full = (J_LAST - right, J_FIRST + left) if pat.dilation == 1 else (1 + delta, delta)
        return rows(J_FIRST - right, J_LAST + left, *full)
    if isinstance(pat, Sinks):  # every row sees keys j < n
        any_key = sympy.Min(1, sympy.Max(0, pat.n - J_FIRST))
        all_keys = sympy.Min(1, sympy.Max(0, pat.n - J_LAST))
        return _query_tiles(0, any_key * Q_LEN - 1, 0, all_keys * Q_LEN - 1)
    if isinstance(pat, GlobalQueries):  # rows with p < n see every key
        return rows(delta, pat.n - 1, delta, pat.n - 1)
    if isinstance(pat, Chunks):
        s = pat.size
        first_chunk, last_chunk = FloorDiv(J_FIRST, s), FloorDiv(J_LAST, s)
        return rows(first_chunk * s, last_chunk * s + s - 1, last_chunk * s, first_chunk * s + s - 1)
    if isinstance(pat, Empty):
        return _query_tiles(0, -1, *_NO_FULL)
    if isinstance(pat, Neighborhood):  # absolute positions of the queries, from the keys'
        return rows(*_neighborhood_bounds(pat, J_FIRST, J_LAST, na_query_range))
    if isinstance(pat, NeighborhoodPart):  # the grid's, from the keys' grid positions
        q_off, kv_off = pat.q_offset, pat.kv_offset
        bounds = _neighborhood_bounds(pat.grid, J_FIRST + kv_off, J_LAST + kv_off, na_query_range)
        return rows(*(b - q_off for b in bounds))
    if isinstance(pat, Affine):  # the same half-plane, solved for the query position
        return rows(*_half_plane(pat.kv, pat.q, pat.const, J_FIRST, J_LAST, delta,
                                 last_row + delta, Q_LEN))
    raise TypeError(f"no key-side range rule for {type(pat).__name__}")


def normalise_steps(side: str) -> tuple:
    return NORMALISE if side == "query" else KEY_NORMALISE


def _intersect(a: TileSegment, b: TileSegment) -> list[TileSegment]:
    # Raw bounds intersect directly: an empty side stays empty after normalisation.
    # Full tiles of the intersection are those full in both. A family met with a single
    # segment stays a family (bounds clipped to one range keep their ascending order);
    # two families: one is expanded.
    if a.runs > 1 and b.runs > 1:
        return [one for part in b.expanded() for one in _intersect(a, part)]
    return [TileSegment(_max(a.lo, b.lo), _min(a.hi, b.hi), _max(a.full_lo, b.full_lo),
                        _min(a.full_hi, b.full_hi), merged_lets((a, b)), max(a.runs, b.runs))]


def _min(*args):
    # sympy simplifies Min/Max by comparing arguments through its assumptions system:
    # cheap on 1-D bounds, seconds on the nested bounds of N-D layouts
    return sympy.Min(*args, evaluate=len(str(args)) < 400)


def _max(*args):
    return sympy.Max(*args, evaluate=len(str(args)) < 400)


def tile_segments(pattern: Pattern, side: str = "query", primitive=None,
                  top_left: bool = False) -> list[TileSegment]:
    """Segments of a canonical, single-head pattern (see module docstring): kv tiles per
    query tile (``side="query"``) or query tiles per kv tile (``side="key"``).
    ``primitive``: segments of a leaf, when a token layout replaces the default rules;
    ``top_left``: the pattern sits inside ``top_left`` (queries aligned to the first key)."""
    if side not in SIDES:
        raise ValueError(f"side={side!r}: expected one of {SIDES}")
    if isinstance(pattern, TopLeft):
        return tile_segments(pattern.pattern, side, primitive, top_left=True)
    if isinstance(pattern, Union):
        out: list[TileSegment] = []
        for part in pattern.parts:
            out.extend(tile_segments(part, side, primitive, top_left))
        return out
    if isinstance(pattern, Intersection):
        acc = tile_segments(pattern.parts[0], side, primitive, top_left)
        for part in pattern.parts[1:]:
            acc = [one for a in acc for b in tile_segments(part, side, primitive, top_left)
                   for one in _intersect(a, b)]
        return acc
    if primitive is not None:
        return primitive(pattern)
    if hasattr(pattern, "tile_segments"):  # planner-internal nodes (a token layout)
        return pattern.tile_segments(side)
    if side == "query":
        return [primitive_segment(pattern, top_left)]
    return [key_side_segment(pattern, top_left)]


def hull_segment(segments: list[TileSegment]) -> TileSegment:
    """One segment covering all of ``segments`` (the dense schedule). Its full range is the
    widest-looking one of a part, which stays correct: a tile full in one part of a
    union is full for the union. Raw empty parts widen the hull only conservatively."""
    segments = expand_runs(segments)
    lo = _min(*[s.lo for s in segments])
    hi = _max(*[s.hi for s in segments])
    return TileSegment(lo, hi, segments[-1].full_lo, segments[-1].full_hi, merged_lets(segments))


def environment(q_len: int, kv_len: int, block_m: int, block_n: int, tiles=None,
                side: str = "query") -> dict:
    """Numeric values for the symbols; ``tiles`` defaults to every query tile (every kv
    tile on the key side)."""
    if tiles is None:
        length, block = (q_len, block_m) if side == "query" else (kv_len, block_n)
        tiles = np.arange(max(1, -(-length // block)))
    return {M if side == "query" else N: tiles, BLOCK_M: block_m, BLOCK_N: block_n,
            Q_LEN: q_len, KV_LEN: kv_len}
