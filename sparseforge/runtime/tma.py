"""When a generated kernel moves its tiles with TMA tensor descriptors, and what that needs.

On sm_90 and newer the forward, dQ and decode kernels of 16-bit plans (where
``codegen.render.tma_fits`` says the descriptors pay) read their Q, K, V and dO tiles
(and write O and dQ) through device-side tensor descriptors
(``tl.make_tensor_descriptor``): the copy engine moves whole tiles, with no per-thread
address arithmetic in the tile loops, and reads rows past the end and the head-dim
padding as zeros. Every kernel's tiles are plain strided row ranges (dilation groups
are strided views, N-D and cluster layouts are permuted by torch before the kernel), so
the same descriptors serve static and routed walks alike. The kernels keep their
pointer loads behind the ``TMA`` constexpr, for sm_80, for fp32 plans and for calls
whose tensors a descriptor cannot describe.

A descriptor needs a 16-byte aligned base, 16-byte multiples for every stride but the
last and a unit head-dim stride; Triton's launcher gives each program 128 bytes of
global scratch per descriptor from the allocator set with ``triton.set_allocator``
(``ensure_allocator`` installs a torch one when the caller has none).

``SPARSEFORGE_TMA``: ``auto`` (default: on sm_90 and newer), ``off`` (never: pointer
loads everywhere) or ``on`` (also under Triton's interpreter and on sm_80, where Triton
lowers descriptors to plain loads; the tests use it to check the descriptor path's
results on a CPU).
"""

from __future__ import annotations

import os

import torch
import triton
from triton.runtime import _allocation

from ..codegen.render import KernelSource

_MODES = ("auto", "off", "on")
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def tma_mode() -> str:
    """``SPARSEFORGE_TMA``, checked."""
    mode = os.environ.get("SPARSEFORGE_TMA", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"SPARSEFORGE_TMA={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def compiled_with_tma(src: KernelSource, arch: str) -> bool:
    """The ``TMA`` constexpr a kernel is compiled with for a GPU target (``"sm_90"``)."""
    if not src.tma_ready:
        return False
    mode = tma_mode()
    return mode == "on" or (mode == "auto" and int(arch.removeprefix("sm_")) >= 90)


def call_allows_tma(args) -> bool:
    """Whether a call's [B, H, L, D] 16-bit tensors (Q, K, V, O, dO, dQ: what descriptors
    read and write; fp32 buffers and routing indices go by pointers) satisfy a
    descriptor: 16-byte aligned base addresses and strides, unit head-dim stride."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.dtype in _SIXTEEN_BIT:
            size = a.element_size()
            if a.data_ptr() % 16 or a.stride(3) != 1 or any(s * size % 16 for s in a.stride()[:3]):
                return False
    return True


def call_tma(src: KernelSource, args, device: torch.device, interpret: bool) -> bool:
    """The ``TMA`` constexpr of one launch through Triton's JIT."""
    if not src.tma_ready or not call_allows_tma(args):
        return False
    mode = tma_mode()
    if mode == "on":
        return True
    if mode == "off" or interpret or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _torch_scratch(size: int, alignment: int, stream):
    # Triton asks for 128-byte aligned scratch; the caching allocator gives 512-byte
    # aligned blocks, reused across launches on the same stream
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton an allocator for descriptor scratch unless the caller set one (Triton
    keeps it in a context variable: each thread sets its own)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)
