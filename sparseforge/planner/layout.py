"""A tiled token layout for N-D neighbourhoods: the planner's permutation of Q and K/V.

In row-major order a 2-D neighbourhood's keys are ``kernel`` short runs one grid row
apart, so a 1-D tile of queries touches many key tiles that it barely uses. The layout
reorders tokens so that tiles are N-D boxes:

    dilation group (row-major over the per-dim residues)
      > tile of the group's grid (row-major over the tile grid)
        > token inside the tile (row-major inside the box)

then the tokens after the grid (a tail of extra tokens, if the sequence is longer than
the grid) in their order. Each dimension's dilation group becomes a contiguous, dense
sub-grid (DiNAT's dilation then costs nothing), and a query box's neighbourhood is a box
of key tiles: per outer row of key tiles one contiguous run. Those runs are the
closed-form segments below, stated with the same per-dimension rule as the mask
(``ir.neighborhood.na_key_range`` / ``na_query_range``) as sympy expressions: no index
tensor. Grids whose extent is not a multiple of the tile are padded; padding tokens
are never allowed (the predicate checks them) and never sit in a full tile.

Q and K/V are gathered into this order before the kernels run and the output is
scattered back (``dispatch``): one memory pass over each, as NATTEN's own fused kernels
do ("token permutation", Hassani et al., "Generalized Neighborhood Attention", 2025).
Kernel tiles of ``BLOCK`` tokens are ``BLOCK / tile_size`` consecutive layout tiles
along the last dimension (the tile grid's last extent is padded to a multiple of that
ratio), so one layout serves the forward, dQ and dK/dV kernels with their own tile
sizes: they are boxes ``tile`` x ... x ``ratio * tile[-1]``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import sympy
import torch

from ..ir.neighborhood import (
    Neighborhood,
    group_extent,
    na_keep_in_group,
    na_key_range,
    na_query_range,
)
from ..ir.nodes import Pattern, walk
from ..ir.ops import TorchOps, TritonOps, TritonText
from .ranges import TileSegment, environment, tile_segments
from .symbolic import (
    BLOCK_M,
    BLOCK_N,
    KV_TILES,
    Q_TILES,
    RUN,
    FloorDiv,
    M,
    N,
    SympyOps,
    ceil_div,
    evaluate,
    gt0,
)


def _unravel(index, dims, ops):
    """Row-major coordinates of ``index`` in a grid of ``dims`` (first one unbounded)."""
    out = []
    for d in range(len(dims)):
        q = ops.fdiv(index, math.prod(dims[d + 1:]))
        out.append(q if d == 0 else q - ops.fdiv(q, dims[d]) * dims[d])
    return out


@dataclass(frozen=True)
class GridTiling:
    """One side's token order (queries, or keys and values). ``tile``: tokens per dim of a
    layout tile; ``multiple``: the tile grid's last extent is padded to a multiple of
    this (the largest kernel tile, in layout tiles); ``length``: tokens on this side."""

    shape: tuple[int, ...]
    dilation: tuple[int, ...]
    tile: tuple[int, ...]
    multiple: int
    length: int

    @cached_property
    def extents(self) -> tuple[int, ...]:
        """The largest dilation group's extent per dim (every group is tiled this big)."""
        return tuple(-(-n // d) for n, d in zip(self.shape, self.dilation))

    @cached_property
    def tiles(self) -> tuple[int, ...]:
        out = [-(-e // t) for e, t in zip(self.extents, self.tile)]
        out[-1] = -(-out[-1] // self.multiple) * self.multiple
        return tuple(out)

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def tiles_per_group(self) -> int:
        return math.prod(self.tiles)

    @property
    def groups(self) -> int:
        return math.prod(self.dilation)

    @property
    def grid_run(self) -> int:
        """Run positions taken by the (padded) grid; the tail follows."""
        return self.groups * self.tiles_per_group * self.tile_size

    @property
    def run_len(self) -> int:
        return self.grid_run + self.length - math.prod(self.shape)

    def coordinates(self, r, ops):
        """(dilation residue per dim, coordinate inside the dilation group per dim) of run
        position ``r`` (meaningless past the grid: ``r >= grid_run``)."""
        tile = ops.fdiv(r, self.tile_size)
        offset = r - tile * self.tile_size
        group = ops.fdiv(tile, self.tiles_per_group)
        in_group = tile - group * self.tiles_per_group
        residues = _unravel(group, self.dilation, ops) if self.groups > 1 else [0] * len(self.shape)
        tile_xy = _unravel(in_group, self.tiles, ops)
        offset_xy = _unravel(offset, self.tile, ops)
        return residues, [t * size + o for t, size, o in zip(tile_xy, self.tile, offset_xy)]

    def decode(self, r, ops, coordinates=None):
        """(original position, is a real token) of run position ``r``; ``coordinates``:
        its ``coordinates`` if already at hand (named values in a kernel)."""
        residues, xs = coordinates or self.coordinates(r, ops)
        flat = 0
        valid = r < self.grid_run
        strides = [math.prod(self.shape[d + 1:]) for d in range(len(self.shape))]
        for d, (n, dil) in enumerate(zip(self.shape, self.dilation)):
            valid = valid & (xs[d] < group_extent(n, dil, residues[d], ops))
            flat = flat + (xs[d] * dil + residues[d]) * strides[d]
        tail = r - self.grid_run + math.prod(self.shape)
        return ops.where(r < self.grid_run, flat, tail), ops.where(r < self.grid_run, valid,
                                                                    r < self.run_len)

    def kernel_box(self, index, block):
        """Symbolic box of kernel tile ``index`` of ``block`` tokens: (group residues,
        first and last valid coordinate per dim, group extent per dim, whether it holds a
        real token). Coordinates are group-local."""
        ratio = FloorDiv(block, self.tile_size)
        first_tile = index * ratio
        group = FloorDiv(first_tile, self.tiles_per_group)
        residues = _unravel(group, self.dilation, SympyOps)
        tile_xy = _unravel(first_tile - group * self.tiles_per_group, self.tiles, SympyOps)
        exists = gt0(self.groups * self.tiles_per_group - first_tile)
        firsts, lasts, extents = [], [], []
        for d, (n, dil) in enumerate(zip(self.shape, self.dilation)):
            size = self.tile[d] * (ratio if d == len(self.shape) - 1 else 1)
            ng = group_extent(n, dil, residues[d], SympyOps)
            first = tile_xy[d] * self.tile[d]
            exists = exists * gt0(ng - first)
            firsts.append(first)
            lasts.append(SympyOps.min(first + size, ng) - 1)
            extents.append(ng)
        return group, firsts, lasts, extents, exists

    def kernel_grid(self, block):
        """(box size per dim, kernel tiles per dim, kernel tiles per group), symbolic."""
        ratio = FloorDiv(block, self.tile_size)
        sizes = list(self.tile)
        sizes[-1] = self.tile[-1] * ratio
        counts = list(self.tiles)
        counts[-1] = FloorDiv(self.tiles[-1], ratio)
        return sizes, counts, math.prod(self.tiles[:-1]) * counts[-1]

    def index_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(run -> original position, with padding at 0; original -> run position)."""
        r = torch.arange(self.run_len, device=device)
        flat, valid = self.decode(r, TorchOps)
        gather = torch.where(valid, flat, 0)
        scatter = torch.empty(self.length, dtype=torch.long, device=device)
        scatter[flat[valid]] = r[valid]
        return gather, scatter


@dataclass(frozen=True)
class Tiled(Pattern):
    """A head's mask (original positions) seen through the layout: what the kernels of a
    tiled plan run. ``blocks``: (BLOCK_M, BLOCK_N) of every kernel kind that walks it."""

    pattern: Pattern
    q: GridTiling
    kv: GridTiling
    blocks: tuple[tuple[int, int], ...]
    # the predicate reads the layout's neighbourhood on group coordinates (see
    # ``_coordinate_rule``); off beside score modifiers, which read original positions:
    # both live at once cost the sm_90 rel_bias kernel 40 stack bytes (cuobjdump)
    coordinate_rule: bool = True

    @property
    def children(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    def __repr__(self) -> str:
        def box(t):
            return "x".join(map(str, t.tile)) + f" x{t.multiple}"

        return f"tiled({self.pattern!r}, q_tile={box(self.q)}, kv_tile={box(self.kv)})"

    def slug(self, slugger) -> str:
        return (f"{slugger(self.pattern)}-t{'x'.join(map(str, self.q.tile))}"
                f"-{'x'.join(map(str, self.kv.tile))}")

    # -- the mask, on run positions

    def pair_mask(self, i, j, evaluate_mask):
        fi, vi = self.q.decode(i, TorchOps)
        fj, vj = self.kv.decode(j, TorchOps)
        length = self.q.length
        return vi & vj & evaluate_mask(self.pattern, fi, fj, length, length)

    def original_positions(self, p, j, ops):
        """Original (query position, key) of run positions ``p`` (``i`` + the run-length
        shift) and ``j``: score modifiers read these (padding maps anywhere in range,
        it is masked)."""
        fi, _ = self.q.decode(p - (self.kv.run_len - self.q.run_len), ops)
        fj, _ = self.kv.decode(j, ops)
        return fi, fj  # original q_len == kv_len: p = i

    # -- the kernel's predicate: run positions i, j -> group coordinates, named once, and
    # original positions for the other primitives

    def triton_prelude(self, text, ops) -> list[str]:
        lines = []
        coordinates = {}
        for side, tiling, r in (("q", self.q, "i"), ("k", self.kv, "j")):
            residues, xs = tiling.coordinates(text(r), ops)
            named = ([text(f"{side}r{d}") if tiling.dilation[d] > 1 else 0
                      for d in range(len(xs))], [text(f"{side}x{d}") for d in range(len(xs))])
            lines += [f"{name} = {value}" for name, value in zip(named[0], residues)
                      if not isinstance(name, int)]
            lines += [f"{name} = {value}" for name, value in zip(named[1], xs)]
            lines.append(f"{side}_in = {text(r) < tiling.grid_run}")
            coordinates[side] = named
        fi, vi = self.q.decode(text("i"), ops, coordinates["q"])
        fj, vj = self.kv.decode(text("j"), ops, coordinates["k"])
        return lines + [f"real = {vi & vj}", f"i = {fi}", f"j = {fj}", f"q_len = {self.q.length}",
                        f"kv_len = {self.kv.length}"]

    def triton_predicate(self, printer) -> str:
        return f"({printer(self.pattern, self._coordinate_rule)}) & real"

    def _coordinate_rule(self, pat: Pattern) -> str | None:
        """The layout's own neighbourhood on the prelude's group coordinates: no flat
        position is unravelled again (every tile of an N-D layout is partial, so this is
        the predicate of every tile walked). Other leaves: the default (None)."""
        if not (self.coordinate_rule and isinstance(pat, Neighborhood)
                and pat.shape == self.q.shape and pat.dilation == self.q.dilation):
            return None
        keep = TritonText("q_in") & TritonText("k_in")
        for d, (n, dil) in enumerate(zip(pat.shape, pat.dilation)):
            qr = TritonText(f"qr{d}") if dil > 1 else 0
            if dil > 1:
                keep = keep & (qr == TritonText(f"kr{d}"))
            keep = keep & na_keep_in_group(TritonText(f"qx{d}"), TritonText(f"kx{d}"),
                                           group_extent(n, dil, qr, TritonOps), pat.kernel[d],
                                           pat.stride[d], pat.causal[d], TritonOps)
        return str(keep)

    # -- closed-form tile bounds

    def tile_segments(self, side: str) -> list[TileSegment]:
        return tile_segments(self.pattern, side, primitive=lambda p: self._segments(p, side))

    def _segments(self, pat: Pattern, side: str) -> list[TileSegment]:
        if not (isinstance(pat, Neighborhood) and pat.shape == self.q.shape
                and pat.dilation == self.q.dilation):
            # anything else: every tile of the other side, none full (correct, not tight)
            return [TileSegment(sympy.Integer(0), KV_TILES if side == "query" else Q_TILES,
                                sympy.Integer(1), sympy.Integer(0))]
        src, index, block, dst, other, rule = self._side(side)
        # intermediates named per node and side: byte-identical kernels for equal plans
        tag = hashlib.sha256(f"{pat!r}{side}".encode()).hexdigest()[:6]
        lets = _Lets(f"nb{tag}_")
        ranges, group, live = _tile_ranges(pat, src, index, block, dst, other, rule, lets)
        counts = self._outer_counts(ranges, live, lets, src, index, side)
        return _box_segments(ranges, group, live, lets, dst, other, counts)

    def _side(self, side):
        """(source tiling, its tile index, its block, other tiling, other block, rule)."""
        if side == "query":
            return self.q, M, BLOCK_M, self.kv, BLOCK_N, na_key_range
        return self.kv, N, BLOCK_N, self.q, BLOCK_M, na_query_range

    def _outer_counts(self, ranges, live, lets, src: GridTiling, index, side: str) -> tuple[int, ...]:
        """Per outer dim, the most tiles of the other side one kernel tile spans, over
        every kind's tile sizes: how many segments (runs) the kernels walk."""
        counts = [1] * (len(ranges) - 1)
        for bm, bn in self.blocks:
            b = bm if side == "query" else bn
            env = environment(self.q.run_len, self.kv.run_len, bm, bn, side=side)
            env[index] = torch.arange(-(-src.run_len // b)).numpy()
            for symbol, expr in lets.items:
                env[symbol] = evaluate(expr, env)
            for d, (tlo, thi, _, _) in enumerate(ranges[:-1]):
                span = evaluate((thi - tlo + 1) * live, env)
                counts[d] = max(counts[d], int(span.max(initial=0)))
        return tuple(counts)


class _Lets:
    """Collects named intermediates: ``name(tag, expr)`` returns a symbol standing for
    ``expr``, and ``items`` the (symbol, expression) pairs in definition order."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.items: list = []

    def name(self, tag: str, expr):
        symbol = sympy.Symbol(f"{self.prefix}{tag}", integer=True)
        self.items.append((symbol, expr))
        return symbol


def _box_symbols(src: GridTiling, index, block, lets: _Lets):
    group, firsts, lasts, extents, exists = src.kernel_box(index, block)
    group = lets.name("g", group)
    ng = [lets.name(f"n{d}", e) for d, e in enumerate(extents)]
    firsts = [lets.name(f"f{d}", e) for d, e in enumerate(firsts)]
    lasts = [lets.name(f"l{d}", e) for d, e in enumerate(lasts)]
    return group, firsts, lasts, ng, lets.name("live", exists)


def _tile_ranges(pat, src: GridTiling, index, block, dst: GridTiling, other_block, rule,
                 lets: _Lets):
    """Per dim (lo, hi, full_lo, full_hi) tile coordinates on the other side for kernel
    tile ``index`` of ``src`` with ``rule`` applied, the box's group and liveness."""
    group, firsts, lasts, extents, live = _box_symbols(src, index, block, lets)
    sizes, _, _ = dst.kernel_grid(other_block)
    out = []
    for d in range(len(pat.shape)):
        ng = extents[d]
        lo, hi, flo, fhi = rule(firsts[d], lasts[d], ng, pat.kernel[d], pat.stride[d],
                                pat.causal[d], SympyOps)
        lo, hi = SympyOps.max(lo, 0), SympyOps.min(hi, ng - 1)
        flo, fhi = SympyOps.max(flo, 0), SympyOps.min(fhi, ng - 1)
        out.append(tuple(lets.name(f"{tag}{d}", e) for tag, e in (
            ("tlo", FloorDiv(lo, sizes[d])), ("thi", FloorDiv(hi, sizes[d])),
            ("ftlo", ceil_div(flo, sizes[d])), ("fthi", FloorDiv(fhi + 1, sizes[d]) - 1))))
    return out, group, live


def _box_segments(ranges, group, live_box, lets: _Lets, dst: GridTiling, other_block,
                  outer_counts) -> list[TileSegment]:
    """One run along the last dim per offset into the outer dims' tile ranges, as one
    segment family (``TileSegment.runs``): run ``RUN`` takes the offsets in row-major
    order, so runs go up in tile index and the kernel walks them in a loop."""
    _, counts, per_group = dst.kernel_grid(other_block)
    strides = [math.prod(counts[d + 1:-1]) * counts[-1] for d in range(len(counts) - 1)]
    runs = math.prod(outer_counts)
    offsets = _unravel(RUN, outer_counts, SympyOps) if runs > 1 else [0] * len(outer_counts)
    base = group * per_group
    live = live_box
    full = 1
    for d, r in enumerate(offsets):
        tlo, thi, ftlo, fthi = ranges[d]
        row = tlo + r
        base = base + row * strides[d]
        live = live * gt0(thi - row + 1)
        full = full * gt0(row - ftlo + 1) * gt0(fthi - row + 1)
    tlo, thi, ftlo, fthi = ranges[-1]
    lo, flo = base + tlo, base + ftlo
    return [TileSegment(lo, lo + (thi + 1 - tlo) * live, flo,
                        flo + (fthi + 1 - ftlo) * live * full, tuple(lets.items), runs)]


# ------------------------------------------------------------------ choosing a layout


def layout_node(heads: list[Pattern]) -> Neighborhood | None:
    """The neighbourhood a tiled layout is built for: every head must hold one, all of
    the same grid and dilation (strides, kernels and causality may differ)."""
    found = None
    for pattern in heads:
        nodes = [n for n in walk(pattern) if isinstance(n, Neighborhood)]
        if not nodes:
            return None
        for n in nodes:
            if found is None:
                found = n
            elif (n.shape, n.dilation) != (found.shape, found.dilation):
                return None
    return found


def _boxes(block: int, extents: tuple[int, ...], last_multiple: int):
    """Power-of-two boxes of ``block`` tokens no wider than the grid needs per dim, whose
    last extent is a multiple of ``last_multiple``."""
    bits = block.bit_length() - 1
    caps = [max(1, 1 << (e - 1).bit_length()) for e in extents]
    for exps in itertools.product(range(bits + 1), repeat=len(extents)):
        box = tuple(1 << e for e in exps)
        if (sum(exps) == bits and all(b <= c for b, c in zip(box[:-1], caps[:-1]))
                and box[-1] % last_multiple == 0):
            yield box


def _dim_visits(n, dil, k, s, causal, q_size, kv_size) -> int:
    """Kv tiles visited along one dim, summed over every group and query tile."""
    total = 0
    for g in range(dil):
        ng = (n - g + dil - 1) // dil
        first = torch.arange(0, ng, q_size)
        last = torch.clamp(first + q_size, max=ng) - 1
        lo, hi, _, _ = na_key_range(first, last, ng, k, s, causal, TorchOps)
        lo, hi = torch.clamp(lo, min=0), torch.clamp(hi, max=ng - 1)
        total += int((torch.div(hi, kv_size, rounding_mode="floor")
                      - torch.div(lo, kv_size, rounding_mode="floor") + 1).sum())
    return total


def choose_tiling(node: Neighborhood, length: int, forward, others
                  ) -> tuple[GridTiling, GridTiling] | None:
    """The (query, key) tilings whose forward tiles visit the fewest kv tiles for
    ``node``; ``forward`` and ``others`` are the TileConfigs of every kind that will
    walk it (all tiles of a side are multiples of that side's smallest)."""
    configs = [forward, *others]
    t_q = min(c.block_m for c in configs)
    t_kv = min(c.block_n for c in configs)
    ratio_q, ratio_kv = forward.block_m // t_q, forward.block_n // t_kv
    extents = tuple(-(-n // d) for n, d in zip(node.shape, node.dilation))
    best = None
    for qb in _boxes(forward.block_m, extents, ratio_q):
        for kb in _boxes(forward.block_n, extents, ratio_kv):
            cost = math.prod(_dim_visits(n, d, k, s, c, a, b) for n, d, k, s, c, a, b in zip(
                node.shape, node.dilation, node.kernel, node.stride, node.causal, qb, kb))
            if best is None or cost < best[0]:
                best = (cost, qb, kb)
    if best is None:
        return None
    _, qb, kb = best
    q_tile = qb[:-1] + (qb[-1] // ratio_q,)
    kv_tile = kb[:-1] + (kb[-1] // ratio_kv,)
    q_multiple = max(c.block_m for c in configs) // t_q
    kv_multiple = max(c.block_n for c in configs) // t_kv
    return (GridTiling(node.shape, node.dilation, q_tile, q_multiple, length),
            GridTiling(node.shape, node.dilation, kv_tile, kv_multiple, length))
