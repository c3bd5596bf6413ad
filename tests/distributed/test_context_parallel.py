"""Context parallelism run for real: 2, 3 and 4 CPU processes over gloo. Each rank holds
its shard of a sequence whose length is not a multiple of the world size; the output,
lse and the q, k, v gradients of ``sfd.attention`` equal single-process
``sf.attention`` (fp32, 1e-5) for causal, sliding window + sinks, documents of uneven
lengths, a 2-D neighbourhood with a window-offset bias table, ALiBi with a
relative-position table and a pair bias, a softcap and top-k routing across ranks (GQA); every
rank receives exactly the bytes its layout plans (routed: its static needs plus the
blocks it selected, within the envelope's), and every case runs through the ordinary
plan on every part (routed: with the whole sequence's selection cut to the part), none
on original positions."""

import os
import tempfile
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparseforge as sf
import sparseforge.distributed as sfd
from sparseforge.distributed.layout import reach, self_attention_pattern
from sparseforge.distributed.routing import pooled_node, shared_buckets
from sparseforge.ir.routing import is_dynamic
from sparseforge.ir.split import envelope
from sparseforge.routing.geometry import node_buckets

L = 100  # 13 blocks of 8 tokens, the last of 4: no world size divides it
BLOCK = 8


def cases():
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([37, 11, 52]))[None]
    g = torch.Generator().manual_seed(11)
    table, bias = torch.randn(4, 9, generator=g), torch.randn(4, L, L, generator=g)
    window_table = torch.randn(4, 5, 9, generator=g)  # NATTEN's rpb on the 2-D grid
    return {
        "causal": sf.causal(),
        "window_sinks": sf.sliding_window(20) | sf.sinks(3),
        "documents": sf.documents(ids) & sf.causal(),
        "neighborhood_2d": sf.neighborhood((10, 10), (3, 5)) & sf.rel_bias(window_table),
        "positional_biases": (sf.sliding_window(24) & sf.alibi(sf.alibi_slopes(4))
                              & sf.rel_bias(table) & sf.pair_bias(bias)),
        "softcap_causal": sf.causal() & sf.softcap(2.0),
        "prefix_lm": sf.prefix_lm(30),
        "per_head": sf.per_head([sf.causal(), sf.sliding_window(10),
                                 sf.sinks(4) | sf.sliding_window(5), sf.causal()]),
        "chunks_or_dilated_window": sf.chunks(24) | sf.window(6, 0, dilation=3),
        # routed across ranks: 12-key buckets straddle the 8-token blocks (and ranks)
        "topk_blocks": (sf.causal() & sf.topk_blocks(12, 2)) | sf.sliding_window(6),
        "topk_blocks_max": sf.topk_blocks(10, 3, pool="max", share="group") & sf.causal(),
        "topk_chunks": sf.topk_chunks(torch.tensor([0, 30, 41, 77, 100]), 2) | sf.sinks(2),
    }


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, L, 8, generator=g) for h in (4, 2, 2))
    go = torch.randn(2, 4, L, 8, generator=g)
    gl = torch.randn(2, 4, L, generator=g)
    return q, k, v, go, gl


def _grads(fn, q, k, v, go, gl):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    gl = torch.where(torch.isinf(lse), 0.0, gl)
    torch.autograd.backward((out, lse), (go, gl))
    return out.detach(), lse.detach(), *(t.grad for t in leaves)


def _check_cases(rank, world, group, names):
    for n, (name, pattern) in enumerate(cases().items()):
        if name not in names:
            continue
        q, k, v, go, gl = _inputs(seed=n)
        want = _grads(partial(sf.attention, pattern=pattern, enable_gqa=True, return_lse=True,
                              backend="torch"), q, k, v, go, gl)
        layout = sfd.plan_shards(pattern, L, world, block=BLOCK)
        local = [sfd.shard(t, layout, group=group) for t in (q, k, v, go, gl)]
        sfd.counters.reset()
        got = _grads(partial(sfd.attention, pattern=pattern, layout=layout, enable_gqa=True,
                             return_lse=True, group=group), *local)
        for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            b = sfd.shard(b, layout, group=group)
            assert torch.equal(torch.isinf(a), torch.isinf(b)), (name, label)
            torch.testing.assert_close(torch.nan_to_num(a, neginf=0.0),
                                       torch.nan_to_num(b, neginf=0.0), atol=1e-5,
                                       rtol=1e-5, msg=f"{name} {label} rank {rank}/{world}")
        # bytes: each received token carries K and V rows of every batch row and kv head
        row = 2 * 2 * (8 + 8) * 4
        if is_dynamic(pattern):  # the static needs, the selected blocks, at most the envelope
            need = reach(envelope(pattern), L, BLOCK).needed(layout.blocks_of(rank))
            owner = torch.tensor(layout.owner)
            bound = sum(layout.block_len(b) for b in range(len(owner))
                        if need[b] and owner[b] != rank)
            assert layout.received_tokens(rank) * row <= sfd.counters.received
            assert sfd.counters.received <= bound * row, name
            # routing traffic: the key summaries whole, the query summaries of the buckets
            # that straddle ranks only, and the block ids asked of the owners
            node = pooled_node(self_attention_pattern(pattern))
            q_starts, k_starts = node_buckets(node, L, L, "cpu")
            shared = len(shared_buckets(layout, q_starts))
            k_buckets = k_starts.shape[-1] - 1  # [B, Hkv, C, D] sums and [B, C] counts, fp32
            summaries = 4 * (2 * 2 * k_buckets * 8 + 2 * k_buckets + 2 * 4 * shared * 8 + 2 * shared)
            asked = 8 * (world + len(owner))
            assert summaries <= sfd.counters.routing <= summaries + asked, name
        else:
            assert sfd.counters.received == layout.received_tokens(rank) * row, name
        if name == "window_sinks":  # the window before each run of blocks, one block more, sinks
            blocks = layout.blocks_of(rank)
            runs = int((blocks[0] > 0) + (blocks[1:] != blocks[:-1] + 1).sum())
            assert sfd.counters.received <= (runs * (19 + BLOCK) + BLOCK) * row
        assert sfd.counters.grad_sent == sfd.counters.received, name
        # the ordinary kernels ran every part (routed: with the whole's selection cut to it)
        assert sfd.counters.position_passes == 0 and sfd.counters.part_calls > 0, name
        full = sfd.unshard(got[0], layout, group=group)
        torch.testing.assert_close(full, want[0], atol=1e-5, rtol=1e-5)


def _worker(rank, init_file, names):
    """Four processes; world sizes 2 and 3 run on process subgroups (``group=``)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    try:
        for world in (2, 3, 4):
            group = dist.new_group(list(range(world)))  # every process takes part in making it
            if rank < world:
                _check_cases(rank, world, group, names)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_attention_equals_one_process_at_2_3_and_4_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tuple(cases())), nprocs=4, join=True)


def test_one_rank_and_bad_inputs(tmp_path):
    """World size 1 runs in this process (nothing is exchanged); wrong shapes, a layout
    for another world size or pattern, and mixed dtypes are refused by name."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        pattern = sf.sliding_window(20) | sf.sinks(3)
        q, k, v, _, _ = _inputs(seed=0)
        layout = sfd.plan_shards(pattern, L, 1, block=BLOCK)
        out = sfd.attention(q, k, v, pattern, layout, enable_gqa=True)
        torch.testing.assert_close(out, sf.attention(q, k, v, pattern, enable_gqa=True),
                                   atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="planned for world_size=2"):
            sfd.attention(q, k, v, pattern, sfd.plan_shards(pattern, L, 2, block=BLOCK),
                          enable_gqa=True)
        with pytest.raises(ValueError, match="L_local=99"):
            sfd.attention(q[:, :, 1:], k, v, pattern, layout, enable_gqa=True)
        with pytest.raises(ValueError, match="enable_gqa=True"):
            sfd.attention(q, k, v, pattern, layout)
        with pytest.raises(ValueError, match="plan_shards again"):
            sfd.attention(q, k, v, sf.causal(), layout, enable_gqa=True)
        with pytest.raises(ValueError, match="one dtype"):
            sfd.attention(q.double(), k, v, pattern, layout, enable_gqa=True)
        with pytest.raises(TypeError, match="ShardLayout"):
            sfd.attention(q, k, v, pattern, "contiguous", enable_gqa=True)
        with pytest.raises(ValueError, match="whole sequence"):
            sfd.shard(q[:, :, :50], layout)
    finally:
        dist.destroy_process_group()
