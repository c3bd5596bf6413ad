"""What FlexAttention's BlockMask would visit for the same mask, for ``plan.explain()``.

``create_block_mask`` keeps every 128 x 128 block (its default) holding an allowed pair,
in the original token order, and skips the mask function only on blocks where every
pair is allowed. Counting those blocks from the dense mask gives the tiles Flex visits
and its tile utilisation, to set beside the plan's own (which may permute tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir.neighborhood import (
    Neighborhood,
    dilation_group,
    grid_coordinate,
    group_extent,
    na_key_range,
)
from ..ir.nodes import PerHead
from ..ir.ops import TorchOps
from ..semantics import pair_mask

FLEX_BLOCK = 128
#: above this many (query, key) pairs the comparison is skipped: it evaluates the mask
MAX_PAIRS = 1 << 26


@dataclass(frozen=True)
class FlexBlocks:
    visited: int  # blocks holding an allowed pair
    full: int  # blocks where every pair is allowed
    useful_pairs: int
    block: int

    @property
    def utilisation(self) -> float:
        computed = self.visited * self.block * self.block
        return self.useful_pairs / computed if computed else 1.0


def flex_blocks(pattern, q_len: int, kv_len: int, block: int = FLEX_BLOCK) -> FlexBlocks | None:
    """Block counts of a single-head mask (the first head of a ``per_head``), or None
    when the problem is too large to evaluate: a lone neighbourhood by listing its
    allowed pairs, anything else densely."""
    if q_len == 0 or kv_len == 0:
        return None
    if isinstance(pattern, PerHead):
        pattern = pattern.patterns[0]
    if isinstance(pattern, Neighborhood):
        return _neighborhood_blocks(pattern, q_len, kv_len, block)
    if q_len * kv_len > MAX_PAIRS:
        return None
    return _dense_blocks(pattern, q_len, kv_len, block)


def _dense_blocks(pattern, q_len: int, kv_len: int, block: int) -> FlexBlocks:
    """Counts from the dense mask, one row of blocks at a time."""
    kv_blocks = -(-kv_len // block)
    j = torch.arange(kv_blocks * block)
    visited = full = useful = 0
    for start in range(0, q_len, block):
        i = torch.arange(start, start + block)
        m = pair_mask(pattern, i[:, None], j[None, :], q_len, kv_len)
        m = m & (i < q_len)[:, None] & (j < kv_len)[None, :]
        if m.dim() == 3:  # batched document ids: the first sequence
            m = m[0]
        per_block = m.view(block, kv_blocks, block)
        visited += int(per_block.any(2).any(0).sum())
        full += int(per_block.all(2).all(0).sum())
        useful += int(m.sum())
    return FlexBlocks(visited, full, useful, block)


def _window_coordinates(x: torch.Tensor, n: int, k: int, d: int, s: int, causal: bool):
    """Per query coordinate ``x`` (one dimension), its kept key coordinates ``[X, k]`` and
    which of them exist (a causal window near the start holds fewer)."""
    g, i = dilation_group(x, d, TorchOps)
    ng = group_extent(n, d, g, TorchOps)
    lo, hi, _, _ = na_key_range(i, i, ng, k, s, causal, TorchOps)
    lo, hi = torch.clamp(lo, min=0), torch.minimum(hi, ng - 1)
    t = torch.arange(k)
    return (lo[:, None] + t) * d + g[:, None], (lo[:, None] + t) <= hi[:, None]


def _neighborhood_blocks(pattern: Neighborhood, q_len: int, kv_len: int,
                         block: int) -> FlexBlocks | None:
    """The BlockMask counts of a neighbourhood from its allowed pairs, listed query by
    query (the rule keeps at most ``prod(kernel)`` keys per query): exact, and linear
    in the sequence where the dense count is quadratic (a 16x64x64 video grid)."""
    pairs = neighborhood_block_pairs(pattern, q_len, kv_len, block)
    if pairs is None:
        return None
    q_of, kv_of, counts = pairs
    whole = ((q_of + 1) * block <= q_len) & ((kv_of + 1) * block <= kv_len)
    full = int(((counts == block * block) & whole).sum())
    return FlexBlocks(len(q_of), full, int(counts.sum()), block)


def neighborhood_block_pairs(pattern: Neighborhood, q_len: int, kv_len: int, block: int):
    """``(query block, key block, allowed pairs)`` int64 vectors, one entry per block pair
    holding an allowed pair of a lone neighbourhood, from its pairs listed query by query;
    None past ``MAX_PAIRS`` pairs."""
    delta = kv_len - q_len
    first = max(0, -delta)
    rows = torch.arange(first, max(first, min(q_len, pattern.size - delta)))  # grid queries
    if len(rows) * math.prod(pattern.kernel) > MAX_PAIRS:
        return None
    p = rows + delta
    keys = torch.zeros(len(rows), 1, dtype=torch.long)
    kept = torch.ones(len(rows), 1, dtype=torch.bool)
    for dim, stride in enumerate(pattern.row_strides):
        x = grid_coordinate(p, pattern.shape, dim, TorchOps)
        coords, ok = _window_coordinates(x, pattern.shape[dim], pattern.kernel[dim],
                                         pattern.dilation[dim], pattern.stride[dim],
                                         pattern.causal[dim])
        keys = (keys[:, :, None] + coords[:, None, :] * stride).flatten(1)
        kept = (kept[:, :, None] & ok[:, None, :]).flatten(1)
    q_block = torch.div(rows, block, rounding_mode="floor")[:, None].expand_as(keys)[kept]
    kv_blocks = -(-kv_len // block)
    ids, counts = torch.unique(q_block * kv_blocks + torch.div(keys[kept], block, rounding_mode="floor"),
                               return_counts=True)
    return torch.div(ids, kv_blocks, rounding_mode="floor"), ids % kv_blocks, counts
