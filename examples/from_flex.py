"""Bring your FlexAttention code: one import changed, on CPU.

    python examples/from_flex.py

Common Flex masks are read once into closed-form patterns (printed below), run by
sparseforge, and compared with FlexAttention itself on the same inputs. The block mask
comes from ``sf.create_block_mask``: closed-form tile bounds, no mask evaluation over the
grid, and it works in Flex's own ``flex_attention`` too.
"""

import time
import warnings

import torch
from torch.nn.attention import flex_attention as flex

import sparseforge as sf

warnings.filterwarnings("ignore", message=".*flex_attention.*")  # Flex's eager-mode notice
torch.manual_seed(0)

WINDOW = 256
documents = torch.repeat_interleave(torch.arange(4), torch.tensor([350, 150, 450, 74]))


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 128) | (q_idx >= kv_idx)


def document_causal(b, h, q_idx, kv_idx):
    return (documents[q_idx] == documents[kv_idx]) & (q_idx >= kv_idx)


def dilated_band(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx) % 4 == 0) & ((q_idx - kv_idx).abs() <= 64)


def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


print("what each mask_mod is read as:")
for mask_mod in (causal, sliding_window, prefix_lm, document_causal, dilated_band):
    print(f"  {mask_mod.__name__:16s} -> {sf.from_mask_mod(mask_mod)}")
print(f"  {'softcap':16s} -> {sf.from_score_mod(softcap)}")

L = 1024
q = torch.randn(1, 8, L, 64)
k = torch.randn(1, 2, L, 64)
v = torch.randn(1, 2, L, 64)
print(f"\nB=1, Hq=8, Hkv=2, L={L}, D=64, fp32: sparseforge vs FlexAttention (eager, CPU)")
for mask_mod in (sliding_window, prefix_lm, document_causal, dilated_band):
    t = time.perf_counter()
    ours = sf.create_block_mask(mask_mod, None, None, L, L, device="cpu")
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = flex.create_block_mask(mask_mod, None, None, L, L, device="cpu")
    t_theirs = time.perf_counter() - t
    out = sf.flex_attention(q, k, v, score_mod=softcap, block_mask=ours, enable_gqa=True)
    want = flex.flex_attention(q, k, v, score_mod=softcap, block_mask=theirs, enable_gqa=True)
    print(f"  {mask_mod.__name__:16s} create_block_mask {t_ours * 1e3:6.1f} ms (Flex "
          f"{t_theirs * 1e3:6.1f} ms), max |sparseforge - Flex| = {(out - want).abs().max():.1e}")

# queries aligned to the first key: Flex's convention, exact at any Lq != Lkv
short = q[:, :, :300]
out = sf.flex_attention(short, k, v, block_mask=sf.create_block_mask(causal, None, None, 300, L,
                                                                     device="cpu"),
                        enable_gqa=True)
ref = sf.reference_attention(short, k, v, sf.from_mask_mod(causal), enable_gqa=True)
print(f"\nLq=300 < Lkv={L}, top-left causal: max |error| vs the fp64 oracle: "
      f"{(out - ref).abs().max():.1e}")

# the same pattern, planned: closed-form bounds, no index tensor at run time
plan = sf.plan(sf.from_mask_mod(sliding_window), q_len=L, kv_len=L, head_dim=64,
               dtype="bfloat16", target="sm_90")
print("\n" + "\n".join(plan.explain().splitlines()[:12]))
