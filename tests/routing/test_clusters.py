"""``sf.clusters`` (Routing Transformer): queries and keys (unit-normalised) go to their
nearest centroid, or each centroid takes its w nearest (balanced); pairs interact inside
a shared cluster. The torch path and the oracle equal a literal implementation (loops
over clusters), with GQA, shared centroids, Lq != Lkv and causality by position;
the cluster-sorted kernel equals the oracle in the interpreter; gradients flow; bad
centroids are refused by name."""

import pytest
import torch

import sparseforge as sf
from tests.helpers import assert_matches_oracle, compile_in_subprocess, random_qkv


def literal(q, k, v, centroids, balanced, causal=True):
    """Per (batch, head, cluster): the cluster's queries attend the cluster's keys (fp64)."""
    b, h, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    group = h // hkv
    p = torch.arange(lq) + lkv - lq
    mask = torch.zeros(b, h, lq, lkv, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            cent = centroids[min(hi // group, centroids.shape[0] - 1)].float()
            aq = torch.nn.functional.normalize(q[bi, hi].float(), dim=-1) @ cent.T
            ak = torch.nn.functional.normalize(k[bi, hi // group].float(), dim=-1) @ cent.T
            for c in range(cent.shape[0]):
                if balanced is None:
                    qs = (aq.argmax(-1) == c).nonzero().flatten()
                    ks = (ak.argmax(-1) == c).nonzero().flatten()
                else:
                    qs = torch.sort(aq[:, c], descending=True, stable=True).indices[:balanced]
                    ks = torch.sort(ak[:, c], descending=True, stable=True).indices[:balanced]
                mask[bi, hi, qs[:, None], ks[None, :]] = True
    if causal:
        mask &= torch.arange(lkv)[None, :] <= p[:, None]
    kk, vv = (x.double().repeat_interleave(group, 1) for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * d ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0) @ vv, mask


@pytest.mark.parametrize("b, h, hkv, lq, lkv, c, shared, balanced", [
    (2, 4, 2, 50, 50, 4, False, None),
    (1, 2, 2, 30, 70, 5, True, None),
    (2, 4, 1, 64, 64, 3, False, 12),
    (1, 2, 1, 40, 40, 6, True, 40),  # every token in every cluster: causal attention
])
def test_torch_path_and_oracle_equal_the_literal_clusters(b, h, hkv, lq, lkv, c, shared, balanced):
    g = torch.Generator().manual_seed(lq + c)
    q = torch.randn(b, h, lq, 16, generator=g)
    k, v = (torch.randn(b, hkv, lkv, 16, generator=g) for _ in range(2))
    centroids = torch.randn(1 if shared else hkv, c, 16, generator=g)
    pattern = sf.causal() & sf.clusters(centroids, balanced=balanced)
    want, mask = literal(q, k, v, centroids, balanced)
    torch.testing.assert_close(sf.attention(q, k, v, pattern, enable_gqa=True).double(), want,
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(sf.reference_attention(q, k, v, pattern, enable_gqa=True).double(),
                               want, atol=1e-6, rtol=1e-6)
    got_mask = sf.dense_mask(pattern, lq, lkv, content=(q, k))
    assert torch.equal(got_mask, mask)
    if balanced == lkv:
        assert torch.equal(mask[0, 0], sf.dense_mask(sf.causal(), lq, lkv))


def test_gradients_flow_through_the_torch_path():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g, requires_grad=True) for _ in range(3))
    pattern = sf.causal() & sf.clusters(torch.randn(2, 3, 8, generator=g))
    go = torch.randn(1, 2, 32, 8, generator=g)
    got = torch.autograd.grad(sf.attention(q, k, v, pattern), (q, k, v), go)
    want = torch.autograd.grad(sf.reference_attention(q, k, v, pattern), (q, k, v), go.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w.float(), atol=2e-5, rtol=1e-5)


def test_plan_shows_the_assignment_steps_and_triton_refuses_balanced():
    centroids = torch.randn(2, 8, 64)
    p = sf.plan(sf.causal() & sf.clusters(centroids), q_len=8192, kv_len=8192, head_dim=64)
    text = p.explain()
    assert "assign_q0" in text and "memberships [8192, 8]" in text and "sort0" in text
    q = torch.randn(1, 2, 16, 64)
    with pytest.raises(ValueError, match="no generated kernel"):  # overlapping clusters
        sf.attention(q, q, q, sf.causal() & sf.clusters(centroids, balanced=4), backend="triton")


@pytest.mark.parametrize("b, h, hkv, lq, lkv, c, softcap", [
    (2, 4, 2, 70, 70, 4, False),
    (1, 2, 1, 40, 90, 5, True),  # Lq != Lkv, shared centroids, a modifier
    (2, 2, 2, 64, 64, 1, False),  # one cluster: plain causal attention
])
def test_cluster_sorted_kernel_equals_the_oracle(b, h, hkv, lq, lkv, c, softcap):
    """The kernel runs each head's tokens sorted by cluster (a cluster = one run of keys),
    the causal predicate on original positions, and scatters the rows back."""
    q, k, v = random_qkv(b, h, hkv, lq, lkv, 24, seed=lkv + c)
    centroids = torch.randn(1 if softcap else hkv, c, 24, generator=torch.Generator().manual_seed(c))
    pattern = sf.causal() & sf.clusters(centroids)
    if softcap:
        pattern = pattern & sf.softcap(2.0)
    out, _ = assert_matches_oracle(pattern, q, k, v, "triton")
    if c == 1:
        causal = sf.attention(q, k, v, sf.causal(), enable_gqa=True, backend="triton")
        torch.testing.assert_close(out, causal, atol=2e-5, rtol=1e-5)


def test_bad_centroids_are_refused_by_name():
    with pytest.raises(TypeError, match="centroids"):
        sf.clusters([[0.0]])
    with pytest.raises(ValueError, match="centroids"):
        sf.clusters(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="balanced"):
        sf.clusters(torch.zeros(1, 4, 8), balanced=0)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="head dim 8"):
        sf.attention(q, q, q, sf.clusters(torch.zeros(1, 4, 6)))
    with pytest.raises(ValueError, match="centroid sets"):
        sf.attention(q, q, q, sf.clusters(torch.zeros(3, 4, 8)))


@pytest.mark.parametrize("hq, hkv, sets, c, d", [(4, 2, 2, 5, 16), (2, 1, 1, 3, 24), (4, 4, 4, 16, 64)])
def test_generated_assignment_equals_the_reference(hq, hkv, sets, c, d):
    from sparseforge.routing.rules import route_clusters
    from sparseforge.runtime.prekernels import assign

    g = torch.Generator().manual_seed(c + d)
    q, k = torch.randn(2, hq, 45, d, generator=g), torch.randn(2, hkv, 45, d, generator=g)
    node = sf.clusters(torch.randn(sets, c, d, generator=g))
    want = route_clusters(node, q, k)
    assert torch.equal(assign(node, q, hq // hkv, interpret=True),
                       want.q_member.to(torch.int8).argmax(-1))
    assert torch.equal(assign(node, k, 1, interpret=True), want.k_member.to(torch.int8).argmax(-1))


_COMPILE = """
import json
from sparseforge.runtime.prekernel_compile import compile_clusters
print(json.dumps([compile_clusters(arch, d, dtype, c) for arch in ("sm_80", "sm_90")
                  for d, dtype, c in ((64, "float16", 16), (128, "bfloat16", 64))]))
"""


def test_generated_assignment_compiles_for_sm80_and_sm90_without_spills():
    results = compile_in_subprocess(_COMPILE)
    assert len(results) == 4
    for r in results:
        assert r["cubin_size"] > 0 and r["spills"] == 0 and r["stack"] == 0, r


def test_a_pair_bias_keeps_clusters_out_of_the_sorted_kernel():
    """A pair bias reads the pair's positions, which the sorted kernel does not have (it
    once read sorted ones: a silent wrong answer). The kernel refuses; auto runs the torch
    path, equal to the oracle."""
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, seed=4)
    bias = torch.randn(1, 2, 40, 40, generator=torch.Generator().manual_seed(5))
    pattern = (sf.clusters(torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(6)))
               & sf.causal() & sf.pair_bias(bias))
    with pytest.raises(ValueError, match="no generated kernel"):
        sf.attention(q, k, v, pattern, backend="triton")
    assert_matches_oracle(pattern, q, k, v, "auto")
