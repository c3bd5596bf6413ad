"""Launch generated kernels on a GPU through a held ``CompiledKernel``.

Launching through ``JITFunction`` binds the arguments, computes a specialisation key
and searches Triton's cache on every call, and a cache hit through ``triton.compile``
costs 1-2 ms. Here the kernel of (plan, kernel index, device) is resolved once, from
a prebuilt AOT directory (``sf.load_kernels``), else from the binary cache, else by
compiling it, and held; a warm launch is a dictionary lookup, an alignment check and
Triton's C launcher.

The kernel was compiled assuming 16-byte aligned pointers and unit head-dim strides
(dispatch passes contiguous tensors). A call that breaks either returns False from
``launch`` and the caller uses the JIT path, which specialises correctly.
Set ``SPARSEFORGE_LAUNCH=jit`` to always use the JIT path.
"""

from __future__ import annotations

import logging
import os
import threading

import triton

from ..planner.plan import Plan
from .binaries import COUNTERS, compiled_kernel, kernel_key
from .binary_cache import binary_dir, cached_binary
from .compile import compile_kernel, device_arch, launch_spec
from .prebuilt import prebuilt
from .sources import rendered
from .tma import call_allows_tma, ensure_allocator

log = logging.getLogger("sparseforge")

_RUNTIME_ARGS_END = "qk_scale"  # the last run-time argument; constexprs follow it


def held_launch_enabled() -> bool:
    return os.environ.get("SPARSEFORGE_LAUNCH", "held") != "jit" and hasattr(triton, "knobs")


class HeldKernel:
    """A loaded ``CompiledKernel`` and the constexpr values its launcher expects."""

    __slots__ = ("kernel", "tail", "name", "source", "broken", "tma")

    def __init__(self, kernel, tail: tuple, name: str, source: str, tma: bool = False):
        self.kernel = kernel
        self.tail = tail
        self.name = name
        self.source = source  # "prebuilt", "cache" or "compiled"
        self.broken = False
        self.tma = tma  # compiled to move tiles with tensor descriptors

    def launch(self, grid: tuple[int, int, int], args: list, device_index: int) -> bool:
        """Launch and return True, or return False for the caller to use the JIT path."""
        if self.broken:
            return False
        for a in args:  # the facts the kernel was compiled with
            if hasattr(a, "data_ptr") and (a.data_ptr() % 16 or (a.dim() == 4 and a.stride(3) != 1)):
                return False
        if self.tma:
            if not call_allows_tma(args):
                return False
            ensure_allocator()
        k = self.kernel
        try:
            run = k.run  # Triton loads the cubin and builds the C launcher on first use
            stream = triton.runtime.driver.active.get_current_stream(device_index)
            hooks = triton.knobs.runtime
            enter = hooks.launch_enter_hook
            # Triton 3.9 keeps an (often empty) HookChain here, older versions None
            profiling = enter is not None and getattr(enter, "calls", True)
            meta = k.launch_metadata(grid, stream, *args, *self.tail) if profiling else None
            run(grid[0], grid[1], grid[2], stream, k.function, k.packed_metadata, meta, enter,
                hooks.launch_exit_hook, *args, *self.tail)
        except Exception as exc:  # a launch that fails before running: the JIT path still can
            self.broken = True
            log.warning("held launch of %s failed (%s: %s); using Triton's JIT launch for it",
                        self.name, type(exc).__name__, exc)
            return False
        return True


def constexpr_tail(fn, constexprs: dict) -> tuple:
    """Values of the parameters after the run-time ones: Triton's launcher takes every
    argument, constexprs included, and drops those its signature marks constexpr."""
    names = fn.arg_names
    return tuple(constexprs[n] for n in names[names.index(_RUNTIME_ARGS_END) + 1:])


_held: dict[tuple, HeldKernel | None] = {}
_lock = threading.Lock()


def held_kernel(plan: Plan, kernel_index: int, device_index: int,
                kind: str = "forward") -> HeldKernel | None:
    """The held kernel, or None when it could not be resolved (then the JIT path runs
    the call; the reason is logged once)."""
    key = (plan, kernel_index, device_index, kind)
    if key in _held:
        return _held[key]
    with _lock:
        if key not in _held:
            try:
                _held[key] = resolve_kernel(plan, kernel_index, device_arch(device_index), kind)
            except Exception as exc:
                log.warning("cannot hold %s kernel %d of plan %r (%s: %s); using Triton's JIT "
                            "launch", kind, kernel_index, plan.pattern, type(exc).__name__, exc)
                _held[key] = None
        return _held[key]


def resolve_kernel(plan: Plan, kernel_index: int, arch: str, kind: str = "forward") -> HeldKernel:
    """Prebuilt (zero compilation), else the binary cache, else compile: a held kernel.
    Needs no GPU itself (Triton loads the cubin at the first launch)."""
    src = rendered(plan, kernel_index, kind)
    fn, sig, constexprs, attrs = launch_spec(plan, kernel_index, kind, arch)
    tail = constexpr_tail(fn, constexprs)
    tma = bool(constexprs.get("TMA", False))
    found = prebuilt(kernel_key(src, arch))
    if found is not None:
        COUNTERS["prebuilt_loads"] += 1
        kernel = compiled_kernel(found.binary, found.directory, fn, sig, constexprs, attrs)
        return HeldKernel(kernel, tail, src.name, "prebuilt", tma)
    log.info("no prebuilt kernel for %s on %s: compiling it just in time", src.name, arch)
    directory = binary_dir()
    if directory is None:  # read-only cache: keep Triton's object in memory
        return HeldKernel(compile_kernel(plan, kernel_index, arch, kind), tail, src.name, "compiled",
                          tma)
    binary, built = cached_binary(plan, kernel_index, arch, kind)
    kernel = compiled_kernel(binary, directory, fn, sig, constexprs, attrs)
    return HeldKernel(kernel, tail, src.name, "compiled" if built else "cache", tma)


def clear_held() -> None:
    with _lock:
        _held.clear()
