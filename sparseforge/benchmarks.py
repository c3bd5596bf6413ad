"""CPU benchmark (issue 2): sliding window 256 at B=1, H=4, L=4096, D=64.

Times, in one run, sparseforge's CPU plan execution, dense SDPA with the boolean mask,
and FlexAttention under torch.compile with the same mask (when it compiles on this
machine); then the warm dispatch overhead of ``attention`` (everything up to the
executor, measured by timing calls on a 1-token problem minus the executor itself).
Writes JSON to bench/results/ with the machine and library versions.

    python bench/cpu_sliding_window.py      (or: sparseforge bench)
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import triton

from ._version import __version__
from .aot.timing import cold_build_times
from .api import attention
from .ir.nodes import causal, sliding_window
from .oracle import dense_mask, reference_attention
from .runtime import dispatch


def best(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def flex_time(q, k, v, pattern, length, repeats):
    try:
        # optional: FlexAttention exists from torch 2.5 on
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:  # pragma: no cover
        return None, f"unavailable: {exc}"
    mask = dense_mask(pattern, length, length)

    def mask_mod(b, h, i, j):
        return mask[i, j]

    try:
        block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
        compiled = torch.compile(flex_attention)
        return best(lambda: compiled(q, k, v, block_mask=block_mask), repeats), "ok"
    except Exception as exc:  # report, do not hide: FlexAttention on CPU may not compile
        return None, f"failed: {type(exc).__name__}: {str(exc)[:200]}"


def dispatch_overhead_us(n=2000):
    """Warm per-call cost of attention's Python layer, executor excluded."""
    q = torch.randn(1, 1, 1, 16)
    pattern = causal()
    attention(q, q, q, pattern)
    real = dispatch.execute_forward
    dispatch.execute_forward = lambda *a: (a[4], None)  # stub the executor out
    try:
        t = time.perf_counter()
        for _ in range(n):
            attention(q, q, q, pattern)
        return (time.perf_counter() - t) / n * 1e6
    finally:
        dispatch.execute_forward = real


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment() -> dict:
    """Where a benchmark ran: the device (GPU name, or the CPU when none) and versions."""
    if torch.cuda.is_available():
        device = {"kind": "cuda", "name": torch.cuda.get_device_name(),
                  "capability": "sm_{}{}".format(*torch.cuda.get_device_capability())}
    else:
        device = {"kind": "cpu", "name": _cpu_model(), "gpu": None}
    device.update(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                  platform=platform.platform())
    return {"device": device,
            "versions": {"torch": torch.__version__, "sparseforge": __version__,
                         "triton": triton.__version__, "python": platform.python_version()}}


def _save(result: dict, results_dir: str, name: str) -> dict:
    result.update(run_environment())
    print(json.dumps(result, indent=1))
    out = Path(results_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def build_and_dispatch(results_dir="bench/results", archs=("sm_80", "sm_90")):
    """Issue 7's bench: cold build time per kernel and warm dispatch overhead."""
    result = {
        "benchmark": "cold_build_and_dispatch",
        "cold_build": cold_build_times(archs),
        "warm_dispatch_overhead_us": dispatch_overhead_us(),
        "warm_dispatch_note": "attention's Python layer on CPU tensors, executor stubbed out; "
                              "GPU launch overhead needs a device",
    }
    return _save(result, results_dir, "cold_build_and_dispatch")


def main(length=4096, repeats=5, with_flex=True, window=256, heads=4, head_dim=64,
         results_dir="bench/results"):
    torch.manual_seed(0)
    pattern = sliding_window(window)
    q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
    mask = dense_mask(pattern, length, length)
    ours = best(lambda: attention(q, k, v, pattern), repeats)
    sdpa = best(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                repeats)
    flex, flex_status = flex_time(q, k, v, pattern, length, repeats) if with_flex else (None, "skipped")
    out = attention(q, k, v, pattern).double()
    err = (out - reference_attention(q, k, v, pattern).double()).abs().max().item()
    result = {
        "benchmark": "cpu_sliding_window", "pattern": repr(pattern),
        "shape": {"B": 1, "H": heads, "L": length, "D": head_dim, "dtype": "float32"},
        "sparseforge_ms": ours * 1e3, "sdpa_bool_mask_ms": sdpa * 1e3,
        "flex_compiled_ms": None if flex is None else flex * 1e3, "flex_status": flex_status,
        "speedup_vs_sdpa": sdpa / ours,
        "speedup_vs_flex": None if flex is None else flex / ours,
        "max_abs_error_vs_oracle": err,
        "dispatch_overhead_us": dispatch_overhead_us(),
    }
    return _save(result, results_dir, "cpu_sliding_window")


if __name__ == "__main__":
    main()
