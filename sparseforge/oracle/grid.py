"""The pair grid the oracle evaluates a pattern on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """The pair grid of one call: rows ``i`` ``[Lq, 1]``, their absolute positions ``p``
    (bottom-right aligned; the rows themselves under ``top_left``), keys ``j`` ``[1, Lkv]``;
    ``content`` = (q, k, scale) when the pattern routes."""

    q_len: int
    kv_len: int
    device: torch.device | None = None
    content: tuple | None = None
    top_left: bool = False

    @property
    def i(self) -> torch.Tensor:
        return torch.arange(self.q_len, device=self.device)[:, None]

    @property
    def p(self) -> torch.Tensor:
        return self.i if self.top_left else self.i + (self.kv_len - self.q_len)

    @property
    def j(self) -> torch.Tensor:
        return torch.arange(self.kv_len, device=self.device)[None, :]


def as4d(m: torch.Tensor) -> torch.Tensor:
    """``[Lq, Lkv]`` -> ``[1, 1, Lq, Lkv]``; ``[B, Lq, Lkv]`` -> ``[B, 1, Lq, Lkv]``."""
    if m.dim() == 2:
        return m[None, None]
    if m.dim() == 3:
        return m[:, None]
    return m


def floor_div(a, b):
    return torch.div(a, b, rounding_mode="floor")
