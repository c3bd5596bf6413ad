"""Planned context-parallel layouts at sizes no test runs: work balance and the key/value
tokens each rank receives, against a ring that passes every shard. Nothing is run on a
device: the numbers come from ``sparseforge.distributed.plan_shards`` (the pattern's
closed-form tile bounds), so they hold for any accelerator.

    python bench/context_parallel_plan.py --out bench/results/context_parallel_plan.json
"""

import argparse
import json
import platform
import time

import torch

import sparseforge as sf
import sparseforge.distributed as sfd


def long_tailed_documents(length: int, seed: int) -> torch.Tensor:
    """Document ids with Pareto-tailed lengths (many short documents, a few long ones)."""
    g = torch.Generator().manual_seed(seed)
    lens = (torch.rand(1 << 14, generator=g) ** (-1 / 1.1) * 300).long()
    ends = torch.cumsum(lens, 0)
    lens = torch.cat([lens[ends < length], (length - ends[ends < length][-1:])])
    return torch.repeat_interleave(torch.arange(len(lens)), lens)[None]


def scenarios():
    m = 1 << 20
    yield "sliding_window_4k", sf.sliding_window(4096), m, 8
    yield "sliding_window_4k", sf.sliding_window(4096), m, 64
    yield "causal", sf.causal(), m, 8
    yield "causal", sf.causal(), m, 64
    docs = long_tailed_documents(m, seed=0)
    yield "documents_long_tailed_causal", sf.documents(docs) & sf.causal(), m, 8
    yield "documents_long_tailed_causal", sf.documents(docs) & sf.causal(), m, 64
    yield "neighborhood_2d_1024x1024_13x13", sf.neighborhood((1024, 1024), 13), m, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for name, pattern, length, world in scenarios():
        start = time.perf_counter()
        layout = sfd.plan_shards(pattern, length, world)
        seconds = time.perf_counter() - start
        received = [layout.received_tokens(r) for r in range(world)]
        ring = [layout.ring_tokens(r) for r in range(world)]
        contiguous = sfd.plan_shards(pattern, length, world, layout="contiguous")
        row = dict(pattern=name, seq_len=length, world_size=world, block=layout.block,
                   layout=layout.kind, balance=round(layout.balance, 4),
                   contiguous_balance=round(contiguous.balance, 4),
                   max_received_tokens=max(received), total_received_tokens=sum(received),
                   ring_total_tokens=sum(ring), plan_seconds=round(seconds, 2))
        rows.append(row)
        print(f"{name:34s} L={length} W={world:2d} {layout.kind:10s} max/mean {layout.balance:.3f} "
              f"(contiguous {contiguous.balance:.3f}); received {sum(received)} tokens in all, "
              f"{max(received)} at most per rank; a ring: {sum(ring)} ({seconds:.1f} s to plan)")
    if args.out:
        meta = dict(device="none: planned on the CPU from the layout, nothing run on a device",
                    machine=platform.machine(), python=platform.python_version(),
                    torch=torch.__version__, sparseforge=sf.__version__,
                    note="planned from the layout (no device run): tokens of K and V received")
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
