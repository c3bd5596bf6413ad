"""``sf.attention``: the one entry point every backend is reached through.

``backend="reference"`` runs the oracle (``sparseforge.oracle``, dense fp64, apart from
the code it judges); under ``torch.compile`` a static pattern becomes one opaque custom op
(``runtime.custom_op``) so compiled models do not graph-break; everything else runs the
plan on an executor (``runtime.dispatch``).
"""

from __future__ import annotations

import torch

from .ir.nodes import EvaluatedMask, Pattern, walk
from .ir.routing import is_dynamic
from .oracle import reference_attention
from .runtime import custom_op, dispatch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
              scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
              backend: str = "auto"):
    """Sparse attention of ``q`` [B, Hq, Lq, D] over ``k``/``v`` [B, Hkv, Lkv, D].

    Returns ``out`` [B, Hq, Lq, D] (and ``lse`` [B, Hq, Lq], natural log, if
    ``return_lse``). A query with no allowed key gives 0 and lse ``-inf``. ``backend``:
    ``"auto"`` (generated Triton kernels on CUDA, the plan run with torch ops on CPU),
    ``"triton"`` (the kernels; Triton's interpreter for CPU tensors), ``"torch"``, or
    ``"reference"`` (the dense fp64 oracle). Differentiable on every backend.
    """
    if backend == "reference":
        return reference_attention(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa,
                                   return_lse=return_lse)
    if torch.compiler.is_compiling():
        if any(isinstance(n, EvaluatedMask) for n in walk(pattern)):
            raise ValueError("pattern: a mask_mod evaluated as a table (from_mask_mod(..., "
                             "fallback='blocks')) cannot run under torch.compile; call it "
                             "outside the compiled region or give the mask a closed form")
        if not is_dynamic(pattern):
            return custom_op.compiled_attention(q, k, v, pattern, scale=scale,
                                                enable_gqa=enable_gqa, return_lse=return_lse,
                                                backend=backend)
    return dispatch.attention(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa,
                              return_lse=return_lse, backend=backend)
