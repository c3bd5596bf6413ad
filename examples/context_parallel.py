"""Context parallelism with sparseforge.distributed: one sequence split over 4 CPU
processes (gloo), each attending its shard and receiving only the keys its queries
reach, against one process attending the whole sequence.

    torchrun --nproc-per-node 4 examples/context_parallel.py
    python examples/context_parallel.py          # spawns the 4 processes itself

For each pattern it prints the layout plan_shards chose (work per rank, tokens received
against a ring that passes every shard), how the ranks attended (sf.attention on each
part of their queries and keys, the pattern rewritten over the part; routing with the
whole sequence's selection cut to each part), then checks the output and the q, k, v
gradients against single-process sf.attention.
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparseforge as sf
import sparseforge.distributed as sfd

LENGTH, BLOCK = 1000, 16  # 63 blocks: no world size divides them


def patterns():
    docs = torch.repeat_interleave(torch.arange(4), torch.tensor([410, 60, 300, 230]))[None]
    return {
        "causal": sf.causal(),
        "sliding window 64 + 4 sinks": sf.sliding_window(64) | sf.sinks(4),
        "4 documents, causal": sf.documents(docs) & sf.causal(),
        "2-D neighbourhood 20x50, 5x7": sf.neighborhood((20, 50), (5, 7)),
        "sliding window 64 with ALiBi": sf.sliding_window(64) & sf.alibi(sf.alibi_slopes(4)),
        "MoBA-style top-3 of 64-token blocks": ((sf.causal() & sf.topk_blocks(64, 3))
                                                | (sf.causal() & sf.chunks(64))),
    }


def run(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, LENGTH, 32, generator=g)
    k, v = (torch.randn(1, 2, LENGTH, 32, generator=g) for _ in range(2))
    for name, pattern in patterns().items():
        layout = sfd.plan_shards(pattern, LENGTH, world, block=BLOCK)
        leaves = [sfd.shard(t, layout).requires_grad_() for t in (q, k, v)]
        sfd.counters.reset()
        out = sfd.attention(*leaves, pattern, layout, enable_gqa=True)
        out.square().sum().backward()
        received = torch.tensor([sfd.counters.received])
        dist.all_reduce(received)
        calls = torch.tensor([sfd.counters.part_calls, sfd.counters.position_passes])
        dist.all_reduce(calls)
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = sf.attention(*whole, pattern, enable_gqa=True)
        ref.square().sum().backward()
        worst = max((a - sfd.shard(b, layout)).abs().max().item()
                    for a, b in zip((out, *(t.grad for t in leaves)),
                                    (ref, *(t.grad for t in whole))))
        worst = torch.tensor([worst])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            ring = sum(layout.ring_tokens(r) for r in range(world))
            kv_bytes = 2 * 2 * 32 * 4  # K and V, 2 kv heads, 32 dims, fp32
            print(f"\n{name}: {layout.kind} layout, work max/mean {layout.balance:.3f}")
            print(f"  tokens per rank {[layout.local_len(r) for r in range(world)]}, "
                  f"work per rank {list(layout.cost)} tiles")
            print(f"  K/V received by all ranks: {int(received) // kv_bytes} tokens "
                  f"(a ring: {ring})")
            print(f"  attention: {int(calls[0])} sf.attention calls on parts, "
                  f"{int(calls[1])} passes on original positions (all ranks)")
            print(f"  max abs difference to one process (out, dq, dk, dv): {float(worst):.2e}")


def _spawned(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        run(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(4, os.path.join(tmp, "init")), nprocs=4, join=True)
