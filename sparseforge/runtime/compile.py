"""Compile generated kernels for GPU targets on any machine (no GPU needed).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` lowers to PTX and
cubin with the ``ptxas`` shipped in Triton's wheel; ``cuobjdump`` (also shipped) reads
registers, stack/local memory (spills), shared memory and the SASS (HGMMA = wgmma) of
the result. The test suite compiles every template variant this way for sm_80 and
sm_90, because the interpreter accepts programs the compiler rejects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton

from ..planner.plan import Plan
from .triton_launch import kernel_function

_TRITON_DTYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
ARCHS = {"sm_80": 80, "sm_90": 90}


@dataclass(frozen=True)
class CompiledKernelInfo:
    name: str
    arch: str
    kind: str
    registers: int
    spills: int  # bytes of local memory (register spills) per thread
    stack: int
    shared_memory: int
    uses_wgmma: bool
    source_sha256: str
    cubin_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def _nvidia_tool(name: str) -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (neither in Triton's wheel nor on PATH)")
    return found


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local (spill) and shared bytes of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "local": int(fields.get("LOCAL", 0)), "shared": int(fields.get("SHARED", 0)),
            "uses_wgmma": "HGMMA" in sass}


def forward_signature(plan: Plan, kernel_index: int) -> tuple[dict, dict]:
    """Triton signature and constexprs of the rendered forward kernel.

    The head-dim strides are compiled as the constant 1 (dispatch passes contiguous
    tensors), as Triton's JIT would specialise them.
    """
    kernel = plan.kernels[kernel_index]
    ptr = _TRITON_DTYPES[plan.dtype]
    sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "Lse": "*fp32"}
    if kernel.has_documents:
        sig.update({"DocQ": "*i32", "DocK": "*i32", "stride_dqb": "i32", "stride_dq": "i32",
                    "stride_dkb": "i32", "stride_dk": "i32"})
    for t in "qkvo":
        for dim in "bhmd" if t in "qo" else "bhnd":
            sig[f"stride_{t}{dim}"] = "i32"
    for name in ("stride_lb", "stride_lh", "stride_lm", "n_heads", "head_offset", "kv_group",
                 "q_len_total", "kv_len_total", "tiles_per_group"):
        sig[name] = "i32"
    sig["qk_scale"] = "fp32"
    constexprs = {"BLOCK_M": plan.block_m, "BLOCK_N": plan.block_n, "HEAD_DIM": plan.head_dim,
                  "D_PAD": plan.padded_head_dim, "GROUPS": kernel.groups, "DOT_UPCAST": False}
    for name in constexprs:
        sig[name] = "constexpr"
    for name in ("stride_qd", "stride_kd", "stride_vd", "stride_od"):
        sig[name] = "constexpr"
        constexprs[name] = 1
    return sig, constexprs


def divisibility_attrs(fn, signature: dict, plan: Plan) -> dict:
    """The facts Triton's JIT would specialise on for contiguous [B, H, L, D] inputs:
    pointers are 16-byte aligned, and token/head/batch strides are multiples of 16 when
    the head dim is. Without them nothing vectorises (scalar loads, 2-byte smem stores)."""
    aligned = {"Q", "K", "V", "Out", "Lse", "DocQ", "DocK"}
    if plan.head_dim % 16 == 0:
        aligned |= {f"stride_{t}{d}" for t in "qkvo" for d in "bhmn"}
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name in signature if name in aligned}


def compile_forward(plan: Plan, kernel_index: int, arch: str):
    """(CompiledKernel, CompiledKernelInfo) for one kernel of ``plan`` on ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(ARCHS)}")
    fn, src = kernel_function(plan, kernel_index, interpret=False)
    sig, constexprs = forward_signature(plan, kernel_index)
    attrs = divisibility_attrs(fn, sig, plan)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", ARCHS[arch], 32),
                              options=dict(src.launch_options))
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    info = CompiledKernelInfo(src.name, arch, "forward", usage["registers"], usage["local"],
                              usage["stack"], compiled.metadata.shared,
                              usage["uses_wgmma"], src.sha256, len(cubin))
    return compiled, info
