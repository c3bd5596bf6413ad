"""What FlexAttention's BlockMask would visit for the same mask, for ``plan.explain()``.

``create_block_mask`` keeps every 128 x 128 block (its default) holding an allowed pair,
in the original token order, and skips the mask function only on blocks where every
pair is allowed. Counting those blocks from the dense mask gives the tiles Flex visits
and its tile utilisation, to set beside the plan's own (which may permute tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.nodes import PerHead
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
    when the problem is too large to evaluate densely."""
    if q_len * kv_len > MAX_PAIRS or q_len == 0 or kv_len == 0:
        return None
    if isinstance(pattern, PerHead):
        pattern = pattern.patterns[0]
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
