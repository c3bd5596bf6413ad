"""The generated assignment pre-kernel of ``clusters`` (``templates/clusters.py.jinja``):
each unit-normalised token to its nearest centroid, one program per token tile and
head, equal to ``reference.route_clusters`` (nearest-centroid mode). The sort by
cluster that follows is a device sort (``routing.launch.cluster_tiles``)."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from .._version import __version__
from ..codegen.render import TEMPLATE_VERSION, _environment, check_context
from ..runtime.cache import load_kernel_module
from .kernels import RoutingSource, _pow2

BLOCK_T = 16
WARPS = 4


@lru_cache(maxsize=8)
def render_clusters() -> RoutingSource:
    context = dict(version=__version__, template_version=TEMPLATE_VERSION,
                   name="route_clusters", node_repr="clusters(nearest centroid)")
    check_context(context)
    source = _environment().get_template("clusters.py.jinja").render(**context)
    return RoutingSource("route_clusters", source, hashlib.sha256(source.encode()).hexdigest())


def _kernel(interpret: bool):
    src = render_clusters()
    return getattr(load_kernel_module(src.name, src.source, interpret=interpret),
                   f"{src.name}_assign")


def assign(node, x: torch.Tensor, heads_per_set: int, *, interpret: bool) -> torch.Tensor:
    """int64 ``[B, H, L]``: the nearest centroid of every token of ``x`` ``[B, H, L, D]``;
    head h uses centroid set ``h // heads_per_set`` (one set: all heads)."""
    b, h, length, d = x.shape
    cent = node.centroids.to(device=x.device, dtype=torch.float32).contiguous()
    if cent.shape[-1] != d:
        raise ValueError(f"clusters(centroids=[{'x'.join(map(str, node.centroids.shape))}]): "
                         f"expected head dim {d}")
    x = x.contiguous()
    ids = torch.empty(b, h, length, dtype=torch.int32, device=x.device)
    _kernel(interpret)[(-(-length // BLOCK_T), b * h)](
        x, cent, ids, x.stride(0), x.stride(1), x.stride(2), cent.stride(0), cent.stride(1),
        ids.stride(0), ids.stride(1), h, length, heads_per_set, cent.shape[0], cent.shape[1],
        BLOCK_T=BLOCK_T, C_PAD=_pow2(cent.shape[1]), HEAD_DIM=d, D_PAD=_pow2(d),
        D_CHUNK=min(32, _pow2(d)), num_warps=WARPS)
    return ids.long()


def compile_clusters(arch: str, head_dim: int, dtype: str, n_clusters: int) -> dict:
    """Compile the assignment for ``arch``; registers and spills from cuobjdump."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..runtime.compile import parse_arch, resource_usage

    fn = _kernel(interpret=False)
    constexprs = dict(BLOCK_T=BLOCK_T, C_PAD=_pow2(n_clusters), HEAD_DIM=head_dim,
                      D_PAD=_pow2(head_dim), D_CHUNK=min(32, _pow2(head_dim)))
    data = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype]
    sig = {name: "constexpr" if name in constexprs else data if name == "X"
           else "*fp32" if name == "Cent" else "*i32" if name == "Ids" else "i32"
           for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", parse_arch(arch), 32),
                              options={"num_warps": WARPS, "num_stages": 1})
    usage = resource_usage(compiled.asm["cubin"])
    return {"arch": arch, "registers": usage["registers"], "spills": usage["local"],
            "stack": usage["stack"], "cubin_size": len(compiled.asm["cubin"])}
