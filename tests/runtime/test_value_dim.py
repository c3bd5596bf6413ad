"""v's head dim apart from q's and k's (MLA: DeepSeek-V2/V3 attend with q/k 192 wide and
v 128): outputs [B, Hq, Lq, Dv], lse and the gradients of q, k and v against the fp64
oracle on every executor and kernel kind (forward, decode, backward dQ and dK/dV, the
routed forward), under torch.compile and through sf.flex_attention."""

import pytest
import torch

import sparseforge as sf
from sparseforge.codegen.render import render_kernel


def _qkv(b, hq, hkv, lq, lkv, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lkv, d, generator=g),
            torch.randn(b, hkv, lkv, dv, generator=g))


def _rows_empty_table(lq, lkv):
    """A random bool mask whose first rows allow nothing (their output is 0, lse -inf)."""
    table = torch.rand(lq, lkv, generator=torch.Generator().manual_seed(3)) > 0.6
    table[:5] = False
    return sf.mask_table(table)


CASES = {
    # name: (pattern, Lq, Lkv, D, Dv): lengths off the tile, Lq != Lkv, padded dims
    "causal_wider_v": (sf.causal(), 97, 97, 24, 40),
    "window_sinks_narrower_v": (sf.sliding_window(24) | sf.sinks(3), 45, 97, 48, 16),
    "dilated": (sf.window(8, 8, dilation=3), 90, 90, 16, 24),
    "neighborhood_2d": (sf.neighborhood((8, 8), 3), 64, 64, 24, 40),
    "scores": (sf.causal() & sf.alibi(torch.rand(4)) & sf.softcap(5.0), 70, 70, 24, 40),
    "rel_bias": (sf.sliding_window(16) & sf.rel_bias(torch.randn(4, 33)), 70, 70, 24, 40),
    "empty_rows": (_rows_empty_table(50, 70), 50, 70, 24, 40),
    "documents": (sf.documents(torch.tensor([[0] * 30 + [1] * 40 + [2] * 27])) & sf.causal(),
                  97, 97, 24, 40),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_value_dim_matches_the_oracle(name, backend, launched_kinds):
    pattern, lq, lkv, d, dv = CASES[name]
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, lq, lkv, d, dv))
    out, lse = sf.attention(q, k, v, pattern, enable_gqa=True, return_lse=True, backend=backend)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sf.reference_attention(qd, kd, vd, pattern, enable_gqa=True, return_lse=True)
    assert out.shape == (1, 4, lq, dv)
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse.double()[finite], ref_lse.double()[finite], atol=2e-5, rtol=1e-5)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.float())
    want = torch.autograd.grad(ref, (qd, kd, vd), grad)
    for g, w, what in zip(got, want, "qkv"):
        assert g.shape == w.shape, what
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-4, msg=f"d{what}")
    if backend == "triton":
        assert {"forward", "backward_dq", "backward_dkdv"} <= set(launched_kinds)


@pytest.mark.parametrize("q_len", [1, 5])
def test_value_dim_decode(q_len, launched_kinds):
    """A few new tokens against the cache: the split-KV decode kernel, partials Dv wide."""
    q, k, v = _qkv(2, 8, 2, q_len, 301, 40, 24, seed=q_len)
    pattern = sf.sliding_window(100) | sf.sinks(4)
    out, lse = sf.attention(q, k, v, pattern, enable_gqa=True, return_lse=True, backend="triton")
    ref, ref_lse = sf.reference_attention(q, k, v, pattern, enable_gqa=True, return_lse=True)
    assert launched_kinds == ["decode"]
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-5, rtol=1e-5)


def test_value_dim_routed_forward(launched_kinds):
    """The routed forward kernel (top-k blocks beside causal) with a narrower v."""
    q, k, v = _qkv(1, 4, 2, 70, 70, 24, 8)
    pattern = sf.causal() & sf.topk_blocks(16, 2)
    with torch.no_grad():
        out = sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton")
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    assert "forward" in launched_kinds
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)


def test_value_dim_under_torch_compile():
    """The custom op's fake output takes v's head dim: no graph break, eager's results."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 40, 40, 16, 24))
    pattern = sf.sliding_window(8)

    def f(q, k, v):
        return sf.attention(q, k, v, pattern).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    torch.testing.assert_close(loss, f(q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_value_dim_through_flex_attention():
    """FlexAttention accepts Dv != D; so does the drop-in, with Flex's results."""
    from torch.nn.attention import flex_attention as flex

    q, k, v = _qkv(1, 4, 4, 64, 64, 16, 32)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    want = flex.flex_attention(q, k, v, block_mask=flex.create_block_mask(
        causal, None, None, 64, 64, device="cpu"))
    got = sf.flex_attention(q, k, v, block_mask=sf.create_block_mask(causal, None, None, 64, 64,
                                                                     device="cpu"))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_value_dim_in_the_plan_and_kernel_names():
    p = sf.plan(sf.causal(), q_len=4096, kv_len=4096, head_dim=192, value_dim=128,
                target="sm_90")
    assert p.value_dim == 128 and p.padded_value_dim == 128
    assert "D=192 (padded 256) Dv=128 (padded 128)" in p.explain()
    assert "_d192v128_" in render_kernel(p, 0, "forward").name
    same = sf.plan(sf.causal(), q_len=4096, kv_len=4096, head_dim=128, target="sm_90")
    assert same.value_dim == 128 and "Dv=" not in same.explain()
    assert "_d128_" in render_kernel(same, 0, "forward").name
