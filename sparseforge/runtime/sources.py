"""The rendered sources of a plan's kernels and their imported functions, memoised.

Warm calls never render: the source is looked up by the (frozen, hashable) plan, the
module by the source's hash (``cache.load_kernel_module``). Launching, cross-compiling
and the binary cache all read sources from here.
"""

from __future__ import annotations

from functools import lru_cache

from ..codegen.render import KernelSource, render_kernel
from ..planner.plan import Plan
from .cache import load_kernel_module


@lru_cache(maxsize=1024)
def rendered(plan: Plan, kernel_index: int, kind: str = "forward") -> KernelSource:
    return render_kernel(plan, kernel_index, kind)


@lru_cache(maxsize=1024)
def kernel_function(plan: Plan, kernel_index: int, interpret: bool, kind: str = "forward"):
    """(kernel function, rendered source); warm calls skip rehashing the source."""
    src = rendered(plan, kernel_index, kind)
    module = load_kernel_module(src.module_stem, src.source, interpret=interpret)
    return getattr(module, src.name), src
