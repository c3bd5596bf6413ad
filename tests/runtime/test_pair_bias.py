"""``sf.pair_bias``: a bias per (query row, key) pair from a tensor (Graphormer's spatial
encoding, a T5 bias materialised per pair). Forward and the gradients of q, k, v and the
bias against fp64 autograd through the oracle, on the torch executor and the Triton
interpreter (forward, decode, dQ which writes the bias's gradient, dK/dV)."""

import pytest
import torch

import sparseforge as sf
from tests.helpers import random_qkv

HQ, HKV = 4, 2
BACKENDS = ["torch", "triton"]
SLOPES = torch.rand(HQ, generator=torch.Generator().manual_seed(12))


def _bias(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_oracle_adds_the_bias_by_query_row():
    q, k, v = random_qkv(2, HQ, HQ, 5, 9, 8)
    bias = _bias(2, 1, 5, 9)
    out = sf.reference_attention(q, k, v, sf.causal() & sf.pair_bias(bias))
    s = (q.double() @ k.double().transpose(-1, -2)) * 8 ** -0.5 + bias.double()
    rows = torch.arange(5)[:, None] + 4  # bottom-right: row i sits at position i + 4
    s = s.masked_fill(torch.arange(9)[None, :] > rows, float("-inf"))
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double())


def _check(q, k, v, pattern_of, bias, backend, tol=1e-4):
    """out and the gradients of q, k, v and the bias against fp64 autograd."""
    gqa = q.shape[1] != k.shape[1]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = sf.attention(*leaves[:3], pattern_of(leaves[3]), enable_gqa=gqa, backend=backend)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, bias)]
    ref = sf.reference_attention(*ref_leaves[:3], pattern_of(ref_leaves[3]), enable_gqa=gqa)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, msg=name)


CASES = {
    # name: (mask and other modifiers, bias shape, Lq, Lkv)
    "causal_2d": (lambda b: sf.causal() & sf.pair_bias(b), (37, 53), 37, 53),
    "window_heads": (lambda b: (sf.sliding_window(12) | sf.sinks(2)) & sf.pair_bias(b),
                     (HQ, 45, 45), 45, 45),
    "batch_broadcast_heads": (lambda b: sf.full() & sf.pair_bias(b) & sf.softcap(3.0),
                              (2, 1, 30, 41), 30, 41),
    "dilated_alibi": (lambda b: sf.window(6, 6, dilation=3) & sf.alibi(SLOPES)
                      & sf.pair_bias(b), (1, HQ, 50, 50), 50, 50),
    # Lq > Lkv under causal: the first rows see no key (0 output, no gradient)
    "empty_rows": (lambda b: sf.causal() & sf.pair_bias(b), (HQ, 40, 29), 40, 29),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients(name, backend):
    pattern_of, shape, lq, lkv = CASES[name]
    q, k, v = random_qkv(2, HQ, HKV, lq, lkv, 24, seed=1)
    _check(q, k, v, pattern_of, _bias(*shape, seed=2), backend)


def test_decode_with_a_pair_bias(launched_kinds):
    q, k, v = random_qkv(2, HQ, HKV, 3, 150, 16, seed=3)
    bias = _bias(HQ, 3, 150, seed=4)
    pattern = sf.sliding_window(40) & sf.pair_bias(bias)
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton")
    assert launched_kinds == ["decode"]
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_patterns_with_their_own_biases(backend):
    """Two kernels, each with its own bias over all heads: each bias gets the gradient of
    its own heads only."""
    q, k, v = random_qkv(1, HQ, HKV, 33, 33, 16, seed=5)
    first, second = _bias(HQ, 33, 33, seed=6), _bias(HQ, 33, 33, seed=7)

    def pattern_of(b):  # the second bias stays fixed; the first is checked
        return sf.per_head([sf.causal() & sf.pair_bias(b)] * 2
                           + [sf.sliding_window(8) & sf.pair_bias(second.to(b.dtype))] * 2)

    _check(q, k, v, pattern_of, first, backend)


def test_bias_gradient_is_bitwise_repeatable():
    q, k, v = (t.requires_grad_() for t in random_qkv(2, HQ, HKV, 40, 40, 16, seed=8))
    bias = _bias(2, HQ, 40, 40, seed=9).requires_grad_()
    grads = []
    for _ in range(2):
        out = sf.attention(q, k, v, sf.sliding_window(16) & sf.pair_bias(bias), enable_gqa=True,
                           backend="triton")
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, bias)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_pair_bias_under_torch_compile():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 24, 24, 16, seed=10))
    bias = _bias(2, 24, 24, seed=11).requires_grad_()

    def f(q, k, v, bias):
        return sf.attention(q, k, v, sf.causal() & sf.pair_bias(bias)).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, bias)
    grads = torch.autograd.grad(loss, (q, k, v, bias))
    want = torch.autograd.grad(f(q, k, v, bias), (q, k, v, bias))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_bad_biases_are_refused_by_name():
    q, k, v = random_qkv(2, HQ, HKV, 10, 12, 8)
    with pytest.raises(TypeError, match="pair_bias"):
        sf.pair_bias(torch.zeros(10, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="pair_bias"):
        sf.pair_bias(torch.zeros(12))
    for shape in ((12, 10), (3, 10, 12), (3, HQ, 10, 12)):
        with pytest.raises(ValueError, match=r"pair_bias\(bias=.*broadcastable to \[B=2, Hq=4"):
            sf.attention(q, k, v, sf.causal() & sf.pair_bias(torch.zeros(shape)),
                         enable_gqa=True)
    with pytest.raises(ValueError, match="no pair_bias"):
        sf.plan(sf.neighborhood((16, 16), 5) & sf.pair_bias(torch.zeros(256, 256)), q_len=256,
                kv_len=256, head_dim=32, target="sm_90", tiled=True)
