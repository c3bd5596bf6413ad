"""The demo: sliding window + attention sinks at L = 4096 on CPU, end to end."""

from __future__ import annotations

import torch

from .api import attention
from .benchmarks import best
from .ir.nodes import sinks, sliding_window
from .oracle import dense_mask, reference_attention
from .planner.plan import plan


def run_demo(length: int = 4096, window: int = 256, n_sinks: int = 4, heads: int = 4,
             head_dim: int = 64, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    pattern = sliding_window(window) | sinks(n_sinks)
    q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
    p = plan(pattern, q_len=length, kv_len=length, head_dim=head_dim, dtype="float32", target="cpu")
    mask = dense_mask(pattern, length, length)
    ours = best(lambda: attention(q, k, v, pattern), repeats)
    sdpa = best(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    repeats)
    out = attention(q, k, v, pattern)
    ref = reference_attention(q, k, v, pattern)
    return {"pattern": repr(pattern), "plan": p.explain(), "length": length,
            "sparseforge_s": ours, "sdpa_dense_mask_s": sdpa, "speedup": sdpa / ours,
            "max_abs_error": (out.double() - ref.double()).abs().max().item()}
