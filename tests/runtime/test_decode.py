"""The split-KV decode kernel (a few new tokens against a long KV cache) against the fp64
oracle: every static family at q_len 1, 4 and 16, GQA heads packed per program, splits
merged by the exact LSE combine, empty rows; sf.attention picks it by itself."""

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import triton_launch
from tests.helpers import random_qkv

FAMILIES = [
    sf.causal(), sf.sliding_window(50) | sf.sinks(4), sf.sinks(7), sf.chunks(64) & sf.causal(),
    sf.window(8, 0, dilation=3), sf.prefix_lm(20), sf.global_queries(290) | sf.window(5, 0),
    sf.per_head([sf.causal()] * 3 + [sf.sliding_window(30)] * 5),  # a GQA group split in two
]


def _check(q, k, v, pattern, tol=2e-5):
    out, lse = sf.attention(q, k, v, pattern, enable_gqa=True, return_lse=True, backend="triton")
    ref, ref_lse = sf.reference_attention(q, k, v, pattern, enable_gqa=True, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse.double() - ref_lse)[finite].abs().max().item() <= 1e-4


@pytest.mark.parametrize("q_len", [1, 4, 16])
@pytest.mark.parametrize("pattern", FAMILIES, ids=repr)
def test_decode_matches_the_oracle(pattern, q_len, launched_kinds):
    _check(*random_qkv(2, 8, 2, q_len, 301, 40, seed=q_len), pattern)
    assert "decode" in launched_kinds and "forward" not in launched_kinds


@pytest.mark.parametrize("q_len", [1, 4, 16])
def test_decode_with_documents(q_len, launched_kinds):
    ids = torch.tensor([[0] * 150 + [1] * 151, [0] * 20 + [1] * 281])
    # one id tensor over the cache: the new tokens take its last q_len ids
    _check(*random_qkv(2, 4, 4, q_len, 301, 32, seed=9), sf.documents(ids) & sf.causal())
    assert "decode" in launched_kinds


def test_decode_splits_the_kv_range_and_merges_exactly():
    q, k, v = random_qkv(1, 4, 1, 4, 700, 64, seed=3)
    p = sf.plan(sf.causal(), q_len=4, kv_len=700, head_dim=64, dtype="float32", target="interpret")
    chunks, splits = triton_launch.decode_layout(p, 1, 4, 1)
    assert chunks == 1 and splits > 4  # 44 kv tiles of 16: several programs share them
    _check(q, k, v, sf.causal())


def test_short_cache_and_empty_rows(launched_kinds):
    # 16 new tokens against a 10-token cache: causal leaves the first 6 rows empty
    _check(*random_qkv(1, 2, 1, 16, 10, 24, seed=4), sf.causal())
    _check(*random_qkv(1, 2, 1, 3, 40, 24, seed=5), sf.sinks(0) | sf.window(0, 0))
    assert set(launched_kinds) == {"decode"}


def test_bf16_decode():
    q, k, v = random_qkv(1, 8, 1, 4, 200, 64, dtype=torch.bfloat16, seed=6)
    out = sf.attention(q, k, v, sf.sliding_window(64), enable_gqa=True, backend="triton")
    ref = sf.reference_attention(q, k, v, sf.sliding_window(64), enable_gqa=True)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max().item() <= 2e-2


def test_longer_queries_use_the_forward_kernel(launched_kinds):
    _check(*random_qkv(1, 2, 1, 17, 40, 16, seed=7), sf.causal())
    assert "forward" in launched_kinds and "decode" not in launched_kinds


def test_merge_partials_is_the_exact_combine():
    g = torch.Generator().manual_seed(0)
    parts = torch.randn(2, 3, 5, 4, 8, generator=g)
    lses = torch.randn(2, 3, 5, 4, generator=g)
    lses[0, 0, 0] = float("-inf")  # a row no split saw
    lses[1, 1, 1, :2] = float("-inf")  # splits with nothing in them
    out, lse = torch.empty(2, 3, 5, 8), torch.empty(2, 3, 5)
    triton_launch.merge_partials(parts, lses, out, lse)
    w = torch.softmax(lses, -1).nan_to_num(0.0)
    assert torch.allclose(out, (parts * w[..., None]).sum(-2), atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(lses, -1))
    assert out[0, 0, 0].eq(0).all() and lse[0, 0, 0] == float("-inf")
