"""Time ``sf.create_block_mask`` (block tables from closed-form tile bounds) against
FlexAttention's ``create_block_mask`` (the mask_mod evaluated over every block), on CPU.

    python bench/flex_block_mask.py [--lengths 1024,4096,16384] [--repeats 5]
                                    [--flex-max-length 32768]

Both return a Flex ``BlockMask`` with equal block counts (checked here too). The first
call of a function also traces it once (sparseforge) or warms Flex's vmap: both are
excluded, the median of ``--repeats`` warm calls is reported. Writes
``bench/results/flex_block_mask_cpu.json``. Flex's CPU ``create_block_mask`` evaluates
the dense grid: the 24 GB dev VM had 9 GB in use during its call at L = 32k (``free -g``),
and the grid grows with L^2, so lengths above ``--flex-max-length`` time sparseforge alone
and record why Flex was not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import flex_attention as flex

import sparseforge as sf


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 1024)


def dilated_band(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx) % 4 == 0) & ((q_idx - kv_idx).abs() <= 256)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm: tracing, vmap
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flex-max-length", type=int, default=32768)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "flex_block_mask_cpu.json"))
    args = parser.parse_args()
    rows = []
    for mask_mod in (causal, sliding_window, dilated_band):
        for length in map(int, args.lengths.split(",")):
            def ours(m=mask_mod, n=length):
                return sf.create_block_mask(m, None, None, n, n, device="cpu")

            def theirs(m=mask_mod, n=length):
                return flex.create_block_mask(m, None, None, n, n, device="cpu")

            if length > args.flex_max_length:
                row = {"mask": mask_mod.__name__, "length": length,
                       "sparseforge_ms": median_ms(ours, args.repeats), "flex_ms": None,
                       "equal_block_counts": None,
                       "flex_not_run": "dense grid grows with L^2: 9 GB in use at 32k on this VM"}
                rows.append(row)
                print(f"{row['mask']:15s} L={length:6d}  sparseforge {row['sparseforge_ms']:8.2f} ms"
                      "  Flex not run (dense grid too large for this machine)")
                continue
            a, b = ours(), theirs()
            same = all(torch.equal(getattr(a, f), getattr(b, f))
                       for f in ("kv_num_blocks", "full_kv_num_blocks"))
            row = {"mask": mask_mod.__name__, "length": length,
                   "sparseforge_ms": median_ms(ours, args.repeats),
                   "flex_ms": median_ms(theirs, args.repeats), "equal_block_counts": same}
            rows.append(row)
            print(f"{row['mask']:15s} L={length:6d}  sparseforge {row['sparseforge_ms']:8.2f} ms"
                  f"  Flex {row['flex_ms']:8.2f} ms  equal blocks: {same}")
    result = {"device": f"cpu ({_cpu_name()}, {os.cpu_count()} cores), no GPU",
              "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
              "triton": triton.__version__, "sparseforge": sf.__version__,
              "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
