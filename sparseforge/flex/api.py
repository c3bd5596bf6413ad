"""FlexAttention's front end: ``from_mask_mod``, ``from_score_mod``, ``create_block_mask``
and ``flex_attention`` with Flex's signature.

A Flex user changes one import. The ``mask_mod`` is read once, symbolically (``flex.trace``
then ``flex.lower``), into a closed-form pattern that holds for every length: nothing is
evaluated per block at run time. A function that cannot be read that way still runs:
``sf.flex_attention`` hands the call to FlexAttention itself (with one warning per
function), so switching never breaks a model.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..api import attention
from ..ir.affine import drop_top_left
from ..ir.canonicalize import canonicalize
from ..ir.nodes import (
    Documents,
    EvaluatedMask,
    Full,
    Intersection,
    MaskTable,
    Pattern,
    PerHead,
    walk,
)
from ..ir.scores import Alibi, RelBias
from ..planner.ranges import tile_segments
from ..planner.schedule import visit_matrices
from .lower import lower_mask
from .scores import recognise_scores
from .trace import FlexTraceError, trace_mask_mod, trace_score_mod

#: traced functions, keyed by the function and what its closure holds (a rebound closure
#: variable is a new key); bounded so that lambdas made per call do not grow it forever
_CACHE: dict = {}
_CACHE_SIZE = 256
_WARNED: set = set()


def from_mask_mod(mask_mod, *, heads: int | None = None, batch: int | None = None,
                  fallback: str | None = None) -> Pattern:
    """The pattern of a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    Read once, symbolically: comparisons of affine expressions in ``q_idx``/``kv_idx``
    (with ``//`` and ``%`` by constants, ``abs``, ``&``, ``|``, ``~``, ``torch.where``)
    become causal, windows, chunks, dilation, sinks, global tokens, or ``affine``
    half-planes; ``ids[q_idx] == ids[kv_idx]`` becomes ``documents``; a mask that reads
    ``h`` becomes ``per_head`` (pass ``heads``). The result is ``top_left``-aligned, as
    Flex's ``q_idx`` is the query's row. Raises ``ValueError`` naming the construct (and
    the line, for Python control flow on an index) when the function has no closed form.
    ``batch``: patterns are shared by the batch (per-sequence document ids
    ``ids[b, q_idx]`` are the one ``b``-dependent closed form); a fallback mask is evaluated
    for ``batch`` rows.

    ``fallback="blocks"``: a function with no closed form becomes a ``mask_table``
    evaluated once per (Lq, Lkv) over the whole grid by Flex's ``create_mask`` (the cost
    of Flex's ``create_block_mask``: O(Lq * Lkv) time and memory; per head when ``heads``
    is given, else at h = 0), exact, then run like any table."""
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"from_mask_mod(heads={heads!r}): expected a positive int")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"from_mask_mod(batch={batch!r}): expected a positive int")
    if fallback not in (None, "blocks"):
        raise ValueError(f"from_mask_mod(fallback={fallback!r}): expected None or 'blocks'")
    try:
        return _cached(("mask", heads), mask_mod,
                       lambda: lower_mask(trace_mask_mod(mask_mod), heads))
    except FlexTraceError:
        if fallback is None:
            raise
    if heads is None:
        return EvaluatedMask(mask_mod=mask_mod, batch=batch)
    return PerHead(tuple(EvaluatedMask(mask_mod=mask_mod, head=h, batch=batch)
                         for h in range(heads)))


def from_score_mod(score_mod, *, heads: int | None = None) -> Pattern:
    """The score modifiers of a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)``:
    softcap, ALiBi, a relative-position bias table (see ``flex.scores``), to join to a
    mask with ``&``. A score multiplied by a constant is refused here (a pattern holds no
    scale; pass ``scale=`` to ``sf.attention``, as ``sf.flex_attention`` does itself)."""
    found = _recognised_scores(score_mod, heads)
    if found.scale != 1.0:
        raise ValueError(f"from_score_mod: the score_mod multiplies the score by {found.scale}; "
                         "pass scale=<scale * factor> to sf.attention instead")
    return found.pattern


def _recognised_scores(score_mod, heads):
    return _cached(("score", heads), score_mod,
                   lambda: recognise_scores(trace_score_mod(score_mod), heads))


def _cached(kind, fn, build):
    key = (kind, fn, _closure_key(fn))
    try:
        hit = _CACHE.get(key)
    except TypeError:  # an unhashable closure value: trace every time
        return build()
    if hit is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        hit = _CACHE[key] = build()
    return hit


def _closure_key(fn) -> tuple:
    """What a function reads besides its arguments: closure cells and defaults (tensors by
    identity and whether they want a gradient, since a recognised modifier may hold a view
    of them; numbers by value)."""
    cells = getattr(fn, "__closure__", None) or ()
    values = [c.cell_contents for c in cells if _has_contents(c)]
    values += list(getattr(fn, "__defaults__", None) or ())
    return tuple((id(v), v.requires_grad) if isinstance(v, torch.Tensor) else v for v in values
                 if isinstance(v, (torch.Tensor, int, float, bool, str, type(None))))


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------- block masks


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128):  # noqa: N803
    """A FlexAttention ``BlockMask`` for ``mask_mod``, usable by Flex's ``flex_attention``
    and by ``sf.flex_attention`` alike (Flex's signature).

    When the mask has a closed form (and no per-token ids, mask tables or per-head parts), its block
    tables come from the pattern's tile bounds: no ``mask_mod`` evaluation over the
    ``Q_LEN x KV_LEN`` grid. Otherwise Flex's own ``create_block_mask`` builds it."""
    # FlexAttention's module loads its compiler stack: only Flex's own objects need it
    import torch.nn.attention.flex_attention as flex

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pattern = from_mask_mod(mask_mod, heads=H)
    except FlexTraceError:
        pattern = None
    if pattern is None or any(isinstance(n, (Documents, MaskTable, PerHead)) for n in walk(pattern)):
        return flex.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=device,
                                      BLOCK_SIZE=BLOCK_SIZE)
    block = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    tables = block_tables(pattern, Q_LEN, KV_LEN, *block)
    tables = [torch.from_numpy(t).to(device)[None, None] for t in tables]
    return flex.BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block, mask_mod=mask_mod,
                                         seq_lengths=(Q_LEN, KV_LEN))


def block_tables(pattern: Pattern, q_len: int, kv_len: int, block_m: int, block_n: int):
    """Flex's (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) for a
    single-head static pattern, from its closed-form tile sets: partial blocks hold some
    allowed pair, full blocks only allowed pairs (int32, [Tq] and [Tq, Tk])."""
    canonical = canonicalize(pattern)
    if q_len == kv_len:
        canonical = canonicalize(drop_top_left(canonical))
    visit, full = visit_matrices(tile_segments(canonical), q_len, kv_len, block_m, block_n)
    if q_len % block_m:  # like Flex: a block with padded rows is never called full
        full[-1] = False
    return (*_indices(visit & ~full), *_indices(full))


def _indices(blocks: np.ndarray):
    """Per row of blocks: how many are set, and their indices first (ascending)."""
    counts = blocks.sum(1).astype(np.int32)
    order = np.argsort(~blocks, axis=1, kind="stable").astype(np.int32)
    return counts, order


# ---------------------------------------------------------------------- the call


def flex_attention(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, *, backend="auto"):
    """``torch.nn.attention.flex_attention.flex_attention``'s signature and results, run
    by sparseforge: the block mask's ``mask_mod`` and the ``score_mod`` are read into a
    closed-form pattern (cached per function), then ``sf.attention`` runs it. Queries are
    aligned to the first key and ``lse`` is the natural log, as in Flex. A function with
    no closed form (or a block mask built from block indices alone) runs on Flex itself."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flex_attention({name}=...): expected a [B, H, L, D] tensor")
    q_len, kv_len = q.shape[-2], k.shape[-2]
    _check_block_mask(block_mask, q_len, kv_len)
    try:
        pattern, factor = _call_pattern(q, score_mod, block_mask, q_len, kv_len)
    except FlexTraceError as exc:
        return _on_flex(exc, q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse)
    scale = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale) * factor
    return attention(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa,
                     return_lse=return_lse, backend=backend)


def _check_block_mask(block_mask, q_len: int, kv_len: int) -> None:
    if block_mask is None:
        return
    lengths = getattr(block_mask, "seq_lengths", None)
    if lengths is None or not hasattr(block_mask, "mask_mod"):
        raise TypeError(f"flex_attention(block_mask={type(block_mask).__name__}): expected a "
                        "BlockMask (sf.create_block_mask or Flex's create_block_mask)")
    if tuple(lengths) != (q_len, kv_len):
        raise ValueError(f"flex_attention(block_mask=...): built for lengths {tuple(lengths)}, "
                         f"called with (Lq, Lkv) = ({q_len}, {kv_len})")


def _call_pattern(q, score_mod, block_mask, q_len, kv_len):
    """(pattern, factor on the scale) of one call."""
    # FlexAttention's module loads its compiler stack: imported when a block mask is given
    from torch.nn.attention.flex_attention import noop_mask

    heads = q.shape[1]
    if block_mask is None:
        mask = None
    elif block_mask.mask_mod is noop_mask:
        raise FlexTraceError("the block mask has no mask_mod: its block indices alone define "
                             "the mask")
    else:
        mask = from_mask_mod(block_mask.mask_mod, heads=heads)
    factor, parts = 1.0, []
    if score_mod is not None:
        found = _recognised_scores(score_mod, heads)
        factor, parts = found.scale, list(found.modifiers)
        if q_len != kv_len and any(isinstance(m, RelBias) for m in parts):
            raise FlexTraceError("a relative-position table with Lq != Lkv: Flex offsets "
                                 "rows from the first key, sparseforge from the last")
        # Flex's ALiBi reads kv_idx - q_idx with rows aligned to the first key; sparseforge's
        # j - p aligns them to the last: the same scores with offset Lkv - Lq (exact, and
        # right under a softcap, which a shifted lse is not)
        parts = [Alibi(m.slopes, m.offset + kv_len - q_len) if isinstance(m, Alibi) else m
                 for m in parts]
    pattern = mask if mask is not None else Full()
    if parts:
        pattern = _with_modifiers(pattern, parts)
    return pattern, factor


def _with_modifiers(pattern: Pattern, modifiers: list) -> Pattern:
    if isinstance(pattern, PerHead):
        return PerHead(tuple(Intersection((p, *modifiers)) for p in pattern.patterns))
    return Intersection((pattern, *modifiers))


def _on_flex(exc, q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse):
    """Run the call on FlexAttention itself (warned once per function)."""
    # FlexAttention's module loads its compiler stack: only this hand-over needs it
    import torch.nn.attention.flex_attention as flex

    key = (getattr(block_mask, "mask_mod", None), score_mod)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"sparseforge.flex_attention: running on FlexAttention: {exc}",
                      stacklevel=3)
    return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                               enable_gqa=enable_gqa, return_lse=return_lse)
