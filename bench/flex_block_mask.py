"""Time ``sf.create_block_mask`` (block tables from closed-form tile bounds) against
FlexAttention's ``create_block_mask`` (the mask_mod evaluated over every block), eager and
``torch.compile``d (what Flex recommends at long lengths), on CPU.

    python bench/flex_block_mask.py [--lengths 1024,4096,16384] [--repeats 5]
                                    [--flex-max-length 32768]

All return a Flex ``BlockMask`` with equal block counts (checked here too). The first
call at each length also traces the function once (sparseforge), warms Flex's vmap, or
compiles Flex's (``flex_compiled_first_ms``, reported apart); the median of
``--repeats`` warm calls is reported. Writes ``bench/results/flex_block_mask_cpu.json``.
Flex's eager CPU ``create_block_mask`` materialises the dense grid: the 24 GB dev VM had
9 GB in use during its call at L = 32k (``free -g``), and the grid grows with L^2, so
lengths above ``--flex-max-length`` time eager Flex not at all (compiled Flex fuses the
grid away and runs at every length).
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
    return warm_and_median_ms(fn, repeats)[1]


def warm_and_median_ms(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` warm calls), in ms."""
    t = time.perf_counter()
    fn()  # warm: tracing, vmap, compiling
    first = (time.perf_counter() - t) * 1e3
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return first, statistics.median(times)


def same_blocks(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("kv_num_blocks", "full_kv_num_blocks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flex-max-length", type=int, default=32768)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "flex_block_mask_cpu.json"))
    args = parser.parse_args()
    compiled = torch.compile(flex.create_block_mask)
    rows = []
    for mask_mod in (causal, sliding_window, dilated_band):
        for length in map(int, args.lengths.split(",")):
            def ours(m=mask_mod, n=length):
                return sf.create_block_mask(m, None, None, n, n, device="cpu")

            def theirs(m=mask_mod, n=length):
                return flex.create_block_mask(m, None, None, n, n, device="cpu")

            def theirs_compiled(m=mask_mod, n=length):
                return compiled(m, None, None, n, n, device="cpu")

            row = {"mask": mask_mod.__name__, "length": length,
                   "sparseforge_ms": median_ms(ours, args.repeats)}
            first, row["flex_compiled_ms"] = warm_and_median_ms(theirs_compiled, args.repeats)
            row["flex_compiled_first_ms"] = first
            row["equal_block_counts"] = same_blocks(ours(), theirs_compiled())
            if length > args.flex_max_length:
                row["flex_ms"] = None
                row["flex_not_run"] = "eager: dense grid grows with L^2 (9 GB in use at 32k)"
                eager = "not run"
            else:
                row["flex_ms"] = median_ms(theirs, args.repeats)
                row["equal_block_counts"] &= same_blocks(ours(), theirs())
                eager = f"{row['flex_ms']:9.2f} ms"
            rows.append(row)
            print(f"{row['mask']:15s} L={length:6d}  sparseforge {row['sparseforge_ms']:8.2f} ms"
                  f"  Flex compiled {row['flex_compiled_ms']:9.2f} ms (first {first / 1e3:.1f} s)"
                  f"  Flex eager {eager}  equal blocks: {row['equal_block_counts']}")
    result = {"device": f"cpu ({_cpu_name()}, {os.cpu_count()} cores), no GPU",
              "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
              "triton": triton.__version__, "sparseforge": sf.__version__,
              "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
