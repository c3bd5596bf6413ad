"""The semantic oracle: a dense mask and fp64 attention that applies it literally."""

from __future__ import annotations

import torch

from .ir.canonicalize import canonicalize
from .ir.nodes import Pattern, PerHead
from .ir.routing import is_dynamic
from .routing.reference import route
from .runtime.validate import SUPPORTED_DTYPES, check_attention_inputs
from .semantics import modified_scores, pair_mask


def dense_mask(pattern: Pattern, q_len: int, kv_len: int, *, batch: int | None = None,
               content=None, device=None) -> torch.Tensor:
    """Bool mask of allowed pairs.

    Shape ``[Lq, Lkv]`` for a head- and batch-independent pattern; ``[H, Lq, Lkv]`` for
    ``per_head``; ``[B, H or 1, Lq, Lkv]`` when a batched ``documents`` pattern (or
    ``batch``) makes it batch dependent. A pattern with routing nodes (``topk_blocks``
    and kin) is decided from the tensors: pass ``content=(q, k)`` or ``(q, k, scale)``
    (``[B, Hq, Lq, D]``, ``[B, Hkv, Lkv, D]``; scale defaults to D ** -0.5) and get
    ``[B, Hq, Lq, Lkv]``, routed by the torch reference (``sparseforge.routing``).
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern={type(pattern).__name__}: expected a sparseforge pattern")
    for name, v in (("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"dense_mask({name}={v!r}): expected an int >= 0")
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    if is_dynamic(pattern):
        return _routed_mask(canonicalize(pattern), i, j, q_len, kv_len, content)
    heads = pattern.patterns if isinstance(pattern, PerHead) else (pattern,)
    masks = [pair_mask(h, i, j, q_len, kv_len) for h in heads]
    batched = any(m.dim() == 3 for m in masks) or batch is not None
    if not batched:
        return masks[0] if len(masks) == 1 and not isinstance(pattern, PerHead) else torch.stack(masks)
    nb = max([m.shape[0] for m in masks if m.dim() == 3] + [batch or 1])
    masks = [(m if m.dim() == 3 else m[None]).expand(nb, q_len, kv_len) for m in masks]
    return torch.stack(masks, dim=1)


def _routed_mask(pattern: Pattern, i, j, q_len: int, kv_len: int, content) -> torch.Tensor:
    if content is None or len(content) not in (2, 3):
        raise ValueError(f"dense_mask({pattern!r}): a routed pattern needs content=(q, k) or "
                         "(q, k, scale)")
    q, k = content[0], content[1]
    if q.shape[2] != q_len or k.shape[2] != kv_len:
        raise ValueError(f"dense_mask(content=...): q and k have lengths {q.shape[2]} and "
                         f"{k.shape[2]}, expected q_len={q_len} and kv_len={kv_len}")
    scale = content[2] if len(content) == 3 and content[2] is not None else q.shape[-1] ** -0.5
    routing = route(pattern, q, k, scale)
    mask = pair_mask(pattern, i.to(q.device), j.to(q.device), q_len, kv_len, routing)
    while mask.dim() < 4:
        mask = mask[None]
    return mask.expand(q.shape[0], q.shape[1], q_len, kv_len)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
                        scale: float | None = None, enable_gqa: bool = False,
                        return_lse: bool = False):
    """Dense float64 attention under ``dense_mask(pattern)``: the correctness oracle.

    Rows with no allowed key give output 0 and lse ``-inf``. Returns ``out`` in the
    dtype of ``q`` (and ``lse`` in float32 if ``return_lse``).
    """
    shape = check_attention_inputs(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa,
                                   dtypes=SUPPORTED_DTYPES + (torch.float64,))
    canonical = canonicalize(pattern)
    mask = dense_mask(canonical, shape.q_len, shape.kv_len, device=q.device,
                      content=(q, k, shape.scale))
    if mask.dim() == 3:  # per-head [H, Lq, Lkv]
        mask = mask[None]
    group = shape.q_heads // shape.kv_heads
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * shape.scale
    s = _modified(canonical, s, shape)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs, vv).to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out


def _modified(canonical: Pattern, s: torch.Tensor, shape) -> torch.Tensor:
    """Scores after each head's score modifiers (alibi, rel_bias, softcap), in fp64."""
    p = torch.arange(shape.q_len, device=s.device)[:, None] + (shape.kv_len - shape.q_len)
    j = torch.arange(shape.kv_len, device=s.device)[None, :]
    if not isinstance(canonical, PerHead):
        return modified_scores(canonical, s, torch.arange(shape.q_heads), p, j)
    return torch.cat([modified_scores(head, s[:, h:h + 1], torch.tensor([h]), p, j)
                      for h, head in enumerate(canonical.patterns)], dim=1)
