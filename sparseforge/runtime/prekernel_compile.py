"""Cross-compile the routing pre-kernels for a GPU target (no GPU needed) and read back
registers, spills and shared memory with ``cuobjdump``: the test suite holds every
pre-kernel spill-free on sm_80 and sm_90 with these."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..codegen.prekernels import (
    CLUSTER_WARPS,
    HIP_WARPS,
    LINES_BLOCK_N,
    LINES_BLOCK_O,
    LINES_WARPS,
    cluster_constexprs,
    hip_constexprs,
    lines_predicate,
    padded,
    render_clusters,
    render_hip,
    render_lines,
    render_routing,
    routing_constexprs,
)
from ..ir.routing import Hierarchical, VerticalSlash
from .compile import parse_arch, resource_usage
from .prekernels import prekernel_module

DATA_POINTERS = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
_ROUTING_POINTERS = {"Starts": "*i32", "Out": "*fp32", "QBar": "*fp32", "KBar": "*fp32",
                     "Cand": "*i8", "Scores": "*fp32", "Count": "*i32", "scale": "fp32",
                     "coverage": "fp32"}
_LINES_POINTERS = {"Lse": "*fp32", "Vertical": "*fp32", "Slash": "*fp32", "qk_scale": "fp32"}


def _compile(fn, signature: dict, constexprs: dict, arch: str, num_warps: int) -> dict:
    """Compile one pre-kernel; its resource usage as a dict."""
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", parse_arch(arch), 32),
                              options={"num_warps": num_warps, "num_stages": 1})
    usage = resource_usage(compiled.asm["cubin"], compiled.asm["ptx"])
    return {"arch": arch, "registers": usage["registers"], "spills": usage["local"],
            "stack": usage["stack"], "shared_memory": compiled.metadata.shared,
            "cubin_size": len(compiled.asm["cubin"])}


def compile_routing(node, arch: str, head_dim: int, dtype: str, n_k_buckets: int) -> list[dict]:
    """The three block-rule pre-kernels (pool, score, select) for ``arch``."""
    src = render_routing(node)
    module = prekernel_module(src, interpret=False)
    out = []
    for step, constexprs in routing_constexprs(node, head_dim, n_k_buckets).items():
        fn = getattr(module, f"{src.name}_{step}")
        pointers = dict(_ROUTING_POINTERS, X=DATA_POINTERS[dtype],
                        **({"Out": "*i32"} if step == "select" else {}))
        sig = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
               for name in fn.arg_names}
        out.append({"kernel": f"{src.name}_{step}", "step": step,
                    **_compile(fn, sig, constexprs, arch, 4)})
    return out


def compile_hip(node: Hierarchical, arch: str, head_dim: int, dtype: str, n_k: int) -> dict:
    """HiP's search pre-kernel for ``arch``."""
    src = render_hip(node)
    fn = getattr(prekernel_module(src, interpret=False), f"{src.name}_search")
    constexprs = hip_constexprs(node, head_dim, n_k, False)
    sig = {name: "constexpr" if name in constexprs else DATA_POINTERS[dtype] if name in ("Q", "K")
           else "*i32" if name in ("Cum", "QStarts", "KStarts", "Out") else "i32"
           for name in fn.arg_names}
    return {"kernel": f"{src.name}_search", **_compile(fn, sig, constexprs, arch, HIP_WARPS)}


def compile_clusters(arch: str, head_dim: int, dtype: str, n_clusters: int) -> dict:
    """The nearest-centroid assignment pre-kernel for ``arch``."""
    src = render_clusters()
    fn = getattr(prekernel_module(src, interpret=False), f"{src.name}_assign")
    constexprs = cluster_constexprs(head_dim, n_clusters)
    sig = {name: "constexpr" if name in constexprs else DATA_POINTERS[dtype] if name == "X"
           else "*fp32" if name == "Cent" else "*i32" if name == "Ids" else "i32"
           for name in fn.arg_names}
    return {"kernel": f"{src.name}_assign", **_compile(fn, sig, constexprs, arch, CLUSTER_WARPS)}


def compile_lines(node: VerticalSlash, siblings, arch: str, head_dim: int, dtype: str) -> list[dict]:
    """The three line pre-kernels of ``vertical_slash`` for ``arch``."""
    src = render_lines(node, lines_predicate(siblings))
    module = prekernel_module(src, interpret=False)
    sizes = dict(R_PAD=padded(node.last_q), HEAD_DIM=head_dim, D_PAD=padded(head_dim))
    out = []
    for step, extra in (("lse", dict(BLOCK_N=LINES_BLOCK_N, UPCAST=False)),
                        ("columns", dict(BLOCK_N=LINES_BLOCK_N, UPCAST=False)),
                        ("diagonals", dict(BLOCK_O=LINES_BLOCK_O))):
        fn = getattr(module, f"{src.name}_{step}")
        constexprs = {**sizes, **extra}
        sig = {name: "constexpr" if name in constexprs else
               DATA_POINTERS[dtype] if name in ("Q", "K") else _LINES_POINTERS.get(name, "i32")
               for name in fn.arg_names}
        out.append({"kernel": f"{src.name}_{step}", "step": step,
                    **_compile(fn, sig, constexprs, arch, LINES_WARPS[step])})
    return out
