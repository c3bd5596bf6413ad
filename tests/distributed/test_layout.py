"""Shard layouts, planned (no processes): the key blocks each rank receives are exactly
those its queries reach (against the dense mask), a sliding window moves only the
window across each boundary where a ring moves every shard, and the work is balanced
for causal masks and for documents of long-tailed lengths at 8 and 64 ranks."""

import importlib

import numpy as np
import pytest
import torch

import sparseforge as sf
import sparseforge.distributed as sfd
from sparseforge.distributed.routing import shared_buckets
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.ir.nodes import walk
from sparseforge.ir.routing import DynamicPattern, is_dynamic
from sparseforge.ir.split import static_siblings
from sparseforge.routing.geometry import node_buckets
from sparseforge.routing.rules import pool, select_pooled

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


@pytest.mark.parametrize("pattern", [sf.topk_blocks(12, 2) & sf.causal(),
                                     sf.threshold_blocks(10, 0.6, share="group"),
                                     sf.topk_chunks(torch.tensor([0, 30, 41, 77, 100]), 2)])
def test_a_rank_scores_only_its_query_buckets_and_selects_as_one_process(pattern):
    """``select_pooled(rows=...)``: the served rows select exactly what the whole
    selection does, the others nothing."""
    canonical = canonicalize(pattern)
    node = next(n for n in walk(canonical) if isinstance(n, DynamicPattern))
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g)
    q_starts, k_starts = node_buckets(node, L, L, q.device)
    qbar, _ = pool(q, torch.arange(L), q_starts)
    kbar, _ = pool(k, torch.arange(L), k_starts)
    args = (node, static_siblings(canonical, node), qbar, kbar, q_starts, k_starts, L, L, 0.3)
    whole = select_pooled(*args).selected
    rows = torch.tensor([1, 3])
    served = select_pooled(*args, rows=rows).selected
    assert whole[:, :, rows].any()
    assert torch.equal(served[:, :, rows], whole[:, :, rows])
    others = torch.ones(whole.shape[2], dtype=torch.bool)
    others[rows] = False
    assert not served[:, :, others].any()


def test_only_the_query_buckets_that_straddle_ranks_are_shared():
    """Of the query summaries, a rank needs only its own buckets; those lying in one rank
    need nothing from the others, so only straddling buckets are reduced."""
    pattern = sf.causal() & sf.topk_blocks(12, 2)
    layout = sfd.plan_shards(pattern, 100, 2, block=8, layout="contiguous")
    starts = torch.arange(0, 109, 12).clamp(max=100)[None]  # 12-token buckets, the last short
    boundary = int(layout.positions(1).min())  # contiguous: rank 1 starts here
    shared = shared_buckets(layout, starts)
    assert shared.tolist() == ([boundary // 12] if boundary % 12 else [])
    assert shared_buckets(layout, starts) is shared  # kept for the next step
    alone = sfd.plan_shards(pattern, 100, 1, block=8)
    assert shared_buckets(alone, starts).numel() == 0
    zigzag = sfd.plan_shards(pattern, 100, 2, block=8, layout="zigzag")
    mixed = shared_buckets(zigzag, starts)
    assert 0 < mixed.numel() < starts.shape[-1] - 1


def test_received_runs_become_spans_over_small_gaps_of_other_ranks():
    """``filled_spans``: the received blocks ascending, with gaps of at most
    ``GAP_BLOCKS`` blocks of other ranks filled (never across a block this rank holds,
    never a longer gap); every received token keeps its row, gap tokens point one past
    the last row (the zero row)."""
    cp = importlib.import_module("sparseforge.distributed.attention")
    layout = sfd.plan_shards(sf.causal() & sf.topk_blocks(8, 2), 200, 3, block=8,
                             layout="zigzag")
    rank = 1
    held = set(layout.blocks_of(rank).tolist())
    others = [b for b in range(layout.n_blocks) if b not in held]
    g = np.random.default_rng(0)
    for _ in range(20):
        arrived = list(g.choice(others, size=g.integers(1, len(others)), replace=False))
        blocks, rows = cp.filled_spans(layout, arrived, rank)
        assert blocks == sorted(blocks) and set(arrived) <= set(blocks)
        gaps = [b for b in blocks if b not in arrived]
        assert not held & set(gaps)
        for a, b in zip(sorted(arrived), sorted(arrived)[1:]):
            between = set(range(a + 1, b))
            filled = between <= set(blocks)
            assert filled == (len(between) <= cp.GAP_BLOCKS and not between & held), (a, b)
        received = layout.token_positions(arrived)  # positions in the order they came
        pad = len(received)
        at = dict(zip(received.tolist(), range(pad)))
        want = [at.get(p, pad) for p in layout.token_positions(blocks).tolist()]
        assert rows.tolist() == want
