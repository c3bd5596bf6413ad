"""NATTEN-compatible functional API: ``na1d``, ``na2d``, ``na3d`` on heads-last tensors.

NATTEN's ``natten.na2d(q, k, v, kernel_size, stride, dilation, is_causal, scale)`` takes
``[B, *spatial, H, D]`` tensors; these take the same arguments and layout and run
``sf.neighborhood`` through ``sf.attention``, so a NATTEN user switches by changing the
import. GQA is accepted (fewer key/value heads dividing the query heads).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .ir.neighborhood import neighborhood
from .runtime.dispatch import attention


@lru_cache(maxsize=256)
def _pattern(shape, kernel_size, stride, dilation, is_causal):
    return neighborhood(shape, kernel_size, dilation=dilation, stride=stride, causal=is_causal)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _na(ndim: int, query, key, value, kernel_size, stride, dilation, is_causal, scale, backend):
    name = f"na{ndim}d"
    for arg, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}({arg}=...): expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim + 3:
            raise ValueError(f"{name}({arg}=...): expected [batch, {ndim} spatial dims, heads, "
                             f"head_dim] ({ndim + 3} dims), got shape {tuple(t.shape)}")
    spatial = tuple(query.shape[1:1 + ndim])
    for arg, t in (("key", key), ("value", value)):
        if tuple(t.shape[1:1 + ndim]) != spatial or t.shape[0] != query.shape[0]:
            raise ValueError(f"{name}({arg}=...): batch and spatial dims {tuple(t.shape[:1 + ndim])} "
                             f"must match query's {tuple(query.shape[:1 + ndim])}")
    if is_causal is None:
        is_causal = False
    pattern = _pattern(spatial, _hashable(kernel_size), _hashable(stride), _hashable(dilation),
                       _hashable(is_causal))

    def flat(t):  # [B, *spatial, H, D] -> [B, H, L, D] (a view when t is contiguous)
        return t.flatten(1, ndim).transpose(1, 2)

    out = attention(flat(query), flat(key), flat(value), pattern, scale=scale,
                    enable_gqa=query.shape[-2] != key.shape[-2], backend=backend)
    return out.transpose(1, 2).reshape(*query.shape[:-1], value.shape[-1])


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, *,
         backend: str = "auto"):
    """1-D neighbourhood attention, NATTEN's ``na1d``: tensors ``[B, X, H, D]``."""
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, backend)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, *,
         backend: str = "auto"):
    """2-D neighbourhood attention, NATTEN's ``na2d``: tensors ``[B, X, Y, H, D]``."""
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, backend)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, *,
         backend: str = "auto"):
    """3-D neighbourhood attention, NATTEN's ``na3d``: tensors ``[B, X, Y, Z, H, D]``."""
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, backend)
