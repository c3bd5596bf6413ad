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
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..planner.plan import Plan
from .binaries import COUNTERS, KernelBinary, KernelInfo, kernel_key
from .sources import kernel_function, rendered
from .tma import compiled_with_tma

_TRITON_DTYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
ARCHS = ("sm_80", "sm_90")  # what the tile tables are tuned for; any sm_XX >= 80 compiles


def parse_arch(arch: str) -> int:
    """``"sm_90"`` -> 90; a clear error for anything else."""
    m = re.fullmatch(r"sm_(\d{2,3})", arch) if isinstance(arch, str) else None
    if m is None or int(m.group(1)) < 80:
        raise ValueError(f"arch={arch!r}: expected an NVIDIA target 'sm_XX' with XX >= 80, "
                         f"such as {', '.join(ARCHS)}")
    return int(m.group(1))


def plan_target(arch: str) -> str:
    """The tile table a GPU target plans with (Hopper and newer use the sm_90 table)."""
    return "sm_90" if parse_arch(arch) >= 90 else "sm_80"


def device_arch(device) -> str:
    """The compile target of a CUDA device, e.g. ``"sm_90"`` for an H100."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def nvidia_tool(name: str) -> str:
    """A CUDA binary tool (cuobjdump, nvdisasm): the one in Triton's wheel, else on PATH."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (neither in Triton's wheel nor on PATH)")
    return found


#: PTX instructions that ptxas assembles into wgmma (HGMMA) and into TMA / bulk copies
#: (UTMALDG, UTMASTG, UTMAREDG, UBLKCP): each has that one SASS form
_WGMMA_PTX = re.compile(r"\bwgmma\.mma_async")
_TMA_PTX = re.compile(r"\bcp(?:\.reduce)?\.async\.bulk\b")


def resource_usage(cubin: bytes, ptx: str) -> dict:
    """Registers, stack, local (spill) and static shared bytes of the cubin's kernel
    (``cuobjdump --dump-resource-usage`` reads them from the ELF's tables in
    milliseconds), and whether it uses wgmma and TMA copies, read from the PTX it was
    assembled from. Disassembling the cubin to look for HGMMA and UTMALDG instead cost
    0.85 s a kernel (a sixth of a D=128 sm_90 build); ``tests/codegen/test_sass.py`` checks the
    two readings agree."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "local": int(fields.get("LOCAL", 0)), "shared": int(fields.get("SHARED", 0)),
            "uses_wgmma": bool(_WGMMA_PTX.search(ptx)), "uses_tma": bool(_TMA_PTX.search(ptx))}


# run-time parameters that are not int32 scalars: data pointers take the plan's dtype
_DATA_POINTERS = {"Q", "K", "V", "Out", "DO", "DQ"}
_FP32_POINTERS = {"Lse", "Delta", "DK", "DV", "OutPart", "LsePart", "Slopes", "Bias", "DBias",
                  "KeyBias", "DKeyBias", "Pair", "DPair"}
_INT32_POINTERS = {"DocQ", "DocK", "Hull", "Sel", "SelCount", "QBucket", "KBucket", "KStarts", "TileList",
                   "TileCount", "HeadMap", "Cols", "ColCount", "Offs", "OffCount", "TileSpan",
                   "PosQ", "PosK", "TPtr", "TIdx"}
_UINT8_POINTERS = {"TileMap"}
_INT64_POINTERS = {"Tbl"}  # bit-packed mask tables, 64 keys a word
_FP32_SCALARS = {"qk_scale", "sm_scale", "cap2"}
# a pair bias plane [B, H, Lq, Lkv] may pass 2^31 elements
_INT64_SCALARS = {"stride_pairb", "stride_pairh", "stride_pairq", "stride_dpairb", "stride_dpairh"}
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od"}


def kernel_signature(plan: Plan, kernel_index: int, kind: str = "forward",
                     arch: str = "sm_80") -> tuple[dict, dict]:
    """Triton signature and constexprs of a rendered kernel for ``arch``, read off its
    parameter names.

    The head-dim strides are compiled as the constant 1 (dispatch passes contiguous
    tensors), as Triton's JIT would specialise them; ``TMA`` says whether tiles move
    through tensor descriptors on this target (``tma.compiled_with_tma``).
    """
    fn, src = kernel_function(plan, kernel_index, False, kind)
    constexprs = dict(src.constexprs, DOT_UPCAST=False)
    if "TMA" in fn.arg_names:
        constexprs["TMA"] = compiled_with_tma(src, arch)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            sig[name] = "constexpr"
            constexprs[name] = 1
        elif name in _DATA_POINTERS:
            sig[name] = _TRITON_DTYPES[plan.dtype]
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _INT32_POINTERS:
            sig[name] = "*i32"
        elif name in _UINT8_POINTERS:
            sig[name] = "*u8"
        elif name in _INT64_POINTERS:
            sig[name] = "*i64"
        elif name in _FP32_SCALARS:
            sig[name] = "fp32"
        elif name in _INT64_SCALARS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig, constexprs


def divisibility_attrs(fn, signature: dict, plan: Plan) -> dict:
    """The facts Triton's JIT would specialise on for contiguous [B, H, L, D] inputs:
    pointers are 16-byte aligned, and token/head/batch strides are multiples of 16 when
    their head dim is (q/k's, or v/out's). Without them nothing vectorises (scalar loads,
    2-byte smem stores)."""
    aligned = _DATA_POINTERS | _FP32_POINTERS | _INT32_POINTERS | _UINT8_POINTERS | _INT64_POINTERS
    for tensors, dim in (("qk", plan.head_dim), ("vo", plan.value_dim)):
        if dim % 16 == 0:
            aligned |= {f"stride_{t}{d}" for t in tensors for d in "bhmn"}
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name in signature if name in aligned}


def launch_spec(plan: Plan, kernel_index: int, kind: str = "forward", arch: str = "sm_80"):
    """(JITFunction, signature, constexprs, attrs) on ``arch``: everything ``ASTSource``
    needs, and everything needed to rebuild a ``CompiledKernel`` from stored files."""
    fn, _ = kernel_function(plan, kernel_index, False, kind)
    sig, constexprs = kernel_signature(plan, kernel_index, kind, arch)
    return fn, sig, constexprs, divisibility_attrs(fn, sig, plan)


def compile_kernel(plan: Plan, kernel_index: int, arch: str, kind: str = "forward"):
    """Triton's ``CompiledKernel`` for one kernel of ``plan`` on ``arch`` (no GPU needed)."""
    capability = parse_arch(arch)
    fn, sig, constexprs, attrs = launch_spec(plan, kernel_index, kind, arch)
    src = rendered(plan, kernel_index, kind)
    COUNTERS["compiled"] += 1
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", capability, 32), options=dict(src.launch_options))


def build_binary(plan: Plan, kernel_index: int, arch: str, kind: str = "forward") -> KernelBinary:
    """Compile and read back what the kernel uses (registers, spills, smem, wgmma)."""
    compiled = compile_kernel(plan, kernel_index, arch, kind)
    src = rendered(plan, kernel_index, kind)
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin, compiled.asm["ptx"])
    meta_path = next(Path(p) for name, p in compiled.metadata_group.items() if name.endswith(".json"))
    options = dict(src.launch_options)
    info = KernelInfo(src.name, arch, src.family, usage["registers"], usage["local"],
                      usage["stack"], compiled.metadata.shared, usage["uses_wgmma"], usage["uses_tma"],
                      src.sha256, len(cubin), src.block_m, src.block_n, options["num_warps"],
                      options["num_stages"])
    return KernelBinary(kernel_key(src, arch), info, cubin, meta_path.read_text())
