"""``sf.topk_keys`` (DMA): per query head and query block, the k allowed keys with the
largest per-key bias, the bias added to the scores. The torch path and the oracle equal a
literal DMA-style implementation (per-block sort of the bias over the allowed keys); the
routed kernel equals the oracle in the interpreter (GQA, Lq != Lkv, batched bias, score
modifiers, a union with a window); the bias gets its gradient on the torch path; bad
bias shapes are refused by name."""

import pytest
import torch

import sparseforge as sf
from tests.helpers import assert_matches_oracle, random_qkv


def dma_literal(q, k, v, bias, top, query_block, causal=True):
    """Loops: for each head and query block, sort the bias over the keys the block's rows
    may see (ties to the lower key), keep the first ``top``; then fp64 attention with the
    bias added, causal."""
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    group = h // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    bias = (bias if bias.dim() == 3 else bias[None].expand(b, -1, -1)).double()
    p = torch.arange(lq) + lkv - lq
    mask = torch.zeros(b, h, lq, lkv, dtype=torch.bool)
    first = (lkv - lq) // query_block * query_block  # query blocks are aligned on positions
    for bi in range(b):
        for hi in range(h):
            for start in range(first, lkv, query_block):
                rows = [i for i in range(lq) if start <= p[i] < start + query_block]
                if not rows:
                    continue
                seen = torch.arange(lkv) <= p[rows].max() if causal else torch.ones(lkv, dtype=torch.bool)
                keys = [j for j in torch.sort(bias[bi, hi], descending=True, stable=True).indices.tolist()
                        if seen[j]][:top]
                for i in rows:
                    mask[bi, hi, i, keys] = True
    if causal:
        mask &= torch.arange(lkv)[None, :] <= p[:, None]
    s = (q.double() @ kk.transpose(-1, -2)) * d ** -0.5 + bias[:, :, None, :]
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0) @ vv


@pytest.mark.parametrize("b, h, hkv, lq, lkv, top, qb, batched", [
    (2, 2, 1, 70, 70, 5, 16, False),
    (1, 4, 2, 37, 90, 12, 8, True),
    (2, 2, 2, 64, 64, 100, 64, False),  # k above the allowed keys
])
def test_torch_path_and_oracle_equal_literal_dma(b, h, hkv, lq, lkv, top, qb, batched):
    g = torch.Generator().manual_seed(lq + top)
    q = torch.randn(b, h, lq, 16, generator=g)
    k, v = (torch.randn(b, hkv, lkv, 16, generator=g) for _ in range(2))
    bias = torch.randn(b, h, lkv, generator=g) if batched else torch.randn(h, lkv, generator=g)
    pattern = sf.causal() & sf.topk_keys(bias, top, query_block=qb)
    want = dma_literal(q, k, v, bias, top, qb)
    torch.testing.assert_close(sf.attention(q, k, v, pattern, enable_gqa=True).double(), want,
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(sf.reference_attention(q, k, v, pattern, enable_gqa=True).double(),
                               want, atol=1e-6, rtol=1e-6)  # returned in q.dtype


@pytest.mark.parametrize("pattern_of", [
    lambda bias: sf.causal() & sf.topk_keys(bias, 7, query_block=16),
    lambda bias: (sf.causal() & sf.topk_keys(bias, 3, query_block=8)) | sf.sliding_window(6),
    lambda bias: sf.topk_keys(bias, 20) & sf.softcap(4.0) & sf.alibi(torch.tensor([0.2, 0.1, 0.3, 0.5])),
], ids=["causal", "with_window", "with_modifiers"])
def test_routed_kernel_equals_the_oracle(pattern_of):
    q, k, v = random_qkv(2, 4, 2, 50, 77, 24, seed=5)
    pattern = pattern_of(torch.randn(2, 4, 77, generator=torch.Generator().manual_seed(6)))
    assert_matches_oracle(pattern, q, k, v, "triton")


def test_bias_gradient_on_the_torch_path():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    bias = torch.randn(2, 40, generator=g, requires_grad=True)
    pattern = sf.causal() & sf.topk_keys(bias, 6, query_block=8)
    go = torch.randn(1, 2, 40, 16, generator=g)
    (got,) = torch.autograd.grad(sf.attention(q, k, v, pattern), bias, go)
    (want,) = torch.autograd.grad(sf.reference_attention(q, k, v, pattern), bias, go.double())
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    assert got.abs().sum() > 0


def test_bad_bias_is_refused_by_name():
    with pytest.raises(TypeError, match="bias"):
        sf.topk_keys([1.0, 2.0], 1)
    with pytest.raises(ValueError, match="bias"):
        sf.topk_keys(torch.zeros(4), 1)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"topk_keys\(bias=\[3x16\]\)"):
        sf.attention(q, q, q, sf.topk_keys(torch.zeros(3, 16), 2))
