"""Cold build time per kernel (issue 7's goal: <= 2 s per kernel on a CPU machine).

Builds the template variants that a ``BuildSpec`` can express with empty caches (both
Triton's and ours, in a temporary directory), once with one worker (serial time per
kernel: render + compile + cuobjdump + write) and once with every core (throughput).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from .._env import patched_environ
from ..runtime.variants import L, variant_specs
from .build import build
from .spec import BuildSpec


def variant_build_specs() -> list[BuildSpec]:
    return [BuildSpec(name, pattern, L, L, d, dtype=dt)
            for name, (pattern, d, dt, overrides) in variant_specs().items() if not overrides]


def _empty_caches(tmp: Path):
    """Fresh, private Triton and sparseforge cache directories under ``tmp``."""
    values = {}
    for k in ("TRITON_CACHE_DIR", "SPARSEFORGE_CACHE_DIR"):
        (tmp / k.lower()).mkdir(mode=0o700)
        values[k] = str(tmp / k.lower())
    return patched_environ(values)


def cold_build_times(archs=("sm_80", "sm_90"), workers: int | None = None) -> dict:
    specs = variant_build_specs()
    result = {"archs": list(archs), "specs": len(specs)}
    for label, n in (("serial", 1), ("parallel", workers or os.cpu_count() or 1)):
        with tempfile.TemporaryDirectory() as tmp, _empty_caches(Path(tmp)):
            start = time.perf_counter()
            manifest = build(specs, list(archs), Path(tmp) / "out", workers=n)
            wall = time.perf_counter() - start
        times = [k["build_seconds"] for k in manifest["kernels"]]
        assert all(k["compiled"] for k in manifest["kernels"]), "a cold build hit a cache"
        result[label] = {"workers": n, "kernels": len(times), "wall_s": round(wall, 2),
                         "wall_per_kernel_s": round(wall / len(times), 3),
                         "per_kernel_mean_s": round(statistics.mean(times), 3),
                         "per_kernel_median_s": round(statistics.median(times), 3),
                         "per_kernel_max_s": round(max(times), 3),
                         "slowest": max(manifest["kernels"], key=lambda k: k["build_seconds"])["name"]}
    return result
