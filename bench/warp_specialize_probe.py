"""Does Triton warp-specialise sparseforge's forward full-tile loop on sm_90? (no GPU needed)

    python bench/warp_specialize_probe.py            # full() and causal(), D = 64 and 128

Takes the default sm_90 forward kernel (bf16, L = 8192, TMA descriptors), marks its
full-tile loop ``tl.range(..., warp_specialize=True)`` and compiles it with 4 and 8 warps.
Triton's Hopper pass (``nvgpu-warp-specialization``) only acts on 4-warp kernels; the
probe reports, per case, whether the TTGIR got a ``ttg.warp_specialize`` op, or the
compiler's error. A control compiles a plain TMA matmul loop the same way, to show the
pass itself works on this Triton. Rerun it on a new Triton before trying again.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sparseforge as sf
from sparseforge.runtime.compile import launch_spec
from sparseforge.runtime.sources import rendered

FULL_LOOP = "for tile in range(full_start, full_end):"


def _specialised_kernel(plan):
    """The plan's forward kernel with its full-tile loop marked for warp specialisation."""
    src = rendered(plan, 0, "forward")
    text = src.source.replace(FULL_LOOP, "for tile in tl.range(full_start, full_end, "
                              "warp_specialize=True):")
    assert text != src.source, "the template's full-tile loop changed: update FULL_LOOP"
    path = os.path.join(tempfile.mkdtemp(), f"{src.name}_ws.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"{src.name}_ws", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, src.name)


def _outcome(fn, sig, constexprs, attrs, num_warps: int) -> str:
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": 2})
    except Exception as exc:  # the pass can fail outright: that is a finding too
        return f"compile error: {str(exc).splitlines()[-1][:120]}"
    ttgir = compiled.asm["ttgir"]
    return "warp-specialised" if "ttg.warp_specialize" in ttgir else "not specialised"


@triton.jit
def _matmul(A, B, C, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    a_d = tl.make_tensor_descriptor(A, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_d = tl.make_tensor_descriptor(B, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    c_d = tl.make_tensor_descriptor(C, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    acc = tl.zeros([BM, BN], tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=True):
        acc = tl.dot(a_d.load([tl.program_id(0) * BM, k * BK]),
                     b_d.load([tl.program_id(1) * BN, k * BK]).T, acc)
    c_d.store([tl.program_id(0) * BM, tl.program_id(1) * BN], acc.to(tl.bfloat16))


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"Triton {triton.__version__}, sm_90, bf16, L = 8192")
    sig = {"A": "*bf16", "B": "*bf16", "C": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    for warps in (4, 8):
        print(f"control: TMA matmul loop, {warps} warps: "
              f"{_outcome(_matmul, sig, {'BM': 128, 'BN': 128, 'BK': 64}, aligned, warps)}")
    for name, pattern in (("full()", sf.full()), ("causal()", sf.causal())):
        for d in (64, 128):
            plan = sf.plan(pattern, q_len=8192, kv_len=8192, head_dim=d, dtype="bfloat16",
                           target="sm_90")
            _, sig_k, constexprs, attrs = launch_spec(plan, 0, "forward", "sm_90")
            fn = _specialised_kernel(plan)
            for warps in (4, 8):
                print(f"{name} D={d}, {warps} warps: {_outcome(fn, sig_k, constexprs, attrs, warps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
