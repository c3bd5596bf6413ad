"""Shard layouts, planned (no processes): the key blocks each rank receives are exactly
those its queries reach (against the dense mask), a sliding window moves only the
window across each boundary where a ring moves every shard, and the work is balanced
for causal masks and for documents of long-tailed lengths at 8 and 64 ranks."""

import numpy as np
import pytest
import torch

import sparseforge as sf
import sparseforge.distributed as sfd
from sparseforge.ir.routing import is_dynamic

from .test_context_parallel import BLOCK, L, cases


@pytest.mark.parametrize("name", [n for n, p in cases().items() if not is_dynamic(p)])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_each_rank_receives_exactly_the_blocks_its_queries_reach(name, world):
    pattern = cases()[name]
    layout = sfd.plan_shards(pattern, L, world, block=BLOCK)
    mask = sf.dense_mask(pattern, L, L)
    mask = mask.any(0) if mask.dim() == 3 else mask  # documents: any batch row
    blocks = -(-L // BLOCK)
    padded = torch.nn.functional.pad(mask, (0, blocks * BLOCK - L, 0, blocks * BLOCK - L))
    reach = padded.view(blocks, BLOCK, blocks, BLOCK).any(3).any(1).numpy()  # [q block, k block]
    owner = np.asarray(layout.owner)
    assert sorted(np.concatenate([layout.blocks_of(r) for r in range(world)]).tolist()) == \
        list(range(blocks))
    for r in range(world):
        wanted = reach[owner == r].any(0)
        for s in range(world):
            exact = [b for b in range(blocks) if wanted[b] and owner[b] == s and s != r]
            assert list(layout.needs[r][s]) == exact, (name, r, s)


def test_a_sliding_window_at_1m_tokens_moves_only_the_window():
    """4k window, 1M tokens, 8 ranks (planned, not run): each rank receives at most the
    4095 keys before its first query plus one block, where a ring passes 7/8 of the
    sequence to every rank."""
    window, length, world = 4096, 1 << 20, 8
    layout = sfd.plan_shards(sf.sliding_window(window), length, world)
    assert layout.kind == "contiguous" and layout.balance <= 1.01
    for r in range(world):
        received = layout.received_tokens(r)
        assert received <= (window - 1) + layout.block if r else received == 0
        assert layout.ring_tokens(r) == length - layout.local_len(r) >= 7 * length // 8 - 1
    assert sum(layout.received_tokens(r) for r in range(world)) * 100 < \
        sum(layout.ring_tokens(r) for r in range(world))


def test_causal_ranks_receive_no_block_after_their_last_query():
    layout = sfd.plan_shards(sf.causal(), 1 << 16, 8, block=64)
    for r in range(8):
        last = layout.blocks_of(r).max()
        assert all(b < last for s in range(8) for b in layout.needs[r][s])


def _long_tailed_documents(length, seed):
    """Document lengths from a Pareto tail (a few long documents, many short ones)."""
    g = torch.Generator().manual_seed(seed)
    lens = (torch.rand(4096, generator=g) ** (-1 / 1.1) * 300).long()
    ends = torch.cumsum(lens, 0)
    lens = torch.cat([lens[ends < length], (length - ends[ends < length][-1:])])
    return torch.repeat_interleave(torch.arange(len(lens)), lens)[None], lens


@pytest.mark.parametrize("world", [8, 64])
def test_work_is_balanced_for_causal_and_long_tailed_documents(world):
    length = 1 << 18
    ids, lens = _long_tailed_documents(length, seed=world)
    assert lens.max() > 20 * lens.median()  # long-tailed indeed
    for pattern in (sf.causal(), sf.documents(ids) & sf.causal()):
        layout = sfd.plan_shards(pattern, length, world)
        assert layout.balance <= 1.05, (pattern, layout.kind, layout.balance)
        assert sum(layout.cost) == sum(sfd.plan_shards(pattern, length, world,
                                                       layout="contiguous").cost)


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="world_size"):
        sfd.plan_shards(sf.causal(), 100, 0)
    with pytest.raises(ValueError, match="fewer than world_size"):
        sfd.plan_shards(sf.causal(), 100, 8, block=64)
    with pytest.raises(ValueError, match="layout="):
        sfd.plan_shards(sf.causal(), 100, 2, layout="ring")
    with pytest.raises(ValueError, match="other routed patterns are not supported"):
        sfd.plan_shards(sf.vertical_slash(4, 4) & sf.causal(), 100, 2, block=8)
