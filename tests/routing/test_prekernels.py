"""The generated routing pre-kernels (pool -> score -> select): their fixed-k indices
equal the torch reference's in Triton's interpreter on random inputs, attention routed
by them equals the oracle, and every variant compiles for sm_80 and sm_90 without spills."""


import pytest
import torch

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.ir.split import static_siblings
from sparseforge.routing.rules import route
from sparseforge.routing.selection import BlockSelection
from sparseforge.runtime.prekernels import route_prekernels
from sparseforge.runtime.routed_torch import routed_attention
from tests.helpers import compile_in_subprocess

# one xdist worker runs this module: its module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("prekernels")

CASES = [  # (pattern, Lq, Lkv, Hq, Hkv, D)
    (sf.causal() & sf.topk_blocks(8, 3), 64, 64, 2, 2, 16),
    (sf.causal() & sf.topk_blocks(8, 2, query_block=1, share="group"), 30, 50, 4, 2, 24),
    (sf.topk_blocks(16, 2, pool="max", scale_by_sqrt_len=True, share="all") | sf.sinks(2), 40, 70, 3, 1, 13),
    (sf.sliding_window(20) & sf.topk_blocks(4, 6, query_block=8), 48, 48, 2, 1, 32),  # k > candidates
    (sf.causal() & sf.topk_chunks(torch.tensor([0, 5, 20, 21, 40, 64]), 2), 64, 64, 2, 2, 16),
    (sf.causal() & sf.topk_chunks(torch.tensor([[0, 9, 30, 64], [0, 33, 34, 64]]), 1, share="all"),
     64, 64, 4, 2, 16),
]


@pytest.mark.parametrize("pattern,lq,lkv,hq,hkv,d", CASES)
def test_prekernel_indices_equal_the_reference(pattern, lq, lkv, hq, hkv, d):
    torch.manual_seed(lq + lkv + d)
    canonical = canonicalize(pattern)
    q, k = torch.randn(2, hq, lq, d), torch.randn(2, hkv, lkv, d)
    ((node, want),) = route(canonical, q, k, d ** -0.5).items()
    got, counts, call, heads = route_prekernels(node, static_siblings(canonical, node), q, k,
                                                d ** -0.5, interpret=True)
    assert got.dtype == torch.int32 and got.shape == (2, call.routing_heads, call.n_q, node.k)
    assert counts is None
    assert torch.equal(got, want.fixed_k_indices(node.k))
    assert torch.equal(heads, want.heads)


@pytest.mark.parametrize("coverage,share,lq,lkv", [
    (0.5, "head", 64, 64), (0.9, "group", 40, 72), (0.2, "all", 48, 48), (1.0, "head", 33, 33),
])
def test_coverage_prekernel_equals_the_reference(coverage, share, lq, lkv):
    """threshold_blocks: worst-case rows and counts, compacted to the CSR layout."""
    torch.manual_seed(int(coverage * 10) + lq)
    canonical = canonicalize(sf.causal() & sf.threshold_blocks(8, coverage, share=share))
    q, k = torch.randn(2, 4, lq, 16), torch.randn(2, 2, lkv, 16)
    ((node, want),) = route(canonical, q, k, 0.25).items()
    rows, counts, call, heads = route_prekernels(node, static_siblings(canonical, node), q, k,
                                                 0.25, interpret=True)
    assert rows.shape == (2, call.routing_heads, call.n_q, call.n_k)
    assert torch.equal(rows, want.fixed_k_indices(call.n_k))
    assert torch.equal(counts, want.selected.sum(-1).int())
    got = BlockSelection.from_fixed_k(rows, call.q_starts, call.k_starts, heads)
    for a, b in zip(got.csr(), want.csr()):
        assert torch.equal(a, b)


def test_bf16_inputs_route_in_fp32():
    torch.manual_seed(1)
    pattern = canonicalize(sf.causal() & sf.topk_blocks(8, 2))
    q, k = torch.randn(1, 2, 48, 16).bfloat16(), torch.randn(1, 2, 48, 16).bfloat16()
    ((node, want),) = route(pattern, q, k, 0.25).items()
    got, _, _, _ = route_prekernels(node, static_siblings(pattern, node), q, k, 0.25,
                                    interpret=True)
    assert torch.equal(got, want.fixed_k_indices(2))


@pytest.mark.parametrize("pattern", [
    (sf.causal() & sf.topk_blocks(8, 2, query_block=1)) | (sf.causal() & sf.chunks(8)),
    sf.causal() & sf.threshold_blocks(8, 0.6),
])
def test_attention_routed_by_the_prekernels(pattern):
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out, _ = routed_attention(q, k, v, pattern, 0.25, prekernels="interpret")
    torch.testing.assert_close(out, sf.reference_attention(q, k, v, pattern, scale=0.25).float(),
                               atol=2e-5, rtol=1e-5)


def test_too_many_key_buckets_is_refused():
    q = torch.randn(1, 1, 20000, 16)
    node = sf.topk_blocks(1, 1)
    with pytest.raises(ValueError, match="key buckets"):
        route_prekernels(node, [], q, q, 0.25, interpret=True)


LINE_CASES = [  # (pattern, Lq, Lkv, Hq, Hkv, D)
    (sf.causal() & sf.vertical_slash(4, 5, last_q=8), 50, 50, 2, 1, 16),
    (sf.vertical_slash(3, 4, last_q=20) & sf.sliding_window(10), 37, 60, 4, 2, 24),
    (sf.vertical_slash(3, 4, last_q=64), 80, 40, 2, 2, 13),  # Lq > Lkv, last_q > Lq
    (sf.causal() & sf.chunks(16) & sf.vertical_slash(0, 6, last_q=16), 64, 64, 3, 1, 32),
    (sf.neighborhood((8, 8), 3) & sf.vertical_slash(5, 2, last_q=16), 64, 64, 2, 2, 16),
]


@pytest.mark.parametrize("pattern,lq,lkv,hq,hkv,d", LINE_CASES)
def test_vertical_slash_prekernels_equal_the_reference(pattern, lq, lkv, hq, hkv, d):
    from sparseforge.routing.rules import line_masses
    from sparseforge.runtime.prekernels import route_lines

    torch.manual_seed(lq + 3 * lkv + d)
    canonical = canonicalize(pattern)
    q, k = torch.randn(2, hq, lq, d), torch.randn(2, hkv, lkv, d)
    ((node, want),) = route(canonical, q, k, d ** -0.5).items()
    siblings = static_siblings(canonical, node)
    got, vertical, slash = route_lines(node, siblings, q, k, d ** -0.5, interpret=True)
    ref_vertical, ref_slash = line_masses(node, siblings, q, k, d ** -0.5)
    torch.testing.assert_close(vertical, ref_vertical, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slash, ref_slash, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.columns, want.columns) and torch.equal(got.diagonals, want.diagonals)


_COMPILE = """
import json, torch, sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.runtime.prekernel_compile import compile_routing
from sparseforge.runtime.prekernel_compile import compile_lines
from sparseforge.ir.split import static_siblings

nodes = [sf.topk_blocks(64, 8, query_block=1, share="group"),
         sf.topk_blocks(128, 16, pool="max", scale_by_sqrt_len=True),
         sf.topk_chunks(torch.tensor([0, 5, 9]), 4, share="all"),
         sf.threshold_blocks(64, 0.9, share="group")]
out = []
for node in nodes:
    for arch in ("sm_80", "sm_90"):
        for d, dtype, buckets in ((64, "float16", 512), (128, "bfloat16", 2048)):
            built = compile_routing(node, arch, d, dtype, buckets)
            out += [dict(r, node=repr(node), head_dim=d) for r in built]
for pattern in (sf.causal() & sf.vertical_slash(1000, 2000),
                sf.neighborhood((64, 64), 7) & sf.vertical_slash(64, 64, last_q=128)):
    canonical = canonicalize(pattern)
    node = next(n for n in canonical.parts if type(n).__name__ == "VerticalSlash")
    for arch in ("sm_80", "sm_90"):
        for d, dtype in ((64, "float16"), (128, "bfloat16")):
            built = compile_lines(node, static_siblings(canonical, node), arch, d, dtype)
            out += [dict(r, node=repr(node), head_dim=d) for r in built]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return compile_in_subprocess(_COMPILE)


def test_prekernels_compile_for_sm80_and_sm90_without_spills(compiled):
    assert len(compiled) == 4 * 2 * 2 * 3 + 2 * 2 * 2 * 3  # block rules, then vertical_slash
    assert {r["arch"] for r in compiled} == {"sm_80", "sm_90"}
    for r in compiled:
        assert r["cubin_size"] > 0, r
        assert r["spills"] == 0 and r["stack"] == 0, r
        assert 0 < r["registers"] <= 255, r
