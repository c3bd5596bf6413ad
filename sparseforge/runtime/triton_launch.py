"""Launch the generated forward kernels of a plan (GPU, or CPU tensors via the interpreter).

Warm calls never render or compile: the rendered source, the imported module and the
kernel are looked up in dictionaries keyed by the (frozen, hashable) plan. On a GPU the
launch goes through a held ``CompiledKernel`` (``gpu_launch``: prebuilt, cached or
compiled once), skipping Triton's argument binder; under the interpreter, or when a
call breaks the held kernel's alignment assumptions, through ``JITFunction``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..codegen.render import ForwardKernelSource, render_forward
from ..planner.plan import Plan
from ..planner.schedule import group_geometry
from ..semantics import document_ids
from .cache import load_kernel_module

LOG2E = 1.4426950408889634


@lru_cache(maxsize=512)
def rendered(plan: Plan, kernel_index: int) -> ForwardKernelSource:
    return render_forward(plan, kernel_index)


@lru_cache(maxsize=512)
def kernel_function(plan: Plan, kernel_index: int, interpret: bool):
    """(kernel function, rendered source); warm calls skip rehashing the source."""
    src = rendered(plan, kernel_index)
    module = load_kernel_module(src.module_stem, src.source, interpret=interpret)
    return getattr(module, src.name), src


def head_runs(heads: tuple[int, ...] | None, n_heads: int) -> list[tuple[int, int]]:
    """Contiguous (first head, count) runs of a kernel's heads."""
    if heads is None:
        return [(0, n_heads)]
    runs: list[list[int]] = []
    for h in heads:
        if runs and runs[-1][0] + runs[-1][1] == h:
            runs[-1][1] += 1
        else:
            runs.append([h, 1])
    return [tuple(r) for r in runs]


def _documents_args(call_kernel_pattern, q_len, kv_len, device):
    from ..ir.nodes import Documents, walk

    docs = [n for n in walk(call_kernel_pattern) if isinstance(n, Documents)]
    if len(docs) != 1:
        raise ValueError("documents: a pattern may hold one documents(...) term per head")
    ids_q, ids_k = document_ids(docs[0], q_len, kv_len)
    ids_q = ids_q.to(device=device, dtype=torch.int32).contiguous()
    ids_k = ids_k.to(device=device, dtype=torch.int32).contiguous()
    sb_q = 0 if ids_q.shape[0] == 1 else ids_q.stride(0)
    sb_k = 0 if ids_k.shape[0] == 1 else ids_k.stride(0)
    return [ids_q, ids_k, sb_q, ids_q.stride(1), sb_k, ids_k.stride(1)]


def kernel_launches(plan: Plan, call_kernels, q, k, v, out, lse, scale: float):
    """(kernel index, grid, run-time arguments) of every launch a call makes, in the
    kernel's parameter order (the constexprs that follow are the launcher's business)."""
    b, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    for index, kernel in enumerate(plan.kernels):
        extra = (_documents_args(call_kernels[index], lq, lkv, q.device)
                 if kernel.has_documents else [])
        g = kernel.groups
        tiles_per_group = max(1, max(-(-geo.q_len // plan.block_m)
                                     for geo in group_geometry(lq, lkv, g)))
        for first_head, n_heads in head_runs(kernel.heads, hq):
            args = [q, k, v, out, lse, *extra,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                    n_heads, first_head, hq // hkv, lq, lkv, tiles_per_group, scale * LOG2E]
            yield index, (g * tiles_per_group, b * n_heads, 1), args


def run_forward(plan: Plan, call_kernels, q, k, v, out, lse, scale: float, interpret: bool) -> None:
    """Launch every kernel of ``plan`` writing into ``out``/``lse``.

    ``call_kernels`` holds the call's own head patterns (with this call's document ids).
    """
    if q.shape[2] == 0:
        return
    held = None
    if q.is_cuda and not interpret:
        from . import gpu_launch

        if gpu_launch.held_launch_enabled():
            held = gpu_launch
    for index, grid, args in kernel_launches(plan, call_kernels, q, k, v, out, lse, scale):
        kernel = held.held_kernel(plan, index, q.device.index) if held is not None else None
        if kernel is not None and kernel.launch(grid, args, q.device.index):
            continue
        fn, src = kernel_function(plan, index, interpret)
        fn[grid](*args, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, HEAD_DIM=plan.head_dim,
                 D_PAD=plan.padded_head_dim, GROUPS=plan.kernels[index].groups,
                 DOT_UPCAST=interpret and q.dtype == torch.bfloat16, **dict(src.launch_options))
