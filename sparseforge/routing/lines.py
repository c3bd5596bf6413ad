"""The generated pre-kernels of ``vertical_slash`` (``templates/vertical_slash.py.jinja``):
MInference's estimate from the last queries, as three kernels (row log-sum-exps, column
masses, diagonal masses), then the top-n columns and diagonals among the candidates.

The static part beside the node is printed into the kernels as their ``_allowed``
predicate (documents, whose ids are run-time data, route with the torch reference).
Each column and each diagonal is summed by exactly one program (no atomics), so the
masses, and the selection, are deterministic; every output has a size known before the
call.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from .._version import __version__
from ..codegen.predicate import triton_predicate
from ..codegen.render import TEMPLATE_VERSION, _environment, check_context
from ..ir.nodes import Documents, Full, Intersection, walk
from ..ir.routing import VerticalSlash
from ..ir.scores import strip_scores
from ..runtime.cache import load_kernel_module
from .kernels import RoutingSource, _pow2
from .reference import line_candidates, select_topk
from .selection import LineSelection

BLOCK_N = 32  # keys per column program
BLOCK_O = 64  # diagonals per diagonal program
#: the fp32 (IEEE) score tiles of up to 128 rows x D=128 spill on 4 warps (cuobjdump)
WARPS = {"lse": 8, "columns": 8, "diagonals": 4}
LOG2E = 1.4426950408889634


def lines_supported(siblings) -> bool:
    """Whether the pre-kernels can print the static part (no document ids)."""
    return not any(isinstance(n, Documents) for s in siblings for n in walk(s))


def _predicate(siblings) -> str:
    parts = [strip_scores(s) for s in siblings]
    return triton_predicate(Intersection(tuple(parts)) if len(parts) > 1
                            else parts[0] if parts else Full())


@lru_cache(maxsize=64)
def render_lines(node: VerticalSlash, predicate: str) -> RoutingSource:
    tag = f"vertical_slash_q{node.last_q}_{hashlib.sha256(predicate.encode()).hexdigest()[:10]}"
    context = dict(version=__version__, template_version=TEMPLATE_VERSION, name=f"route_{tag}",
                   last_q=node.last_q, predicate=predicate, node_repr=repr(node))
    check_context(context)
    source = _environment().get_template("vertical_slash.py.jinja").render(**context)
    return RoutingSource(f"route_{tag}", source, hashlib.sha256(source.encode()).hexdigest())


def lines_module(node: VerticalSlash, siblings, interpret: bool):
    src = render_lines(node, _predicate(siblings))
    return load_kernel_module(src.name, src.source, interpret=interpret), src


def route_lines(node: VerticalSlash, siblings, q: torch.Tensor, k: torch.Tensor, scale: float,
                *, interpret: bool) -> tuple[LineSelection, torch.Tensor, torch.Tensor]:
    """(the ``LineSelection`` of ``node``, column masses ``[B, Hq, Lkv]``, diagonal masses
    ``[B, Hq, 2 Lkv - 1]``) for q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lkv, D]``, estimated by
    the generated pre-kernels."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    module, src = lines_module(node, siblings, interpret)
    q, k = q.contiguous(), k.contiguous()
    r_pad, d_pad = _pow2(min(node.last_q, q_len)), _pow2(d)
    lse = torch.empty(b * hq, r_pad, dtype=torch.float32, device=q.device)
    vertical = torch.empty(b, hq, kv_len, dtype=torch.float32, device=q.device)
    slash = torch.empty(b, hq, 2 * kv_len - 1, dtype=torch.float32, device=q.device)
    common = (q.stride(1), q.stride(2), k.stride(1), k.stride(2), hq, hq // hkv, q_len, kv_len,
              scale * LOG2E)
    sizes = dict(R_PAD=r_pad, HEAD_DIM=d, D_PAD=d_pad)
    upcast = dict(UPCAST=interpret and q.dtype == torch.bfloat16)
    getattr(module, f"{src.name}_lse")[(b * hq,)](q, k, lse, *common, BLOCK_N=BLOCK_N, **sizes,
                                                  **upcast, num_warps=WARPS["lse"])
    getattr(module, f"{src.name}_columns")[(-(-kv_len // BLOCK_N), b * hq)](
        q, k, lse, vertical, *common, BLOCK_N=BLOCK_N, **sizes, **upcast,
        num_warps=WARPS["columns"])
    getattr(module, f"{src.name}_diagonals")[(-(-(2 * kv_len - 1) // BLOCK_O), b * hq)](
        q, k, lse, slash, *common, BLOCK_O=BLOCK_O, **sizes, num_warps=WARPS["diagonals"])
    col_cand, diag_cand = line_candidates(siblings, q_len, kv_len, q.device)
    columns = select_topk(vertical, col_cand[:, None].expand_as(vertical), node.n_vertical)
    diagonals = select_topk(slash, diag_cand[:, None].expand_as(slash), node.n_slash)
    return LineSelection(columns, diagonals), vertical, slash


_POINTERS = {"Lse": "*fp32", "Vertical": "*fp32", "Slash": "*fp32", "qk_scale": "fp32"}
_DATA = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def compile_lines(node: VerticalSlash, siblings, arch: str, head_dim: int, dtype: str) -> list[dict]:
    """Compile the three pre-kernels for ``arch`` and read back registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..runtime.compile import parse_arch, resource_usage

    module, src = lines_module(node, siblings, interpret=False)
    sizes = dict(R_PAD=_pow2(node.last_q), HEAD_DIM=head_dim, D_PAD=_pow2(head_dim))
    out = []
    for step, extra in (("lse", dict(BLOCK_N=BLOCK_N, UPCAST=False)),
                        ("columns", dict(BLOCK_N=BLOCK_N, UPCAST=False)),
                        ("diagonals", dict(BLOCK_O=BLOCK_O))):
        fn = getattr(module, f"{src.name}_{step}")
        constexprs = {**sizes, **extra}
        sig = {name: "constexpr" if name in constexprs else
               _DATA[dtype] if name in ("Q", "K") else _POINTERS.get(name, "i32")
               for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", parse_arch(arch), 32),
                                  options={"num_warps": WARPS[step], "num_stages": 1})
        usage = resource_usage(compiled.asm["cubin"])
        out.append({"kernel": f"{src.name}_{step}", "arch": arch, "step": step,
                    "registers": usage["registers"], "spills": usage["local"],
                    "stack": usage["stack"], "cubin_size": len(compiled.asm["cubin"])})
    return out
