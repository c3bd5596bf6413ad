"""Peak memory and time of one forward + backward of a MoBA layer on the torch path, on CPU.

    python bench/routed_train_memory.py [--lengths 16384,65536] [--path gathered|rows]

The layer: ``(causal & topk_blocks(512, 3, query_block=1)) | (causal & chunks(512))``
(each token picks its top-3 blocks, beside its own block, causal), B = 1, H = 8, D = 64,
fp32, random q/k/v, ``backend="torch"``. Each length runs in a fresh process, which
reports its peak resident memory (``ru_maxrss``) after creating the inputs and after
the step; the difference is what the step needed on top of its inputs. ``--path rows``
forces the row-chunk path (every key per chunk of rows, probabilities kept for the
backward) to compare at lengths it can hold. Writes
``bench/results/routed_train_memory_cpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import sparseforge as sf


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_step(length: int, path: str) -> dict:
    """Run in this process: inputs, then one forward + backward; peaks and times."""
    if path == "rows":  # the row-chunk path: no gathering
        from sparseforge.runtime import routed_torch
        routed_torch.gathered_routed_attention = lambda *args: None
    torch.manual_seed(0)
    pattern = ((sf.causal() & sf.topk_blocks(512, 3, query_block=1))
               | (sf.causal() & sf.chunks(512)))
    q, k, v = (torch.randn(1, 8, length, 64, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 8, length, 64)
    inputs = _peak_mib()
    t = time.perf_counter()
    out = sf.attention(q, k, v, pattern, backend="torch")
    forward = time.perf_counter() - t
    out.backward(grad)
    total = time.perf_counter() - t
    return {"length": length, "path": path, "peak_rss_mib": _peak_mib(),
            "peak_rss_after_inputs_mib": inputs, "step_mib": _peak_mib() - inputs,
            "forward_s": forward, "forward_backward_s": total,
            "finite": bool(torch.isfinite(out).all() and torch.isfinite(q.grad).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--path", choices=("gathered", "rows"), default="gathered")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "routed_train_memory_cpu.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.one, args.path)))
        return
    rows = []
    for length in map(int, args.lengths.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one", str(length), "--path", args.path],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"L={length:6d} {args.path:8s} step {row['step_mib']:8.0f} MiB (peak RSS "
              f"{row['peak_rss_mib']:.0f} MiB)  forward {row['forward_s']:.1f} s, forward + "
              f"backward {row['forward_backward_s']:.1f} s")
    result = {"device": f"cpu ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores), no GPU",
              "what": "one forward+backward of a MoBA layer, torch path, fp32, B=1 H=8 D=64",
              "torch": torch.__version__, "sparseforge": sf.__version__, "rows": rows}
    out = Path(args.out)
    previous = json.loads(out.read_text())["rows"] if out.exists() else []
    keep = [r for r in previous if (r["length"], r["path"]) not in
            {(r2["length"], r2["path"]) for r2 in rows}]
    result["rows"] = sorted(keep + rows, key=lambda r: (r["path"], r["length"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
