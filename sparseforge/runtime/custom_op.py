"""``sf.attention`` as a ``torch.library`` custom op, so compiled models do not break.

Under ``torch.compile`` dynamo cannot trace our planner and launcher (Python dicts,
numpy, Triton), and should not: the op ``sparseforge::attention`` is opaque to it,
with a fake implementation (shapes only) and an autograd formula that calls a second
op, ``sparseforge::attention_backward``. Patterns are not tensors, so the op takes the
pattern's ``repr`` as a string (dynamo traces it and guards on the values it reads,
so a new pattern object of the same structure reuses the graph) and the tensors the
pattern holds (document ids, ALiBi slopes, rel_bias tables) as a list input; the op
rebuilds this call's pattern by parsing the repr with those tensors in its
placeholders. The rel_bias tables get gradients through it.
"""

from __future__ import annotations

import functools

import torch

from ..ir.nodes import Pattern
from ..ir.patterns_parse import parse_repr, placeholder_kinds
from ..ir.scores import pattern_tensors, window_tables
from .dispatch import attention, attention_backward, check_table_grads, compile_pattern, resolve_backend


def pattern_key(pattern: Pattern) -> str:
    """The pattern's structure: its repr (tensors appear only as placeholders)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected a sparseforge pattern, got {type(pattern).__name__}")
    return repr(pattern)


def _call_pattern(key: str, tensors: list[torch.Tensor]) -> Pattern:
    return _rebuilt(key, tuple(tensors))


@functools.lru_cache(maxsize=256)
def _rebuilt(key: str, tensors: tuple) -> Pattern:
    """One pattern object per (structure, tensor objects): a warm call then hits
    ``compile_pattern``'s cache instead of parsing and canonicalising again. Tensors
    hash by identity, and a cached entry keeps its tensors (so their ids) alive."""
    return parse_repr(key, list(tensors))


@torch.library.custom_op("sparseforge::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor],
                 pattern: str, scale: float, enable_gqa: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out, lse = attention(q, k, v, _call_pattern(pattern, tensors), scale=scale,
                             enable_gqa=enable_gqa, return_lse=True, backend=backend)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, tensors, pattern, scale, enable_gqa, backend):
    return (q.new_empty((*q.shape[:3], v.shape[-1])),
            q.new_empty(q.shape[:3], dtype=torch.float32))


def _table_slots(key: str) -> list[int]:
    return [i for i, kind in enumerate(placeholder_kinds(key)) if kind in ("table", "bias")]


@torch.library.custom_op("sparseforge::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          tensors: list[torch.Tensor], pattern: str, scale: float,
                          enable_gqa: bool, backend: str) -> list[torch.Tensor]:
    """[dq, dk, dv, then one gradient per rel_bias table slot of ``tensors``]: a table
    that fills several slots gets its gradient in the first, zeros in the others."""
    call = _call_pattern(pattern, tensors)
    dq, dk, dv, grads = attention_backward(q, k, v, out, lse, grad_out, grad_lse, call,
                                           scale=scale, enable_gqa=enable_gqa, backend=backend)
    by_id = {id(t): g for t, g in zip(compile_pattern(call).tables, grads)}
    table_grads = []
    for slot in _table_slots(pattern):
        g = by_id.pop(id(tensors[slot]), None)
        table_grads.append(g.contiguous() if g is not None else torch.zeros_like(tensors[slot]))
    return [dq.contiguous(), dk.contiguous(), dv.contiguous(), *table_grads]


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, tensors, pattern, scale,
                             enable_gqa, backend):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            *(tensors[slot].new_empty(tensors[slot].shape) for slot in _table_slots(pattern))]


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, pattern, scale, enable_gqa, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.meta = (pattern, scale, enable_gqa, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, *table_grads = attention_backward_op(grad_out, grad_lse, q, k, v, out, lse,
                                                     tensors, *ctx.meta)
    tensor_grads: list = [None] * len(tensors)
    for slot, g in zip(_table_slots(ctx.meta[0]), table_grads):
        tensor_grads[slot] = g
    return dq, dk, dv, tensor_grads, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(q, k, v, pattern, *, scale, enable_gqa, return_lse, backend):
    """What ``sf.attention`` does while dynamo traces: one opaque op call."""
    tensors = pattern_tensors(pattern)
    check_table_grads(resolve_backend(backend, q)[0], window_tables(pattern))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = attention_op(q, k, v, tensors, pattern_key(pattern), float(scale), enable_gqa,
                            backend)
    return (out, lse) if return_lse else out
