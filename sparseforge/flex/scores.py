"""A traced ``score_mod`` (``flex.trace``) recognised as sparseforge's score modifiers.

Recognised, in sparseforge's order (bias terms, then the cap):

* ``cap * tanh(x / cap)`` around the rest: ``softcap(cap)`` (Gemma 2, Grok-1);
* ``slopes[h] * (kv_idx - q_idx)``: ``alibi(slopes)``;
* ``table[h, clamp(kv_idx - q_idx, -R, R) + R]`` (or without the clamp, or indexed by
  ``q_idx - kv_idx``, or a table shared by the heads): ``rel_bias`` (differentiable in
  the table, as in Flex);
* ``bias[q_idx, kv_idx]``, ``bias[h, q_idx, kv_idx]``, ``bias[b, q_idx, kv_idx]`` or
  ``bias[b, h, q_idx, kv_idx]``: ``pair_bias`` (a bias per pair: Graphormer, a T5 bias
  materialised per pair; differentiable in the tensor, as in Flex);
* ``score * c``: a factor on the scale, returned apart (``Recognised.scale``): a pattern
  cannot hold it, ``sf.flex_attention`` folds it into ``scale``.

Anything else (other ``b``-dependent terms, other lookups, other functions) raises
``FlexTraceError`` naming the term.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from ..ir.nodes import Full, Intersection, Pattern
from ..ir.scores import Alibi, PairBias, RelBias, Softcap
from .trace import KV, SCORE, B, FlexTraceError, H, Lookup, Q, Traced


@dataclass(frozen=True)
class Recognised:
    """The modifiers of a score_mod (``pattern``: ``full()`` when there are none) and the
    factor it puts on the scaled score."""

    pattern: Pattern
    scale: float
    modifiers: tuple


def recognise_scores(traced: Traced, heads: int | None = None) -> Recognised:
    expr, name = traced.expr, traced.name
    modifiers: list = []
    cap, expr = _softcap(expr)
    scale = sympy.expand(expr).coeff(SCORE)
    bias = sympy.expand(expr - scale * SCORE)
    if SCORE in bias.free_symbols or not scale.is_number or scale <= 0:
        raise FlexTraceError(f"score_mod {name}: {expr} is not a positive multiple of the "
                             "score plus a bias")
    slope = bias.coeff(KV)
    if slope != 0:
        modifiers.append(_alibi(slope, -bias.coeff(Q), traced, heads))
        bias = sympy.expand(bias - slope * (KV - Q))
    pairs = [t for t in sympy.Add.make_args(bias) if _pair_index(t) is not None]
    if len(pairs) > 1:
        raise FlexTraceError(f"score_mod {name}: {' + '.join(map(str, pairs))}: one per-pair "
                             "bias tensor per score_mod (add the tensors first)")
    bias = sympy.expand(bias - sum(pairs))
    if bias != 0:
        modifiers.append(_rel_bias(bias, traced, heads))
    modifiers += [_pair_bias(t, traced) for t in pairs]
    if cap is not None:
        modifiers.append(Softcap(float(cap)))
    pattern = Intersection((Full(), *modifiers)) if modifiers else Full()
    return Recognised(pattern, float(scale), tuple(modifiers))


def _softcap(expr):
    """``(c, x)`` of ``c * tanh(x / c)``, or ``(None, expr)``."""
    if not isinstance(expr, sympy.Mul) or len(expr.args) != 2:
        return None, expr
    number, other = sorted(expr.args, key=lambda a: not isinstance(a, sympy.Number))
    if not (isinstance(number, sympy.Number) and isinstance(other, sympy.tanh) and number > 0):
        return None, expr
    inner = sympy.expand(other.args[0] * number)
    if SCORE not in inner.free_symbols:
        return None, expr
    return number, inner


def _alibi(slope, q_slope, traced: Traced, heads):
    if sympy.expand(slope - q_slope) != 0:
        raise FlexTraceError(f"score_mod {traced.name}: kv_idx and q_idx enter with different "
                             "factors; only slope * (kv_idx - q_idx) (ALiBi) has a form")
    factor, lookup = slope.as_coeff_Mul()  # (1.0 * slopes[h] after a float cap's algebra)
    if isinstance(lookup, Lookup) and tuple(lookup.args[1:]) == (H,):
        slopes = traced.tables[int(lookup.args[0])]
        if factor != 1:
            slopes = slopes * float(factor)
    elif slope.is_number:
        if heads is None:
            raise FlexTraceError(f"score_mod {traced.name}: one ALiBi slope for every head; "
                                 "pass heads=<number of query heads> (or index slopes[h])")
        slopes = torch.full((heads,), float(slope))
    else:
        raise FlexTraceError(f"score_mod {traced.name}: ALiBi slope {slope} must be slopes[h] "
                             "or a number")
    if not slopes.dtype.is_floating_point:
        slopes = slopes.float()
    return Alibi(slopes.detach())


def _rel_bias(bias, traced: Traced, heads):
    """``table[h, clamp(kv - q, -R, R) + R]`` (variants in the module docstring)."""
    if not isinstance(bias, Lookup):
        raise FlexTraceError(f"score_mod {traced.name}: the bias {bias} has no form here "
                             "(supported: ALiBi slopes[h] * (kv_idx - q_idx) and a relative-"
                             "position table[h, kv_idx - q_idx + R])")
    table = traced.tables[int(bias.args[0])]
    index = bias.args[1:]
    if len(index) == 2 and index[0] == H:
        offset = index[1]
    elif len(index) == 1:
        offset = index[0]
    else:
        raise FlexTraceError(f"score_mod {traced.name}: {bias}: a bias table is indexed by "
                             "[h, offset] or [offset], a per-pair bias by [(b,) (h,) q_idx, "
                             "kv_idx]")
    width = table.shape[-1]
    radius = (width - 1) // 2
    sign = _offset_sign(offset, radius)
    if sign is None or width % 2 == 0:
        raise FlexTraceError(f"score_mod {traced.name}: {bias}: the offset must be "
                             f"(kv_idx - q_idx) + R, optionally clamped to [-R, R], with R = "
                             f"(table width - 1) / 2 = {radius}")
    if not table.dtype.is_floating_point:
        raise FlexTraceError(f"score_mod {traced.name}: the bias table must be floating point")
    if table.dim() == 1:  # one table for every head
        if heads is None:
            raise FlexTraceError(f"score_mod {traced.name}: one bias table for every head; "
                                 "pass heads=<number of query heads> (or index table[h, ...])")
        rows = table[None].expand(heads, -1)
    else:
        rows = table
    rows = rows.flip(-1) if sign < 0 else rows
    return RelBias(rows)


#: index forms of a per-pair bias lookup -> which of (batch, head) they index
_PAIR_FORMS = {(Q, KV): (), (H, Q, KV): (1,), (B, Q, KV): (0,), (B, H, Q, KV): (0, 1)}


def _pair_index(term):
    """The dims (0: batch, 1: head) a per-pair lookup ``t[..., q_idx, kv_idx]`` indexes,
    or None for any other term."""
    if not isinstance(term, Lookup):
        return None
    return _PAIR_FORMS.get(tuple(term.args[1:]))


def _pair_bias(term, traced: Traced) -> PairBias:
    """``bias[(b,) (h,) q_idx, kv_idx]`` as a pair bias holding the captured tensor (or a
    view of it), so its gradient reaches it."""
    tensor = traced.tables[int(term.args[0])]
    if not tensor.dtype.is_floating_point:
        raise FlexTraceError(f"score_mod {traced.name}: the per-pair bias {term} must be "
                             "floating point")
    if _pair_index(term) == (0,):  # [B, Lq, Lkv]: a view with the head dim
        return PairBias(tensor.unsqueeze(1))
    return PairBias(tensor)  # [Lq, Lkv], [H, Lq, Lkv], [B, H, Lq, Lkv]: pair_bias's own forms


def _offset_sign(offset, radius: int) -> int | None:
    """+1 for ``kv - q + R`` (or its clamp to [-R, R] plus R), -1 for ``q - kv + R``."""
    for sign in (1, -1):
        rel = sign * (KV - Q)
        clamped = sympy.Min(sympy.Max(rel, -radius), radius)
        for form in (rel + radius, clamped + radius):
            if sympy.simplify(offset - form) == 0:
                return sign
    return None
