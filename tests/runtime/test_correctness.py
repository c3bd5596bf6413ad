"""Both executors of a plan (generated Triton kernels under the interpreter, and the CPU
torch path) match the fp64 oracle: every primitive, combinations, GQA, Lq != Lkv, odd
head dims, empty rows, dtypes, and random expressions (hypothesis)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf
from tests.helpers import assert_matches_oracle, random_qkv
from tests.strategies import static_patterns

BACKENDS = ["triton", "torch"]

PATTERNS = [
    sf.full(),
    sf.causal(),
    sf.window(5, 3),
    sf.window(4, 2, dilation=3),
    sf.sliding_window(24),
    sf.sinks(5),
    sf.global_queries(7),
    sf.chunks(20),
    sf.prefix_lm(9),
    sf.sliding_window(16) | sf.sinks(4),
    (sf.sliding_window(40) | sf.sinks(3)) & sf.causal(),
    sf.chunks(16) & sf.causal(),
    sf.global_queries(5) | sf.window(3, 3) | sf.sinks(2),
    sf.window(6, 6, dilation=2) | sf.chunks(32),
    sf.causal() & sf.window(10, 10) & sf.chunks(24),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_patterns_match_oracle(pattern, backend):
    q, k, v = random_qkv(2, 2, 2, 75, 75, 32, seed=1)
    assert_matches_oracle(pattern, q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq, lkv", [(50, 83), (83, 50), (1, 70), (70, 1), (33, 33)])
@pytest.mark.parametrize("pattern", [sf.causal(), sf.sliding_window(20) | sf.sinks(3),
                                     sf.window(3, 4, dilation=4)], ids=repr)
def test_unequal_lengths(pattern, lq, lkv, backend):
    q, k, v = random_qkv(1, 2, 2, lq, lkv, 16, seed=2)
    assert_matches_oracle(pattern, q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [16, 20, 48, 80, 96])
def test_head_dims_and_gqa(d, backend):
    q, k, v = random_qkv(1, 6, 2, 40, 52, d, seed=3)
    assert_matches_oracle(sf.sliding_window(17) | sf.sinks(2), q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, backend):
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, dtype=dtype, seed=4)
    assert_matches_oracle(sf.causal() & sf.window(20, 0), q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_are_zero_not_nan(backend):
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, seed=5)
    out, lse = assert_matches_oracle(sf.global_queries(6), q, k, v, backend)
    assert torch.all(out[:, :, 6:] == 0) and torch.all(torch.isneginf(lse[:, :, 6:]))
    # Lq > Lkv under causal: the first rows see no key at all
    q, k, v = random_qkv(1, 1, 1, 50, 20, 16, seed=6)
    out, lse = assert_matches_oracle(sf.causal(), q, k, v, backend)
    assert torch.all(out[:, :, :30] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_documents_packed_batch(backend):
    ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 7 + [1] * 50 + [3] * 7])
    q, k, v = random_qkv(2, 2, 2, 64, 64, 16, seed=7)
    assert_matches_oracle(sf.documents(ids) & sf.causal(), q, k, v, backend)
    assert_matches_oracle(sf.documents(ids[0]) | sf.sinks(3), q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_patterns(backend):
    pattern = sf.per_head([sf.causal(), sf.sliding_window(9), sf.causal(), sf.chunks(16)])
    q, k, v = random_qkv(1, 4, 2, 45, 45, 16, seed=8)
    assert_matches_oracle(pattern, q, k, v, backend)
    assert len(sf.plan(pattern, q_len=45, kv_len=45, head_dim=16).kernels) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_non_contiguous_inputs(backend):
    q, k, v = random_qkv(1, 2, 2, 30, 30, 16, seed=9)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] memory, BHLD view
    assert_matches_oracle(sf.window(4, 4), q, k, v, backend, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.7, -20.0, 0.0])
def test_negative_and_zero_scale(backend, scale):
    # the kernels scale the raw row max (max(s * x) = s * max(x) needs s >= 0): a negative
    # scale runs as -q with -scale (at -20 a wrong max overflows exp2), zero gives uniform
    # weights; lengths past one tile
    q, k, v = random_qkv(1, 2, 2, 70, 70, 16, seed=10)
    assert_matches_oracle(sf.causal() | sf.sinks(3), q, k, v, backend, scale=scale)
    # decode-short queries take the split-KV decode kernel
    q, k, v = random_qkv(1, 2, 1, 3, 90, 16, seed=11)
    assert_matches_oracle(sf.causal(), q, k, v, backend, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 24, 30, 16, seed=10))
    pattern = sf.sliding_window(7) | sf.sinks(2)
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def _fuzz(backend, pattern, b, hkv, group, lq, lkv, d, dtype, seed):
    q, k, v = random_qkv(b, hkv * group, hkv, lq, lkv, d, dtype=dtype, seed=seed)
    assert_matches_oracle(pattern, q, k, v, backend)


FUZZ = dict(pattern=static_patterns(), b=st.integers(1, 2), hkv=st.integers(1, 2),
            group=st.sampled_from([1, 2]), lq=st.integers(1, 70), lkv=st.integers(1, 70),
            d=st.sampled_from([16, 24, 32, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
            seed=st.integers(0, 2**16))


@pytest.mark.overflow_checks
# 75 interpreted draws keep the suite in its time budget (`--hypothesis-profile=explore`
# draws fresh ones)
@settings(max_examples=75, deadline=None, suppress_health_check=list(HealthCheck))
@given(**FUZZ)
def test_fuzz_generated_kernels(**kw):
    _fuzz("triton", **kw)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(**FUZZ)
def test_fuzz_cpu_path(**kw):
    _fuzz("torch", **kw)


@pytest.mark.overflow_checks
def test_interpreter_checks_int32_overflow_where_marked():
    from triton.runtime import interpreter

    assert interpreter.interpreter_builder.options.sanitize_overflow


def test_interpreter_skips_overflow_checks_elsewhere():
    from triton.runtime import interpreter

    assert not interpreter.interpreter_builder.options.sanitize_overflow
