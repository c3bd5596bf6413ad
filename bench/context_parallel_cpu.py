"""Context-parallel attention run for real on CPU processes (gloo): forward and
forward+backward time per call of ``sfd.attention`` with each part through
``sf.attention`` (the plan and its executor: what runs by default) against the same call
evaluated on original positions (``attend_at``, the path patterns without a part form
take), beside one process's ``sf.attention`` on the whole sequence. Every rank checks its
output against the one-process result before timing.

Ranks share this machine's cores (one thread each), so the numbers compare the two
per-rank paths; they are not a scaling measurement. Multi-GPU timings need a machine
with several GPUs and were not run.

    python bench/context_parallel_cpu.py --world 2 --out bench/results/context_parallel_cpu.json
"""

import argparse
import importlib
import json
import os
import platform
import queue as queues
import statistics
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparseforge as sf
import sparseforge.distributed as sfd

# the module, not the function ``sfd.attention`` that shadows its name in the package
cp_attention = importlib.import_module("sparseforge.distributed.attention")


def scenarios(length: int, heads: int):
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(
        [length // 2, length // 8, length // 4, length - length // 2 - length // 8 - length // 4]))
    return {
        "causal": sf.causal(),
        "sliding_window_256_sinks_4": sf.sliding_window(256) | sf.sinks(4),
        "documents_causal": sf.documents(ids[None]) & sf.causal(),
        f"neighborhood_{length // 64}x64_7x7": sf.neighborhood((length // 64, 64), 7),
        "sliding_window_256_alibi": sf.sliding_window(256) & sf.alibi(sf.alibi_slopes(heads)),
        # MoBA-style routing across ranks: 4 selected blocks of 128 keys and the local window
        "topk_blocks_128_k4_or_window_128": ((sf.causal() & sf.topk_blocks(128, 4))
                                             | sf.sliding_window(128)),
    }


def _time(fn, repeats: int) -> float:
    fn()  # plans, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _forward(local, pattern, layout):
    return sfd.attention(*local, pattern, layout)


def _train(local, pattern, layout):
    leaves = [t.clone().requires_grad_() for t in local]
    sfd.attention(*leaves, pattern, layout).sum().backward()


def _worker(rank, world, init, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, generator=g)
                   for _ in range(3))
        rows = []
        for name, pattern in scenarios(args.length, args.heads).items():
            layout = sfd.plan_shards(pattern, args.length, world)
            local = [sfd.shard(t, layout) for t in (q, k, v)]
            want = sfd.shard(sf.attention(q, k, v, pattern), layout)
            row = dict(pattern=name, layout=layout.kind)
            default = cp_attention.MAX_PART_CALLS
            for path, limit in (("parts", default), ("positions", -1)):
                cp_attention.MAX_PART_CALLS = limit  # -1: every call on original positions

                forward = partial(_forward, local, pattern, layout)
                train = partial(_train, local, pattern, layout)
                torch.testing.assert_close(forward(), want, atol=1e-5, rtol=1e-5)
                dist.barrier()
                row[f"{path}_forward_ms"] = round(_time(forward, args.repeats), 2)
                dist.barrier()
                row[f"{path}_forward_backward_ms"] = round(_time(train, args.repeats), 2)
                cp_attention.MAX_PART_CALLS = default
            if rank == 0:
                whole = partial(sf.attention, q, k, v, pattern)
                row["one_process_forward_ms"] = round(_time(whole, args.repeats), 2)
            rows.append(row)
        queue.put((rank, rows))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, args.world, os.path.join(tmp, "init"), args,
                                                     queue)) for r in range(args.world)]
        for p in procs:
            p.start()
        results = {}
        while len(results) < len(procs):
            try:
                rank, rows = queue.get(timeout=5)
                results[rank] = rows
            except queues.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit("a rank failed (its traceback is above)") from None
        for p in procs:
            p.join()
    rows = []
    for n, row in enumerate(results[0]):  # the slowest rank's time per path
        for key in row:
            if key.endswith("_ms") and not key.startswith("one_process"):
                row[key] = max(results[r][n][key] for r in results)
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=f"cpu: {platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} cores, {args.world} gloo processes "
                                  "of one thread each",
                           torch=torch.__version__, sparseforge=sf.__version__,
                           batch=1, heads=args.heads, seq_len=args.length,
                           head_dim=args.head_dim, dtype="float32",
                           timing="median of repeats, ms per call, the slowest rank",
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
