"""The demo: sliding window + attention sinks at L = 4096 on CPU, end to end, beside dense
SDPA and compiled FlexAttention on the same mask."""

from __future__ import annotations

import torch

from .api import attention
from .cpu_bench import flex_forward, timed_together
from .ir.nodes import sinks, sliding_window
from .oracle import dense_mask, reference_attention
from .planner.plan import plan


def run_demo(length: int = 4096, window: int = 256, n_sinks: int = 4, heads: int = 4,
             head_dim: int = 64, repeats: int = 5, with_flex: bool = True) -> dict:
    torch.manual_seed(0)
    pattern = sliding_window(window) | sinks(n_sinks)
    q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
    p = plan(pattern, q_len=length, kv_len=length, head_dim=head_dim, dtype="float32", target="cpu")
    mask = dense_mask(pattern, length, length)
    out = attention(q, k, v, pattern)
    ref = reference_attention(q, k, v, pattern)
    report = {"pattern": repr(pattern), "plan": p.explain(), "length": length,
              "max_abs_error": (out.double() - ref.double()).abs().max().item()}
    contenders = {
        "sparseforge_ms": lambda: attention(q, k, v, pattern),
        "sdpa_dense_mask_ms": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask)}
    if with_flex:
        def mask_mod(b, h, i, j):
            return ((i >= j) & (i - j < window)) | (j < n_sinks)
        flex, call = flex_forward(q, k, v, mask_mod, length)
        report["flex_status"] = flex["flex_status"]
        if call is not None:
            report["flex_first_call_ms"] = flex["flex_first_call_ms"]
            contenders["flex_compiled_ms"] = lambda: call(q, k, v)
    for name, t in timed_together(contenders, repeats).items():
        report[name] = t["median_ms"]
    report["speedup_vs_sdpa"] = report["sdpa_dense_mask_ms"] / report["sparseforge_ms"]
    if "flex_compiled_ms" in report:
        report["speedup_vs_flex"] = report["flex_compiled_ms"] / report["sparseforge_ms"]
    return report
