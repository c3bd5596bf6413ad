"""Where each token of a context-parallel sequence lives, and which keys each rank needs.

The sequence is cut into blocks of ``block`` tokens (the last may be shorter); a layout
gives every block an owning rank, and a rank holds the queries, keys and values of its
blocks, in ascending order. The pattern's closed-form tile bounds (``planner/ranges.py``,
as the kernels walk them, with documents and mask tables narrowed by their data as the
kernels do) give, per query block, the key blocks it visits: their count prices the
block, and the union over a rank's query blocks is exactly what the rank must receive
from each other rank. Nothing is run to find them, so a layout at 1M tokens and 64
ranks is planned on a laptop.

Four layouts are priced: contiguous (equal runs, the least traffic for local
patterns), zig-zag (rank r holds chunks r and 2W-1-r, the standard balancing for causal
masks), cost cut (contiguous runs of equal work: the prefix sum of the block costs cut
in W) and cost-balanced (the blocks, dearest first, each to the rank with the least
work so far: balances any pattern, documents of long-tailed lengths included, at the
price of scattered blocks). Among those within 5 % of the best max/mean work, the one
that moves the fewest tokens wins.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..ir.affine import data_conjuncts, drop_top_left, without_data_conjuncts
from ..ir.canonicalize import canonicalize
from ..ir.neighborhood import Neighborhood
from ..ir.nodes import Pattern, PerHead
from ..ir.routing import ThresholdBlocks, TopkChunks, is_dynamic
from ..ir.scores import strip_scores
from ..ir.split import envelope, static_part
from ..planner.data_hulls import tile_hulls
from ..planner.flex_blocks import neighborhood_block_pairs
from ..planner.ranges import environment, tile_segments
from .picture import save_png
from .routing import pooled_node

LAYOUTS = ("contiguous", "zigzag", "cost_cut", "balanced")
#: candidates whose max/mean work is within this factor of the best are compared by traffic
BALANCE_SLACK = 1.05


@dataclass(frozen=True)
class ShardLayout:
    """A planned split of a sequence over ``world_size`` ranks (``plan_shards``).

    ``owner[b]``: the rank holding block ``b`` (tokens ``[b * block, (b + 1) * block)``);
    ``cost[r]``: rank r's work, in key tiles its query blocks visit; ``needs[r][s]``:
    the key blocks rank r receives from rank s (ascending; ``needs[r][r]`` is empty); for
    a routed pattern, those its static part needs (the selected blocks join at run
    time)."""

    seq_len: int
    world_size: int
    block: int
    kind: str
    owner: tuple[int, ...]
    cost: tuple[int, ...]
    needs: tuple[tuple[tuple[int, ...], ...], ...]
    pattern: Pattern = field(repr=False, compare=False, default=None)
    #: a routed pattern: per rank, the other ranks' blocks its envelope reaches (what a
    #: selection may add to ``needs``; a query bucket straddling ranks may select blocks
    #: only its rows on another rank reach)
    reachable: tuple[frozenset, ...] = field(repr=False, compare=False, default=())
    #: the key blocks every query block may reach (the envelope's, for a routed pattern):
    #: the attention restricts each chunk of rows to their keys
    reach: Reach | None = field(repr=False, compare=False, default=None)

    @property
    def n_blocks(self) -> int:
        return len(self.owner)

    def block_len(self, b: int) -> int:
        return int(min(self.block, self.seq_len - int(b) * self.block))

    @cached_property
    def _blocks(self) -> tuple[np.ndarray, ...]:
        owner = np.asarray(self.owner)
        return tuple(np.flatnonzero(owner == r) for r in range(self.world_size))

    def blocks_of(self, rank: int) -> np.ndarray:
        """The blocks rank ``rank`` holds, ascending."""
        return self._blocks[rank]

    def token_positions(self, blocks) -> torch.Tensor:
        """int64 positions of the tokens of ``blocks``, in order."""
        parts = [torch.arange(b * self.block, b * self.block + self.block_len(b))
                 for b in blocks]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def positions(self, rank: int) -> torch.Tensor:
        """Original positions of rank ``rank``'s tokens, in its local order."""
        return self.token_positions(self.blocks_of(rank))

    def local_len(self, rank: int) -> int:
        return sum(self.block_len(b) for b in self.blocks_of(rank))

    def received_tokens(self, rank: int) -> int:
        """Key/value tokens rank ``rank`` receives from the others per attention call."""
        return sum(self.block_len(b) for s in range(self.world_size) for b in self.needs[rank][s])

    def ring_tokens(self, rank: int) -> int:
        """What a ring that passes every shard around delivers to ``rank``: every token it
        does not hold."""
        return self.seq_len - self.local_len(rank)

    @property
    def balance(self) -> float:
        """max / mean work over the ranks (1.0: perfectly balanced)."""
        mean = sum(self.cost) / self.world_size
        return max(self.cost) / mean if mean else 1.0

    def save_png(self, path) -> None:
        """Draw the layout and the exchange plan (``distributed/picture.py``)."""
        save_png(self, path)

    def describe(self) -> str:
        lines = [f"{self.kind} layout: {self.seq_len} tokens in {self.n_blocks} blocks of "
                 f"{self.block} over {self.world_size} ranks; work max/mean {self.balance:.3f}"]
        for r in range(self.world_size):
            lines.append(f"  rank {r}: {self.local_len(r)} tokens, work {self.cost[r]} tiles, "
                         f"receives {self.received_tokens(r)} tokens "
                         f"(a ring: {self.ring_tokens(r)})")
        return "\n".join(lines)


#: canonical patterns by the id of the pattern they came from (held, so the id stays its)
_canonical: dict[int, tuple[Pattern, Pattern]] = {}


def self_attention_pattern(pattern: Pattern) -> Pattern:
    """The canonical pattern for Lq = Lkv (both alignments agree), as ``plan`` reads it;
    a routed one must be routable across ranks (``routing.pooled_node``). The same
    object for the same pattern on every call, so caches keyed by it hit."""
    hit = _canonical.get(id(pattern))
    if hit is not None and hit[0] is pattern:
        return hit[1]
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern={type(pattern).__name__}: expected a sparseforge pattern")
    canonical = canonicalize(drop_top_left(canonicalize(pattern)))
    pooled_node(canonical)
    if len(_canonical) > 4096:
        _canonical.clear()
    _canonical[id(pattern)] = (pattern, canonical)
    return canonical


@dataclass(frozen=True)
class Reach:
    """Which key blocks each query block visits: per segment ``(lo, hi)`` arrays over query
    blocks (``intervals``: the tiles ``[lo, hi)``), or, for a lone N-D neighbourhood, the
    exact list of block pairs holding an allowed pair (``pairs``: query blocks, key
    blocks), where the 1-D tile hull of a grid window would take a block too many at
    each end of a halo."""

    n_blocks: int
    intervals: tuple = ()
    pairs: tuple[np.ndarray, np.ndarray] | None = None

    def costs(self) -> np.ndarray:
        """Per query block, the key tiles it visits (overlapping segments count a tile
        once, as the kernels walk it)."""
        if self.pairs is not None:
            return np.bincount(self.pairs[0], minlength=self.n_blocks)
        if not self.intervals:
            return np.zeros(self.n_blocks, dtype=np.int64)
        lo = np.stack([a for a, _ in self.intervals], 1)
        hi = np.stack([b for _, b in self.intervals], 1)
        order = np.argsort(lo, 1)
        lo, hi = np.take_along_axis(lo, order, 1), np.take_along_axis(hi, order, 1)
        reach = np.maximum.accumulate(hi, 1)  # the furthest tile an earlier interval covered
        before = np.concatenate([np.zeros((self.n_blocks, 1), dtype=np.int64), reach[:, :-1]], 1)
        return np.maximum(0, hi - np.maximum(lo, before)).sum(1)

    def needed(self, query_blocks: np.ndarray) -> np.ndarray:
        """Bool over key blocks: visited by some block of ``query_blocks``."""
        if self.pairs is not None:
            mine = np.zeros(self.n_blocks, dtype=bool)
            mine[query_blocks] = True
            need = np.zeros(self.n_blocks, dtype=bool)
            need[self.pairs[1][mine[self.pairs[0]]]] = True
            return need
        diff = np.zeros(self.n_blocks + 1, dtype=np.int64)
        for lo, hi in self.intervals:
            lo, hi = lo[query_blocks], hi[query_blocks]
            keep = hi > lo
            np.add.at(diff, lo[keep], 1)
            np.add.at(diff, hi[keep], -1)
        return np.cumsum(diff[:-1]) > 0


def reach(pattern: Pattern, seq_len: int, block: int) -> Reach:
    """The key blocks each query block of ``pattern`` visits (``Reach``): the closed-form
    tile bounds of every distinct head pattern, narrowed to the tiles holding pairs of
    its documents and mask tables (any batch row), or a lone neighbourhood's block pairs."""
    canonical = self_attention_pattern(pattern)
    if is_dynamic(canonical):  # what is allowed whatever is selected (the selection: at run time)
        canonical = static_part(canonical)
    heads = tuple(dict.fromkeys(canonical.patterns if isinstance(canonical, PerHead)
                                else (canonical,)))  # a rank serves every head
    tiles = -(-seq_len // block)
    if len(heads) == 1 and isinstance(strip_scores(heads[0]), Neighborhood):
        pairs = neighborhood_block_pairs(strip_scores(heads[0]), seq_len, seq_len, block)
        if pairs is not None:
            return Reach(tiles, pairs=(pairs[0].numpy(), pairs[1].numpy()))
    env = environment(seq_len, seq_len, block, block)
    out = []
    for head in heads:
        mask = strip_scores(head)
        hull = None
        if data_conjuncts(mask):
            h = tile_hulls(mask, seq_len, seq_len, block, block, False, "cpu").numpy()
            hull = (h[..., 0].min(0), h[..., 1].max(0))
        for seg in tile_segments(without_data_conjuncts(mask)):
            for lo, hi, _, _ in seg.run_bounds(env):
                lo = np.broadcast_to(np.asarray(lo, dtype=np.int64), (tiles,)).copy()
                hi = np.broadcast_to(np.asarray(hi, dtype=np.int64), (tiles,)).copy()
                if hull is not None:
                    lo, hi = np.maximum(lo, hull[0]), np.minimum(hi, hull[1])
                out.append((lo, np.maximum(hi, lo)))
    return Reach(tiles, tuple(out))


def _selected_cost(pattern: Pattern, seq_len: int, block: int) -> np.ndarray:
    """A routed pattern's expected work on its selected buckets per query block (the
    selection is made at run time): k buckets of the rule's mean size, in key tiles,
    at most what its envelope allows; coverage rules are priced at their envelope."""
    canonical = self_attention_pattern(pattern)
    node = pooled_node(canonical)
    n_blocks = -(-seq_len // block)
    if node is None:
        return np.zeros(n_blocks, dtype=np.int64)
    bound = reach(envelope(canonical), seq_len, block).costs()
    if isinstance(node, ThresholdBlocks):
        return bound
    bucket = (seq_len / max(1, node.boundaries.shape[-1] - 1) if isinstance(node, TopkChunks)
              else node.block)
    return np.minimum(bound, node.k * (math.ceil(bucket / block) + 1))


def _contiguous(n_blocks: int, world: int) -> np.ndarray:
    return (np.arange(n_blocks) * world) // max(n_blocks, 1)


def _zigzag(n_blocks: int, world: int) -> np.ndarray:
    chunk = (np.arange(n_blocks) * 2 * world) // max(n_blocks, 1)  # 2W equal chunks
    return np.where(chunk < world, chunk, 2 * world - 1 - chunk)


def _cost_cut(costs: np.ndarray, world: int) -> np.ndarray:
    """Contiguous runs of about equal work: block b goes to the rank whose share of the
    total its work so far (up to its middle) falls in."""
    total = max(int(costs.sum()), 1)
    middle = np.cumsum(costs) - costs / 2
    return np.minimum((middle * world / total).astype(np.int64), world - 1)


def _balanced(costs: np.ndarray, world: int) -> np.ndarray:
    """Dearest block first, each to the rank with the least work so far (ties: fewer
    blocks, then the lower rank): longest-processing-time scheduling."""
    owner = np.zeros(len(costs), dtype=np.int64)
    heap = [(0, 0, r) for r in range(world)]
    for b in np.argsort(-costs, kind="stable"):
        work, count, r = heapq.heappop(heap)
        owner[b] = r
        heapq.heappush(heap, (work + int(costs[b]), count + 1, r))
    return owner


def _layout(kind: str, owner: np.ndarray, costs: np.ndarray, visits: Reach, seq_len: int,
            world: int, block: int, pattern) -> ShardLayout:
    cost = tuple(int(costs[owner == r].sum()) for r in range(world))
    needs = []
    for r in range(world):
        need = visits.needed(np.flatnonzero(owner == r))
        needs.append(tuple(tuple(int(b) for b in np.flatnonzero(need & (owner == s)))
                           if s != r else () for s in range(world)))
    reachable, whole = (), visits
    if is_dynamic(pattern):
        whole = reach(envelope(self_attention_pattern(pattern)), seq_len, block)
        reachable = tuple(frozenset(int(b) for b in np.flatnonzero(
            whole.needed(np.flatnonzero(owner == r)) & (owner != r))) for r in range(world))
    return ShardLayout(seq_len, world, block, kind, tuple(int(o) for o in owner), cost,
                       tuple(needs), pattern, reachable, whole)


def plan_shards(pattern: Pattern, seq_len: int, world_size: int, *, block: int = 128,
                layout: str | None = None) -> ShardLayout:
    """Split a sequence of ``seq_len`` tokens over ``world_size`` ranks for ``pattern``
    (self-attention: queries and keys are the same tokens). ``block``: tokens per block,
    the unit of placement and of exchange; ``layout``: force one of ``LAYOUTS`` instead
    of choosing (see the module docstring)."""
    for name, value, least in (("seq_len", seq_len, 1), ("world_size", world_size, 1),
                               ("block", block, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"plan_shards({name}={value!r}): expected an int >= {least}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"plan_shards(layout={layout!r}): expected None or one of "
                         f"{', '.join(LAYOUTS)}")
    n_blocks = -(-seq_len // block)
    if n_blocks < world_size:
        raise ValueError(f"plan_shards: {seq_len} tokens in blocks of {block} make {n_blocks} "
                         f"blocks, fewer than world_size={world_size}; use a smaller block")
    visits = reach(pattern, seq_len, block)
    costs = visits.costs() + _selected_cost(pattern, seq_len, block)
    owners = {"contiguous": _contiguous(n_blocks, world_size),
              "zigzag": _zigzag(n_blocks, world_size),
              "cost_cut": _cost_cut(costs, world_size),
              "balanced": _balanced(costs, world_size)}
    kinds = LAYOUTS if layout is None else (layout,)
    candidates = [_layout(k, owners[k], costs, visits, seq_len, world_size, block, pattern)
                  for k in kinds]
    best = min(c.balance for c in candidates)
    fair = [c for c in candidates if c.balance <= best * BALANCE_SLACK]
    return min(fair, key=lambda c: sum(c.received_tokens(r) for r in range(world_size)))
