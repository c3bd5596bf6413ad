"""The corpus of FlexAttention masks (``tests/flex/corpus.py``) and score modifiers
(below) written the way Flex users write them (Flex's documentation and attention-gym,
and the patterns of the seed papers), each read by ``sf.from_mask_mod`` /
``sf.from_score_mod`` and checked in three ways:

* the dense mask of the pattern equals Flex's own ``create_mask`` of the function;
* ``sf.flex_attention`` equals Flex's ``flex_attention`` (CPU forward) on both libraries'
  block masks;
* the forward and the q, k and v gradients equal the fp64 oracle, on the torch path and
  in the Triton interpreter.

The lengths are not multiples of 128; Lq != Lkv appears both ways. There are per-head
and per-batch masks, and compositions with Flex's ``and_masks``/``or_masks``. Each
recognised pattern is also planned with no run-time index tensor where it is affine.
"""

import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as flex

import sparseforge as sf
from tests.flex.corpus import B, H, mask_corpus
from tests.helpers import random_qkv

HKV = 1
SQUARE, WIDE, TALL = (50, 50), (29, 66), (66, 29)
MASKS = mask_corpus(1)
assert len(MASKS) >= 25


def _mask(name):
    return MASKS[name].mask_mod


def _flex_mask(mask_mod, q_len, kv_len):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex.create_mask(mask_mod, B, H, q_len, kv_len, device="cpu")


def _flex_out(q, k, v, mask_mod=None, score_mod=None, **kw):
    block_mask = (None if mask_mod is None else
                  flex.create_block_mask(mask_mod, B, H, q.shape[-2], k.shape[-2], device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, **kw)


def _oracle_check(q, k, v, pattern, backend, scale=None):
    """Forward and q/k/v gradients against fp64 autograd through the oracle."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sf.attention(*leaves, pattern, enable_gqa=True, backend=backend, scale=scale)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sf.reference_attention(*ref_leaves, pattern, enable_gqa=True, scale=scale)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    got = torch.autograd.grad(out, leaves, grad.float())
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_equals_flex_and_the_oracle(name):
    entry = MASKS[name]
    mask_mod, kw, q_len, kv_len = entry.mask_mod, entry.keywords, entry.q_len, entry.kv_len
    pattern = sf.from_mask_mod(mask_mod, **kw)
    dense = sf.dense_mask(pattern, q_len, kv_len, batch=B)
    assert torch.equal(dense.expand(B, H, q_len, kv_len), _flex_mask(mask_mod, q_len, kv_len))
    q, k, v = random_qkv(B, H, H, q_len, kv_len, 16, seed=q_len + kv_len)
    ours = sf.flex_attention(q, k, v, block_mask=sf.create_block_mask(
        mask_mod, B, H, q_len, kv_len, device="cpu"))
    torch.testing.assert_close(ours, _flex_out(q, k, v, mask_mod), atol=2e-5, rtol=1e-5)
    batch = B if "batch" in kw else 1  # (the oracle check runs on one batch row otherwise)
    q, k, v = random_qkv(batch, H, HKV, q_len, kv_len, 24, seed=q_len)
    for backend in ("torch", "triton"):
        _oracle_check(q, k, v, pattern, backend)


def test_affine_masks_need_no_index_tensor_and_one_plan_serves_many_lengths():
    for name in ("causal", "sliding_window", "strict_causal", "kv_scaled_band", "streaming_llm",
                 "chunked_causal", "symmetric_window", "offset_causal"):
        pattern = sf.from_mask_mod(_mask(name))
        text = sf.plan(pattern, q_len=4096, kv_len=4096, head_dim=64, target="sm_90").explain()
        assert "no index tensor" in text, name
        kernels = {sf.plan(pattern, q_len=n, kv_len=n, head_dim=64, target="sm_90").kernels
                   for n in (1000, 2048, 3001)}
        assert len(kernels) == 1, name


# ---------------------------------------------------------------------- score mods

SLOPES = sf.alibi_slopes(H)
REL_TABLE = torch.randn(H, 33, generator=torch.Generator().manual_seed(1)) * 0.5
SHARED_TABLE = torch.randn(17, generator=torch.Generator().manual_seed(2)) * 0.5
GRAPH_BIAS = torch.randn(H, 50, 50, generator=torch.Generator().manual_seed(3))
BATCH_BIAS = torch.randn(B, H, 29, 66, generator=torch.Generator().manual_seed(4))


def softcap(score, b, h, q_idx, kv_idx):  # Gemma 2
    return 30.0 * torch.tanh(score / 30.0)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def relative_position(score, b, h, q_idx, kv_idx):  # T5-style clipped offsets, per head
    return score + REL_TABLE[h, torch.clamp(kv_idx - q_idx, -16, 16) + 16]


def shared_relative_position(score, b, h, q_idx, kv_idx):  # one table for all heads
    return score + SHARED_TABLE[torch.clamp(q_idx - kv_idx, -8, 8) + 8]


def graph_bias(score, b, h, q_idx, kv_idx):  # Graphormer's spatial encoding
    return score + GRAPH_BIAS[h, q_idx, kv_idx]


def batch_pair_bias(score, b, h, q_idx, kv_idx):  # a bias per example
    return score + BATCH_BIAS[b, h, q_idx, kv_idx]


def capped_alibi(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh((score + SLOPES[h] * (kv_idx - q_idx)) / 20.0)


def scaled(score, b, h, q_idx, kv_idx):  # a temperature on the scores
    return score * 0.5


def alibi_and_relative(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx) + REL_TABLE[h, torch.clamp(kv_idx - q_idx, -16, 16) + 16]


#: score_mod -> (mask_mod, from_score_mod keywords, lengths)
SCORES = {
    softcap: ("causal", {}, SQUARE), alibi: ("sliding_window", {}, TALL),
    relative_position: ("causal", {}, WIDE),
    shared_relative_position: (None, {"heads": H}, SQUARE),
    graph_bias: ("symmetric_window", {}, SQUARE), batch_pair_bias: ("offset_causal", {}, WIDE),
    capped_alibi: ("prefix_lm", {}, WIDE), scaled: ("causal", {}, TALL),
    alibi_and_relative: ("streaming_llm", {}, SQUARE),
}
assert len(SCORES) >= 8


@pytest.mark.parametrize("score_mod", list(SCORES), ids=lambda f: f.__name__)
def test_score_mod_equals_flex_and_the_oracle(score_mod):
    mask_name, kw, (q_len, kv_len) = SCORES[score_mod]
    mask_mod = None if mask_name is None else _mask(mask_name)
    q, k, v = random_qkv(B, H, H, q_len, kv_len, 16, seed=q_len)
    block_mask = (None if mask_mod is None else
                  sf.create_block_mask(mask_mod, B, H, q_len, kv_len, device="cpu"))
    ours = sf.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    want = _flex_out(q, k, v, mask_mod, score_mod)
    torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-5)
    mask = sf.full() if mask_mod is None else sf.from_mask_mod(mask_mod)
    scale = None
    if score_mod is scaled:  # a factor on the scale (a pattern holds none)
        with pytest.raises(ValueError, match="scale"):
            sf.from_score_mod(score_mod)
        pattern, scale = mask, 0.5 / 24 ** 0.5
    else:
        pattern = mask & sf.from_score_mod(score_mod, **kw)
    batch = B if score_mod is batch_pair_bias else 1
    q, k, v = random_qkv(batch, H, HKV, q_len, kv_len, 24, seed=kv_len)
    for backend in ("torch", "triton"):
        _oracle_check(q, k, v, pattern, backend, scale)
