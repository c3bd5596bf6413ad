"""``sf.attention`` as a ``torch.library`` custom op, so compiled models do not break.

Under ``torch.compile`` dynamo cannot trace our planner and launcher (Python dicts,
numpy, Triton), and should not: the op ``sparseforge::attention`` is opaque to it,
with a fake implementation (shapes only) and an autograd formula that calls a second
op, ``sparseforge::attention_backward``. Patterns are not tensors, so the op takes a
string key: ``pattern_key`` registers the pattern in this process and is marked
``assume_constant_result``, which makes dynamo run it once while tracing and bake the
key into the graph as a constant.

Patterns holding run-time tensors (``documents(ids)``) cannot be graph constants; under
``torch.compile`` they raise a clear error for now.
"""

from __future__ import annotations

import torch

from ..ir.nodes import Documents, Pattern, walk

_patterns: dict[str, Pattern] = {}


@torch.compiler.assume_constant_result
def pattern_key(pattern: Pattern) -> str:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected a sparseforge pattern, got {type(pattern).__name__}")
    if any(isinstance(n, Documents) for n in walk(pattern)):
        raise NotImplementedError("documents(ids) patterns are not supported under torch.compile "
                                  "yet: their ids are run-time tensors, not graph constants")
    key = repr(pattern)
    _patterns.setdefault(key, pattern)
    return key


@torch.library.custom_op("sparseforge::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, scale: float,
                 enable_gqa: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .dispatch import attention

    with torch.no_grad():
        out, lse = attention(q, k, v, _patterns[pattern], scale=scale, enable_gqa=enable_gqa,
                             return_lse=True, backend=backend)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, pattern, scale, enable_gqa, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sparseforge::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          pattern: str, scale: float, enable_gqa: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .dispatch import attention_backward

    dq, dk, dv, _ = attention_backward(q, k, v, out, lse, grad_out, grad_lse, _patterns[pattern],
                                       scale=scale, enable_gqa=enable_gqa, backend=backend)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, pattern, scale, enable_gqa,
                             backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern, scale, enable_gqa, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.meta = (pattern, scale, enable_gqa, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, *ctx.meta)
    return dq, dk, dv, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(q, k, v, pattern, *, scale, enable_gqa, return_lse, backend):
    """What ``sf.attention`` does while dynamo traces: one opaque op call."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = attention_op(q, k, v, pattern_key(pattern), float(scale), enable_gqa, backend)
    return (out, lse) if return_lse else out
