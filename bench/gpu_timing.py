"""Shared pieces of the GPU benchmarks (``bench/*_gpu.py``): CUDA-event timing, a compiled
FlexAttention run for a mask_mod, and the header every result file carries.

The scripts import this as a sibling module (``python bench/<script>.py`` puts ``bench/``
on the path)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeats: int, cuda: bool, warm_up: bool = True) -> float:
    """Median seconds of ``fn()`` after one warm-up call (CUDA events on a GPU);
    ``warm_up=False`` for smoke runs, which time nothing real and only need each path
    run once."""
    if warm_up:
        fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def once(fn, cuda: bool) -> float:
    """Seconds of one call, synchronised: a cold first call (compilation included)."""
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def flex_run(q, k, v, mask_mod, kv_len: int | None = None):
    """(build the BlockMask, run compiled flex_attention) closures for ``mask_mod``; a
    fresh compile per mask (recompiling with dynamic shapes failed on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, n = q.shape[0], q.shape[1], q.shape[2]
    holder = {}

    def build():
        holder["mask"] = create_block_mask(mask_mod, b, h, n, kv_len or n, device=q.device.type)

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention)
    build()
    return build, lambda: compiled(q, k, v, block_mask=holder["mask"])


def result_header(device: str, dtype) -> dict:
    """Device name and library versions, recorded with every result."""
    import triton

    import sparseforge as sf

    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "sparseforge": sf.__version__, "dtype": str(dtype)}


def write_result(device: str, dtype, rows: list, prefix: str, out: str | None) -> None:
    """The rows with the header, as ``<out>/<prefix>_<device>.json`` (``out=None``: a
    smoke run, nothing written)."""
    result = {**result_header(device, dtype), "rows": rows}
    if out is None:
        return
    path = Path(out) / f"{prefix}_{result['device'].replace(' ', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
