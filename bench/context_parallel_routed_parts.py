"""How many part calls a routed pattern makes per rank under context parallelism, with
the received blocks attended run by run against in spans with small gaps filled
(``sparseforge.distributed.attention.filled_spans``), at sizes no test runs.

The selection is real: one process routes the whole sequence of random q and k with the
torch rules (what every rank's share of ``route_across`` equals), then each rank's
received blocks (its static needs plus the blocks its query buckets selected, within
the envelope) are laid out as ``sfd.attention`` lays them out, and the part calls
``part_calls`` would make are counted. Nothing is attended and no device is used; a
rank falls back to original positions above ``MAX_PART_CALLS`` calls.

    python bench/context_parallel_routed_parts.py --out bench/results/context_parallel_routed_parts.json
"""

import argparse
import importlib
import json
import platform

import numpy as np
import torch

import sparseforge as sf
import sparseforge.distributed as sfd
from sparseforge.distributed.layout import self_attention_pattern
from sparseforge.distributed.routing import selected_blocks
from sparseforge.routing.rules import route

# the module, not the function ``sfd.attention`` that shadows its name in the package
cp_attention = importlib.import_module("sparseforge.distributed.attention")


def scenarios():
    moba = (sf.causal() & sf.topk_blocks(512, 3)) | (sf.causal() & sf.chunks(512))
    yield "moba_top3_of_512", moba, 1 << 17, 8
    yield "moba_top3_of_512", moba, 1 << 17, 32
    nsa = (sf.causal() & sf.topk_blocks(64, 16)) | sf.sliding_window(512)
    yield "nsa_top16_of_64_window_512", nsa, 1 << 17, 8


def count(pattern, length: int, world: int, heads: int, head_dim: int) -> dict:
    canonical = self_attention_pattern(pattern)
    layout = sfd.plan_shards(pattern, length, world)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(2))
    selection, = route(canonical, q, k, head_dim ** -0.5).values()
    runs, spans, calls_runs, calls_spans, received, filled = [], [], [], [], [], []
    for rank in range(world):
        mine = layout.blocks_of(rank)
        chosen = selected_blocks(selection, layout.positions(rank), length, layout.block)
        chosen &= layout.reachable[rank]
        arrived = sorted({b for s in range(world) for b in layout.needs[rank][s]} | chosen)
        blocks, _ = cp_attention.filled_spans(layout, arrived, rank)
        runs.append(len(cp_attention.runs(layout, arrived)))
        spans.append(len(cp_attention.runs(layout, blocks)))
        for out, keys in ((calls_runs, arrived), (calls_spans, blocks)):
            calls = cp_attention.part_calls(canonical, layout, mine, np.asarray(keys))
            out.append(sum(len(parts) for _, _, parts in calls))
        received.append(sum(layout.block_len(b) for b in arrived))
        filled.append(sum(layout.block_len(b) for b in blocks) - received[-1])
    return dict(layout=layout.kind, block=layout.block, max_key_runs=max(runs),
                max_spans=max(spans), max_part_calls_by_runs=max(calls_runs),
                max_part_calls_by_spans=max(calls_spans),
                max_received_tokens=max(received), max_filled_tokens=max(filled),
                max_part_calls_allowed=cp_attention.MAX_PART_CALLS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for name, pattern, length, world in scenarios():
        row = dict(pattern=name, seq_len=length, world_size=world,
                   **count(pattern, length, world, args.heads, args.head_dim))
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=f"cpu: {platform.processor() or platform.machine()} (counts "
                                   "only, nothing attended)",
                           torch=torch.__version__, sparseforge=sf.__version__,
                           heads=args.heads, head_dim=args.head_dim,
                           inputs="random normal q and k, seed 0; the torch routing rules",
                           gap_blocks=cp_attention.GAP_BLOCKS, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
