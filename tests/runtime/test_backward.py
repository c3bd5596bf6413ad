"""Gradients of sf.attention (out and lse) against autograd through the fp64 oracle,
across pattern families, GQA, Lq != Lkv and empty rows; bitwise repeatable.

backend="triton" runs the generated dQ and dK/dV kernels (Triton's interpreter on CPU),
backend="torch" the plan's torch-op backward."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf
from tests.helpers import random_qkv
from tests.strategies import static_patterns

BACKENDS = ["torch", "triton"]


def _grads(q, k, v, pattern, backend, seed=0):
    gqa = q.shape[1] != k.shape[1]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = sf.attention(*leaves, pattern, enable_gqa=gqa, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.dtype)
    gl = torch.randn(lse.shape, generator=g)
    finite = torch.isfinite(lse)
    torch.autograd.backward([out, torch.where(finite, lse, 0)], [go, torch.where(finite, gl, 0)])
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*ref_leaves, pattern, enable_gqa=gqa, return_lse=True)
    rfin = torch.isfinite(ref_lse)
    torch.autograd.backward([ref, torch.where(rfin, ref_lse, 0)],
                            [go.double(), torch.where(rfin, gl.double(), 0)])
    return [t.grad for t in leaves], [t.grad for t in ref_leaves]


def _check(q, k, v, pattern, backend, tol=2e-4):
    grads, refs = _grads(q, k, v, pattern, backend)
    for name, g, r in zip("qkv", grads, refs):
        assert not torch.isnan(g).any(), f"d{name} has NaN"
        err = (g.double() - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{pattern!r}: d{name} error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", [
    sf.causal(), sf.full(), sf.sliding_window(9) | sf.sinks(3), sf.window(4, 2, dilation=3),
    sf.chunks(11) & sf.causal(), sf.global_queries(5) | sf.window(2, 2), sf.prefix_lm(6),
    sf.per_head([sf.causal(), sf.sinks(0), sf.window(3, 3, dilation=2), sf.full()]),
], ids=repr)
def test_families(pattern, backend):
    _check(*random_qkv(2, 4, 2, 45, 45, 24, seed=1), pattern, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq, lkv", [(17, 50), (50, 17), (1, 33)])
def test_unequal_lengths_and_empty_rows(lq, lkv, backend):
    # Lq > Lkv with causal leaves the first rows empty: no gradient, no NaN
    _check(*random_qkv(1, 2, 1, lq, lkv, 32, seed=2), sf.causal() | sf.sinks(0), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_documents_gradients(backend):
    ids = torch.tensor([[0] * 20 + [1] * 19, [0] * 7 + [1] * 32])
    _check(*random_qkv(2, 2, 2, 39, 39, 16, seed=3), sf.documents(ids) & sf.causal(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradients(backend):
    q, k, v = random_qkv(1, 2, 2, 40, 40, 32, dtype=torch.bfloat16, seed=4)
    grads, refs = _grads(q, k, v, sf.sliding_window(12), backend)
    for g, r in zip(grads, refs):
        assert g.dtype == torch.bfloat16
        assert (g.double() - r).abs().max().item() <= 3e-2 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_bitwise_repeatable(backend):
    q, k, v = random_qkv(2, 4, 2, 70, 70, 32, seed=5)
    first, _ = _grads(q, k, v, sf.sliding_window(20) | sf.sinks(2), backend)
    second, _ = _grads(q, k, v, sf.sliding_window(20) | sf.sinks(2), backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_triton_backward_runs_the_generated_kernels(monkeypatch, launched_kinds):
    """backend='triton' differentiates through the dQ and dK/dV kernels, not torch ops."""
    from sparseforge.runtime import torch_exec

    monkeypatch.setattr(torch_exec, "run_backward", lambda *a, **k: 1 / 0)
    _check(*random_qkv(1, 2, 1, 40, 52, 16, seed=6), sf.sliding_window(10), "triton")
    assert {"backward_dq", "backward_dkdv"} <= set(launched_kinds)


_UNION = sf.sliding_window(9) | sf.sinks(5) | sf.global_queries(3)


@pytest.mark.parametrize("pattern, overrides", [
    (sf.window(6, 4, dilation=3), {"groups": 3}), (sf.window(6, 4, dilation=3), {"groups": 1}),
    (_UNION, {"schedule": "hull"}), (_UNION, {"schedule": "segments"}),
], ids=repr)
def test_backward_kernels_for_each_schedule(pattern, overrides):
    """Dilation groups as strided views and hull/segment walks, forced through the plan:
    the inverted (key-side) bounds must cover every pair of each layout."""
    from sparseforge.runtime import triton_launch

    p = sf.plan(pattern, q_len=61, kv_len=75, head_dim=24, dtype="float32", target="interpret",
                **overrides)
    canonical = p.pattern
    q, k, v = random_qkv(2, 4, 2, 61, 75, 24, seed=7)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3])
    triton_launch.run_forward(p, (canonical,), q, k, v, out, lse, 24 ** -0.5, interpret=True)
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    grads = triton_launch.run_backward(p, (canonical,), q, k, v, out, lse, go, gl, 24 ** -0.5,
                                       interpret=True)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*leaves, pattern, enable_gqa=True, return_lse=True)
    fin = torch.isfinite(ref_lse)
    torch.autograd.backward([ref, torch.where(fin, ref_lse, 0)],
                            [go.double(), torch.where(fin, gl.double(), 0)])
    for name, a, r in zip("qkv", grads, leaves):
        assert (a.double() - r.grad).abs().max().item() < 2e-4, f"d{name} ({p.kernels[0].groups} groups)"


def _fuzz_gradients(pattern, hkv, group, lq, lkv, d, seed, backend):
    try:
        sf.dense_mask(pattern, lq, lkv)
    except ValueError:  # e.g. documents ids of another length
        return
    _check(*random_qkv(1, hkv * group, hkv, lq, lkv, d, seed=seed), pattern, backend)


_FUZZ = dict(pattern=static_patterns(), hkv=st.integers(1, 2), group=st.sampled_from([1, 2]),
             lq=st.integers(1, 60), lkv=st.integers(1, 60), d=st.sampled_from([16, 40]),
             seed=st.integers(0, 2**16))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(**_FUZZ)
def test_fuzz_gradients(pattern, hkv, group, lq, lkv, d, seed):
    _fuzz_gradients(pattern, hkv, group, lq, lkv, d, seed, "torch")


@pytest.mark.overflow_checks
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(**_FUZZ)
def test_fuzz_gradients_generated_kernels(pattern, hkv, group, lq, lkv, d, seed):
    _fuzz_gradients(pattern, hkv, group, lq, lkv, d, seed, "triton")
