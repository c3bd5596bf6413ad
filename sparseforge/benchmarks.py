"""Benchmark plumbing shared by ``sparseforge bench`` and ``bench/``: timing, where a run
happened (device and library versions), saving JSON under bench/results/, the cold
kernel build times and the warm dispatch overhead of ``attention`` (everything up to the
executor, measured by timing calls on a 1-token problem with the executor stubbed out).
The CPU attention comparison itself is ``cpu_bench``.
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
from .ir.nodes import causal
from .runtime import dispatch


def dispatch_overhead_us(n=2000, loops=7) -> float:
    """Warm per-call cost of attention's Python layer, executor excluded: the best of
    ``loops`` loops of ``n`` calls (``dispatch_overhead_spread_us`` gives all of them).
    The best, as ``timeit`` advises: on a shared machine the slower loops measure the
    neighbours, not the code."""
    return min(dispatch_overhead_spread_us(n, loops))


def dispatch_overhead_spread_us(n=2000, loops=7) -> list[float]:
    """Per-call microseconds of each of ``loops`` loops of ``n`` warm ``sf.attention``
    calls on a tiny CPU causal problem, with the executor stubbed out."""
    q = torch.randn(1, 1, 1, 16)
    pattern = causal()
    attention(q, q, q, pattern)
    real = dispatch.execute_forward
    dispatch.execute_forward = lambda *a, **kw: (a[4], None)  # stub the executor out
    try:
        times = []
        for _ in range(loops):
            t = time.perf_counter()
            for _ in range(n):
                attention(q, q, q, pattern)
            times.append((time.perf_counter() - t) / n * 1e6)
        return times
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


def save_result(result: dict, results_dir: str, name: str) -> dict:
    result.update(run_environment())
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
    return save_result(result, results_dir, "cold_build_and_dispatch")
