"""The routed split-KV decode kernel under Triton's interpreter: 1 to 16 new tokens
against a cache, each row's selection from the same rules over the cache, the splits
sharing every kv tile and merged exactly. Against the fp64 oracle for every bucket rule
(with and without static parts, GQA with one routing head per query head or per group,
empty rows, a softcap), several splits, and no host read in a warm call."""

import pytest
import torch

import sparseforge as sf
from sparseforge.planner.routing_steps import has_routed_decode
from sparseforge.runtime import triton_launch
from tests.helpers import host_reads_during, random_qkv

from .test_routed_backward import PATTERNS


@pytest.fixture
def splits(monkeypatch):
    """The kv splits of each decode call."""
    seen = []
    real = triton_launch.decode_layout

    def spy(*args):
        chunks, n = real(*args)
        seen.append(n)
        return chunks, n

    monkeypatch.setattr(triton_launch, "decode_layout", spy)
    return seen


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("name", [n for n, p in PATTERNS.items() if has_routed_decode(p)])
def test_routed_decode_equals_the_oracle(name, q_len, launched_kinds, splits):
    q, k, v = random_qkv(2, 4, 2, q_len, 70, 16, seed=q_len + len(name))
    out, lse = sf.attention(q, k, v, PATTERNS[name], enable_gqa=True, backend="triton",
                            return_lse=True)
    assert "decode" in launched_kinds and "forward" not in launched_kinds
    assert splits and splits[0] > 1
    ref, ref_lse = sf.reference_attention(q.double(), k.double(), v.double(), PATTERNS[name],
                                          enable_gqa=True, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite].double(), atol=1e-4,
                               rtol=1e-4)
    if name == "empty_rows" and q_len > 1:
        assert torch.isinf(ref_lse).any()


def test_routed_decode_over_a_long_cache_with_many_splits(splits):
    pattern = (sf.causal() & sf.topk_blocks(32, 3)) | sf.sliding_window(40) | sf.sinks(4)
    q, k, v = random_qkv(1, 8, 2, 3, 1000, 16, seed=2)
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton")
    assert splits[0] >= 8
    ref = sf.reference_attention(q.double(), k.double(), v.double(), pattern, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_warm_routed_decode_never_reads_a_tensor_on_the_host(monkeypatch):
    pattern = PATTERNS["moba"]
    q, k, v = random_qkv(1, 4, 2, 2, 70, 16, seed=4)
    sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton")  # warm
    reads = host_reads_during(
        lambda: sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton"), monkeypatch)
    assert not reads, reads


@pytest.mark.parametrize("name", ["vertical_slash_sinks", "clusters"])
def test_rules_without_a_routed_decode_run_the_forward_kernel(name, launched_kinds):
    """Lines and sorted clusters have no decode kernel: a few new tokens run the routed
    forward kernel, still exact."""
    q, k, v = random_qkv(1, 4, 2, 3, 70, 12, seed=1)
    out = sf.attention(q, k, v, PATTERNS[name], enable_gqa=True, backend="triton")
    assert "forward" in launched_kinds and "decode" not in launched_kinds
    ref = sf.reference_attention(q.double(), k.double(), v.double(), PATTERNS[name],
                                 enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
