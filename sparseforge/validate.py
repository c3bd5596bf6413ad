"""Input checks for the public entry points, raised before any planning or kernel work."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .ir.nodes import Pattern, PerHead
from .ir.scores import check_score_tensors

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256


class AttentionShape(NamedTuple):  # a tuple, not a dataclass: built on every warm call
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    scale: float
    value_dim: int  # v's head dim: the output's; may differ from q/k's (MLA)


def check_attention_inputs(q, k, v, pattern, *, scale=None, enable_gqa=False,
                           dtypes=SUPPORTED_DTYPES) -> AttentionShape:
    """Validate q/k/v/pattern/scale as SDPA and FlexAttention users expect; name the culprit.
    Every warm call passes here, so each tensor attribute is read once (each read costs
    a fraction of a microsecond)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: dtype {t.dtype} is not supported; use one of {names}")
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = q.device
    if k.device != device or v.device != device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected a sparseforge pattern (e.g. sf.causal()), got "
                        f"{type(pattern).__name__}")
    (b, hq, lq, d), (bk, hkv, lkv, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    if (bk, hkv, lkv) != (bv, hv, lv):
        raise ValueError(f"k and v must have the same [B, H, L], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if bk != b:
        raise ValueError(f"k: batch {bk} does not match q's batch {b}")
    if dk != d:
        raise ValueError(f"k: head dim {dk} does not match q's head dim {d} (v's head dim may "
                         "differ; q's and k's may not)")
    for name, size in (("q", d), ("v", dv)):
        if not MIN_HEAD_DIM <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: head dim {size} is outside the supported range "
                             f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if hkv != hq:
        if not enable_gqa:
            raise ValueError(f"k has {hkv} heads but q has {hq}; pass enable_gqa=True for "
                             "grouped-query attention")
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"enable_gqa=True: q heads ({hq}) must be a multiple of k/v heads "
                             f"({hkv})")
    if isinstance(pattern, PerHead) and len(pattern.patterns) != hq:
        raise ValueError(f"per_head: got {len(pattern.patterns)} patterns for {hq} query heads")
    check_score_tensors(pattern, b, hq, lq, lkv)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale={scale!r}: expected a finite float or None")
    return AttentionShape(b, hq, hkv, lq, lkv, d, float(scale), dv)
