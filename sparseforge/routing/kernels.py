"""The generated routing pre-kernels (``templates/routing.py.jinja``): pool -> score ->
select for ``topk_blocks`` and ``topk_chunks`` (the fixed-k index layout) and
``threshold_blocks`` (worst-case rows and counts: the CSR layout's input).

Rendered per routing node (pool kind, sqrt scaling, share, k are baked in), cached and
imported like the attention kernels, run under Triton's interpreter on CPU or compiled
for a GPU. Every output has a size known before the call (no host synchronisation in
the kernels). The bucket candidates (where the static part allows a pair) come from
``reference.node_candidates``: they depend on the shapes only (cached), except for chunk
boundaries and document ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .._version import __version__
from ..codegen.render import TEMPLATE_VERSION, _environment, check_context
from ..ir.routing import ThresholdBlocks, TopkBlocks, TopkChunks
from ..runtime.cache import load_kernel_module
from .reference import _buckets, head_map, node_candidates

BLOCK_T = 64  # tokens a pool program loads per step
BLOCK_Q = BLOCK_C = 32  # query x key buckets a score program computes
MAX_BUCKETS = 16384  # key buckets a select program holds in registers


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class RoutingSource:
    name: str
    source: str
    sha256: str


PREKERNEL_NODES = (TopkBlocks, TopkChunks, ThresholdBlocks)


def render_routing(node) -> RoutingSource:
    """Source of the three pre-kernels of one routing node."""
    if not isinstance(node, PREKERNEL_NODES):
        raise TypeError(f"{node!r}: generated pre-kernels exist for topk_blocks, topk_chunks "
                        "and threshold_blocks")
    pool = getattr(node, "pool", "mean")
    sqrt_len = isinstance(node, TopkChunks) or getattr(node, "scale_by_sqrt_len", False)
    rule = "coverage" if isinstance(node, ThresholdBlocks) else "topk"
    keep = "cov" if rule == "coverage" else f"k{node.k}"
    tag = f"{node.kind}_{pool}{'_sqrt' if sqrt_len else ''}_{node.share}_{keep}"
    context = dict(version=__version__, template_version=TEMPLATE_VERSION, name=f"route_{tag}",
                   pool=pool, sqrt_len=sqrt_len, share=node.share, rule=rule)
    check_context(context)
    source = _environment().get_template("routing.py.jinja").render(
        node_repr=repr(node), **context)
    return RoutingSource(f"route_{tag}", source, hashlib.sha256(source.encode()).hexdigest())


def routing_module(node, interpret: bool):
    src = render_routing(node)
    return load_kernel_module(src.name, src.source, interpret=interpret), src


@dataclass(frozen=True)
class RoutingCall:
    """Sizes of one routing call: buckets, routing heads, padded constexprs."""

    q_starts: torch.Tensor  # int32 [B or 1, Cq + 1]
    k_starts: torch.Tensor  # int32 [B or 1, Ck + 1]
    routing_heads: int
    members: int  # query heads per routing head

    @property
    def n_q(self) -> int:
        return self.q_starts.shape[-1] - 1

    @property
    def n_k(self) -> int:
        return self.k_starts.shape[-1] - 1


def routing_call(node, q_heads: int, kv_heads: int, q_len: int, kv_len: int, device) -> RoutingCall:
    q_starts, k_starts = _buckets(node, q_len, kv_len, device)
    routing_heads = {"head": q_heads, "group": kv_heads, "all": 1}[node.share]
    return RoutingCall(q_starts.to(torch.int32).contiguous(), k_starts.to(torch.int32).contiguous(),
                       routing_heads, q_heads // routing_heads)


def route_prekernels(node, siblings, q: torch.Tensor, k: torch.Tensor, scale: float, *,
                     interpret: bool):
    """(indices int32, counts, the call's buckets, query head -> routing head) from the
    generated pre-kernels, for q ``[B, Hq, Lq, D]`` and k ``[B, Hkv, Lkv, D]``.

    Top-k rules: fixed-k rows ``[B, Hr, Cq, k]`` and counts None. ``threshold_blocks``:
    worst-case rows ``[B, Hr, Cq, Ck]`` and counts ``[B, Hr, Cq]`` (the CSR counts;
    ``BlockSelection.csr`` compacts). Rows are ascending, -1 after the last."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    call = routing_call(node, hq, hkv, q_len, kv_len, q.device)
    if call.n_k > MAX_BUCKETS:
        raise ValueError(f"{node!r}: {call.n_k} key buckets; the select pre-kernel holds at most "
                         f"{MAX_BUCKETS} (use larger blocks)")
    module, src = routing_module(node, interpret)
    pool = getattr(module, f"{src.name}_pool")
    score = getattr(module, f"{src.name}_score")
    select = getattr(module, f"{src.name}_select")
    d_pad = _pow2(d)
    q, k = q.contiguous(), k.contiguous()
    qbar = torch.empty(b, hq, call.n_q, d, dtype=torch.float32, device=q.device)
    kbar = torch.empty(b, hkv, call.n_k, d, dtype=torch.float32, device=q.device)
    for x, starts, out, offset in ((q, call.q_starts, qbar, kv_len - q_len),
                                   (k, call.k_starts, kbar, 0)):
        heads = x.shape[1]
        sb = 0 if starts.shape[0] == 1 else starts.stride(0)
        pool[(out.shape[2], b * heads)](
            x, starts, out, x.stride(0), x.stride(1), x.stride(2), sb, out.stride(0),
            out.stride(1), out.stride(2), heads, x.shape[2], offset, out.shape[2],
            HEAD_DIM=d, D_PAD=d_pad, BLOCK_T=BLOCK_T)
    cand = node_candidates(node, siblings, call.q_starts, call.k_starts, q_len, kv_len,
                           q.device).to(torch.int8).contiguous()
    scores = torch.empty(b, call.routing_heads, call.n_q, call.n_k, dtype=torch.float32,
                         device=q.device)
    grid = (-(-call.n_q // BLOCK_Q), -(-call.n_k // BLOCK_C), b * call.routing_heads)
    score[grid](qbar, kbar, cand, scores, *qbar.stride()[:3], *kbar.stride()[:3],
                0 if cand.shape[0] == 1 else cand.stride(0), cand.stride(1), *scores.stride()[:3],
                call.routing_heads, hq, hq // hkv, call.members, call.n_q, call.n_k,
                HEAD_DIM=d, D_PAD=d_pad, BLOCK_Q=BLOCK_Q, BLOCK_C=BLOCK_C)
    grid = (call.n_q, b * call.routing_heads)
    if isinstance(node, ThresholdBlocks):
        indices = torch.empty(b, call.routing_heads, call.n_q, call.n_k, dtype=torch.int32,
                              device=q.device)
        counts = torch.empty(b, call.routing_heads, call.n_q, dtype=torch.int32, device=q.device)
        select[grid](scores, indices, counts, *scores.stride()[:3], *indices.stride()[:3],
                     call.routing_heads, call.n_k, float(scale), node.coverage,
                     C_PAD=_pow2(call.n_k))
    else:
        indices = torch.empty(b, call.routing_heads, call.n_q, node.k, dtype=torch.int32,
                              device=q.device)
        counts = None
        select[grid](scores, indices, *scores.stride()[:3], *indices.stride()[:3],
                     call.routing_heads, call.n_k, K=node.k, K_PAD=_pow2(node.k, 1),
                     C_PAD=_pow2(call.n_k))
    return indices, counts, call, head_map(node.share, hq, hkv, str(q.device))


# ------------------------------------------------------------ cross-compilation (no GPU)

_POINTERS = {"Starts": "*i32", "Out": "*fp32", "QBar": "*fp32", "KBar": "*fp32", "Cand": "*i8",
             "Scores": "*fp32", "Count": "*i32", "scale": "fp32", "coverage": "fp32"}
_DATA = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def routing_constexprs(node, head_dim: int, n_k_buckets: int) -> dict:
    """Per pre-kernel (pool, score, select): the constexprs a call specialises on."""
    d_pad = _pow2(head_dim)
    return {"pool": dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_T=BLOCK_T),
            "score": dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_Q=BLOCK_Q, BLOCK_C=BLOCK_C),
            "select": (dict(C_PAD=_pow2(n_k_buckets)) if isinstance(node, ThresholdBlocks) else
                       dict(K=node.k, K_PAD=_pow2(node.k, 1), C_PAD=_pow2(n_k_buckets)))}


def compile_routing(node, arch: str, head_dim: int, dtype: str, n_k_buckets: int) -> list[dict]:
    """Compile the three pre-kernels for ``arch`` (``sm_80``, ``sm_90``) and read back
    registers, spills and shared memory with ``cuobjdump``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..runtime.compile import parse_arch, resource_usage

    module, src = routing_module(node, interpret=False)
    out = []
    for step, constexprs in routing_constexprs(node, head_dim, n_k_buckets).items():
        fn = getattr(module, f"{src.name}_{step}")
        pointers = dict(_POINTERS, X=_DATA[dtype], **({"Out": "*i32"} if step == "select" else {}))
        sig = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
               for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", parse_arch(arch), 32),
                                  options={"num_warps": 4, "num_stages": 1})
        usage = resource_usage(compiled.asm["cubin"])
        out.append({"kernel": f"{src.name}_{step}", "arch": arch, "step": step,
                    "registers": usage["registers"], "spills": usage["local"],
                    "stack": usage["stack"], "shared_memory": compiled.metadata.shared,
                    "cubin_size": len(compiled.asm["cubin"])})
    return out
