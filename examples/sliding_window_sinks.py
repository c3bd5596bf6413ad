"""Sliding-window attention with attention sinks (Mistral + StreamingLLM), on CPU.

    python examples/sliding_window_sinks.py
"""

import torch

import sparseforge as sf

pattern = sf.sliding_window(128) | sf.sinks(4)
q = torch.randn(2, 8, 1000, 64)
k = torch.randn(2, 2, 1000, 64)
v = torch.randn(2, 2, 1000, 64)

out, lse = sf.attention(q, k, v, pattern, enable_gqa=True, return_lse=True)
ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
print(sf.plan(pattern, q_len=1000, kv_len=1000, head_dim=64, dtype="float32").explain())
print("max |error| vs the fp64 oracle:", (out - ref).abs().max().item())

# dilated windows are planned as dilation groups (strided views) to keep tiles dense
dilated = sf.window(16, 16, dilation=4)
p = sf.plan(dilated, q_len=4096, kv_len=4096, head_dim=64, target="sm_90")
print(p.explain())
