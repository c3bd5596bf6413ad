"""NATTEN-compatible functional API: ``na1d``, ``na2d``, ``na3d`` on heads-last tensors.

NATTEN's ``natten.na2d(q, k, v, kernel_size, stride, dilation, is_causal, scale,
additional_keys, additional_values, ..., return_lse)`` takes ``[B, *spatial, H, D]``
tensors; these take the same arguments, in the same order, and the same layout, and run
``sf.neighborhood`` through ``sf.attention``, so a NATTEN user switches by changing the
import. GQA is accepted (fewer key/value heads dividing the query heads).

``additional_keys``/``additional_values`` (``[B, N, H, D]``: extra tokens every query
attends to, such as text tokens beside a video grid) are attended densely and merged with
the neighbourhood result by log-sum-exp (``sf.merge``), as NATTEN does. NATTEN's
kernel-selection knobs (``backend`` names such as ``"cutlass-fna"``, tile shapes, KV
splits, persistent kernels, schedules, ``torch_compile``, ``attention_kwargs``) choose how
NATTEN runs, never what it computes: they are accepted and left to sparseforge's planner.
``backend`` also takes sparseforge's own names (``"auto"``, ``"triton"``, ``"torch"``).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .api import attention
from .ir.neighborhood import neighborhood
from .ir.nodes import full
from .merging import merge
from .runtime.dispatch import BACKENDS


@lru_cache(maxsize=256)
def _pattern(shape, kernel_size, stride, dilation, is_causal):
    return neighborhood(shape, kernel_size, dilation=dilation, stride=stride, causal=is_causal)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


#: NATTEN's implementation names (natten 0.21): they pick a kernel, not a result
NATTEN_BACKENDS = ("cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna")
_TUNING = ("q_tile_shape", "kv_tile_shape", "backward_q_tile_shape", "backward_kv_tile_shape",
           "backward_kv_splits", "backward_use_pt_reduction", "run_persistent_kernel",
           "kernel_schedule", "torch_compile")


def _backend(name: str, backend) -> str:
    if backend is None or backend in NATTEN_BACKENDS:
        return "auto"
    if backend in BACKENDS:
        return backend
    raise ValueError(f"{name}(backend={backend!r}): expected one of sparseforge's "
                     f"{', '.join(BACKENDS)} or NATTEN's {', '.join(NATTEN_BACKENDS)} (or None)")


def _check_tensors(name: str, ndim: int, query, key, value) -> tuple[int, ...]:
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
    return spatial


def _check_additional(name: str, query, key, extra_k, extra_v):
    if (extra_k is None) != (extra_v is None):
        raise ValueError(f"{name}(additional_keys=..., additional_values=...): give both or "
                         "neither")
    for arg, t in (("additional_keys", extra_k), ("additional_values", extra_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}({arg}=...): expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[0] != query.shape[0] or t.shape[2] != key.shape[-2]:
            raise ValueError(f"{name}({arg}=...): expected [batch, tokens, heads, head_dim] with "
                             f"query's batch {query.shape[0]} and key's {key.shape[-2]} heads, "
                             f"got shape {tuple(t.shape)}")
    if extra_k.shape[1] != extra_v.shape[1]:
        raise ValueError(f"{name}(additional_values=...): {extra_v.shape[1]} tokens, "
                         f"additional_keys has {extra_k.shape[1]}")


def _na(ndim: int, query, key, value, kernel_size, stride, dilation, is_causal, scale,
        additional_keys, additional_values, attention_kwargs, backend, return_lse, tuning):
    name = f"na{ndim}d"
    spatial = _check_tensors(name, ndim, query, key, value)
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise TypeError(f"{name}(attention_kwargs=...): expected a dict or None, got "
                        f"{type(attention_kwargs).__name__}")
    unknown = sorted(set(tuning) - set(_TUNING))
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword argument(s) {', '.join(unknown)}")
    backend = _backend(name, backend)
    if is_causal is None:
        is_causal = False
    pattern = _pattern(spatial, _hashable(kernel_size), _hashable(stride), _hashable(dilation),
                       _hashable(is_causal))

    def flat(t):  # [B, *spatial, H, D] -> [B, H, L, D] (a view when t is contiguous)
        return t.flatten(1, ndim).transpose(1, 2)

    gqa = query.shape[-2] != key.shape[-2]
    out, lse = attention(flat(query), flat(key), flat(value), pattern, scale=scale,
                         enable_gqa=gqa, return_lse=True, backend=backend)
    if additional_keys is not None or additional_values is not None:
        _check_additional(name, query, key, additional_keys, additional_values)
        extra = attention(flat(query), additional_keys.transpose(1, 2),
                          additional_values.transpose(1, 2), full(), scale=scale, enable_gqa=gqa,
                          return_lse=True, backend=backend)
        out, lse = merge([out, extra[0]], [lse, extra[1]])
    out = out.transpose(1, 2).reshape(*query.shape[:-1], value.shape[-1])
    if not return_lse:
        return out
    return out, lse.transpose(1, 2).reshape(query.shape[:-1])


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, attention_kwargs=None, backend=None,
         *, return_lse=False, **tuning):
    """1-D neighbourhood attention, NATTEN's ``na1d``: tensors ``[B, X, H, D]``; with
    ``return_lse``, also the log-sum-exp ``[B, X, H]`` (natural log)."""
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, attention_kwargs, backend, return_lse, tuning)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, attention_kwargs=None, backend=None,
         *, return_lse=False, **tuning):
    """2-D neighbourhood attention, NATTEN's ``na2d``: tensors ``[B, X, Y, H, D]``; with
    ``return_lse``, also the log-sum-exp ``[B, X, Y, H]`` (natural log)."""
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, attention_kwargs, backend, return_lse, tuning)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, attention_kwargs=None, backend=None,
         *, return_lse=False, **tuning):
    """3-D neighbourhood attention, NATTEN's ``na3d``: tensors ``[B, X, Y, Z, H, D]``; with
    ``return_lse``, also the log-sum-exp ``[B, X, Y, Z, H]`` (natural log)."""
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, attention_kwargs, backend, return_lse, tuning)
