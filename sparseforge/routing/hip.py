"""The generated pre-kernel of ``hierarchical`` (``templates/hierarchical.py.jinja``):
HiP's tree search, one program per (query block, batch x head) running every round in
registers: split the branches, load the children's middle keys, score them against the
block's queries with one ``tl.dot``, keep the top k (ties to the lower block), compact.
The output is the fixed-k layout (``[B, Hq, Cq, k]``, ascending, -1 padded), equal to
``reference.hierarchical_select``; candidates come in as per-block prefix counts.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from .._version import __version__
from ..codegen.render import TEMPLATE_VERSION, _environment, check_context
from ..ir.routing import Hierarchical
from ..runtime.cache import load_kernel_module
from .kernels import RoutingSource, _pow2
from .reference import _buckets, head_map, node_candidates

WARPS = 4


@lru_cache(maxsize=64)
def render_hip(node: Hierarchical) -> RoutingSource:
    tag = f"hierarchical_k{node.k}"
    context = dict(version=__version__, template_version=TEMPLATE_VERSION, name=f"route_{tag}",
                   node_repr=repr(node))
    check_context(context)
    source = _environment().get_template("hierarchical.py.jinja").render(**context)
    return RoutingSource(f"route_{tag}", source, hashlib.sha256(source.encode()).hexdigest())


def _constexprs(node: Hierarchical, head_dim: int, n_k: int, upcast: bool) -> dict:
    return dict(TOPK=node.k, K_PAD=max(8, _pow2(node.k, 1)), QB_PAD=_pow2(node.q_block),
                HEAD_DIM=head_dim, D_PAD=_pow2(head_dim), STEPS=(n_k + 1).bit_length() + 1,
                UPCAST=upcast)


def route_hip(node: Hierarchical, siblings, q: torch.Tensor, k: torch.Tensor, *,
              interpret: bool):
    """(fixed-k block indices ``[B, Hq, Cq, k]``, q bucket starts, k bucket starts, head
    map) from the generated search."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    q_starts, k_starts = _buckets(node, q_len, kv_len, q.device)
    cand = node_candidates(node, siblings, q_starts, k_starts, q_len, kv_len, q.device)
    cq, ck = cand.shape[-2], cand.shape[-1]
    cum = torch.zeros(cand.shape[0], cq, ck + 1, dtype=torch.int32, device=q.device)
    cum[..., 1:] = cand.to(torch.int32).cumsum(-1)
    src = render_hip(node)
    fn = getattr(load_kernel_module(src.name, src.source, interpret=interpret), f"{src.name}_search")
    q, k = q.contiguous(), k.contiguous()
    out = torch.empty(b, hq, cq, node.k, dtype=torch.int32, device=q.device)
    qs, ks = q_starts[0].to(torch.int32).contiguous(), k_starts[0].to(torch.int32).contiguous()
    fn[(cq, b * hq)](q, k, cum, qs, ks, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                     k.stride(1), k.stride(2), 0 if cum.shape[0] == 1 else cum.stride(0),
                     cum.stride(1), *out.stride()[:3], hq, hq // hkv, q_len, kv_len, ck,
                     max(1, (ck - 1).bit_length()),
                     **_constexprs(node, d, ck, interpret and q.dtype == torch.bfloat16),
                     num_warps=WARPS)
    return out, q_starts, k_starts, head_map("head", hq, hkv, str(q.device))


_DATA = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def compile_hip(node: Hierarchical, arch: str, head_dim: int, dtype: str, n_k: int) -> dict:
    """Compile the search for ``arch``; registers and spills from cuobjdump."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..runtime.compile import parse_arch, resource_usage

    src = render_hip(node)
    fn = getattr(load_kernel_module(src.name, src.source, interpret=False), f"{src.name}_search")
    constexprs = _constexprs(node, head_dim, n_k, False)
    sig = {name: "constexpr" if name in constexprs else _DATA[dtype] if name in ("Q", "K")
           else "*i32" if name in ("Cum", "QStarts", "KStarts", "Out") else "i32"
           for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", parse_arch(arch), 32),
                              options={"num_warps": WARPS, "num_stages": 1})
    usage = resource_usage(compiled.asm["cubin"])
    return {"kernel": f"{src.name}_search", "arch": arch, "registers": usage["registers"],
            "spills": usage["local"], "stack": usage["stack"],
            "cubin_size": len(compiled.asm["cubin"])}
