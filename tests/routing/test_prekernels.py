"""The generated routing pre-kernels (pool -> score -> select): their fixed-k indices
equal the torch reference's in Triton's interpreter on random inputs, attention routed
by them equals the oracle, and every variant compiles for sm_80 and sm_90 without spills."""

import json
import os
import subprocess
import sys

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.routing.execute import routed_attention
from sparseforge.routing.kernels import route_topk
from sparseforge.routing.reference import _static_siblings, route

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
    got, call, heads = route_topk(node, _static_siblings(canonical, node), q, k, interpret=True)
    assert got.dtype == torch.int32 and got.shape == (2, call.routing_heads, call.n_q, node.k)
    assert torch.equal(got, want.fixed_k_indices(node.k))
    assert torch.equal(heads, want.heads)


def test_bf16_inputs_route_in_fp32():
    torch.manual_seed(1)
    pattern = canonicalize(sf.causal() & sf.topk_blocks(8, 2))
    q, k = torch.randn(1, 2, 48, 16).bfloat16(), torch.randn(1, 2, 48, 16).bfloat16()
    ((node, want),) = route(pattern, q, k, 0.25).items()
    got, _, _ = route_topk(node, _static_siblings(pattern, node), q, k, interpret=True)
    assert torch.equal(got, want.fixed_k_indices(2))


def test_attention_routed_by_the_prekernels():
    torch.manual_seed(2)
    pattern = (sf.causal() & sf.topk_blocks(8, 2, query_block=1)) | (sf.causal() & sf.chunks(8))
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out, _ = routed_attention(q, k, v, pattern, 0.25, prekernels="interpret")
    torch.testing.assert_close(out, sf.reference_attention(q, k, v, pattern, scale=0.25).float(),
                               atol=2e-5, rtol=1e-5)


def test_too_many_key_buckets_is_refused():
    q = torch.randn(1, 1, 20000, 16)
    node = sf.topk_blocks(1, 1)
    with pytest.raises(ValueError, match="key buckets"):
        route_topk(node, [], q, q, interpret=True)


_COMPILE = """
import json, torch, sparseforge as sf
from sparseforge.routing.kernels import compile_routing
nodes = [sf.topk_blocks(64, 8, query_block=1, share="group"),
         sf.topk_blocks(128, 16, pool="max", scale_by_sqrt_len=True),
         sf.topk_chunks(torch.tensor([0, 5, 9]), 4, share="all")]
out = []
for node in nodes:
    for arch in ("sm_80", "sm_90"):
        for d, dtype, buckets in ((64, "float16", 512), (128, "bfloat16", 2048)):
            built = compile_routing(node, arch, d, dtype, buckets)
            out += [dict(r, node=repr(node), head_dim=d) for r in built]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prekernels_compile_for_sm80_and_sm90_without_spills(compiled):
    assert len(compiled) == 3 * 2 * 2 * 3
    assert {r["arch"] for r in compiled} == {"sm_80", "sm_90"}
    for r in compiled:
        assert r["cubin_size"] > 0, r
        assert r["spills"] == 0 and r["stack"] == 0, r
        assert 0 < r["registers"] <= 255, r
