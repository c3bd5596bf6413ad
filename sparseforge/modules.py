"""``sf.SparseAttention``: the attention op as a ``torch.nn.Module``."""

from __future__ import annotations

import torch

from .api import attention
from .ir.nodes import Pattern
from .runtime.dispatch import BACKENDS


class SparseAttention(torch.nn.Module):
    """``forward(q, k, v)`` = ``sf.attention(q, k, v, pattern, ...)`` on [B, H, L, D].

    GQA is enabled automatically when k/v have fewer heads than q. The module has no
    parameters; it exists so a pattern can live in a model's module tree (and in its
    ``repr``) and be swapped like any other layer. Works under ``torch.compile``.
    """

    def __init__(self, pattern: Pattern, *, scale: float | None = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"SparseAttention(pattern={type(pattern).__name__}): expected a "
                            f"sparseforge pattern such as sf.sliding_window(512)")
        if backend not in BACKENDS:
            raise ValueError(f"SparseAttention(backend={backend!r}): expected one of {', '.join(BACKENDS)}")
        self.pattern = pattern
        self.scale = scale
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                return_lse: bool = False):
        return attention(q, k, v, self.pattern, scale=self.scale,
                         enable_gqa=q.shape[1] != k.shape[1], return_lse=return_lse,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, scale={self.scale}, backend={self.backend!r}"
