"""The kernels' TMA descriptor path (sm_90 and newer) against the fp64 oracle.

``SPARSEFORGE_TMA=on`` makes the generated kernels take tensor descriptors under Triton's
interpreter too, so their results are checked here on a CPU: whole-tile loads that run
past the end of the rows and over the head-dim padding (which must read zeros), stores
that must drop rows past the end, Lq != Lkv, GQA, dilation groups as strided
descriptors, documents, routed walks, decode and the dQ kernel (dK/dV keeps pointer
loads). Which compiled kernels really use TMA is checked from their SASS in
tests/codegen/test_compile.py."""

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import triton_launch
from sparseforge.runtime.tma import call_allows_tma, tma_mode
from tests.helpers import assert_matches_oracle, random_qkv


@pytest.fixture
def tma_launches(monkeypatch):
    """(kind, took descriptors?) of every JIT launch, with SPARSEFORGE_TMA=on."""
    monkeypatch.setenv("SPARSEFORGE_TMA", "on")
    seen = []
    real = triton_launch.call_tma

    def spy(src, args, device, interpret):
        took = real(src, args, device, interpret)
        seen.append((src.kind, took))
        return took

    monkeypatch.setattr(triton_launch, "call_tma", spy)
    return seen


BF16 = torch.bfloat16
FORWARD_CASES = {
    # (pattern, batch, q heads, kv heads, Lq, Lkv, head dim)
    "causal_ragged": (sf.causal(), 1, 2, 1, 37, 37, 64),
    "window_gqa_lq_ne_lkv": (sf.window(19, 0), 1, 4, 2, 50, 70, 40),
    "padded_head_dim": (sf.causal() | sf.sinks(3), 2, 2, 2, 33, 33, 72),
    "dilation_groups": (sf.window(8, 0, dilation=3), 1, 2, 2, 61, 61, 48),
    "empty_rows": (sf.causal(), 1, 2, 2, 50, 20, 64),  # the first 30 rows see no key
    "topk_routed": (sf.causal() & sf.topk_blocks(16, 2), 1, 2, 2, 70, 70, 40),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_through_descriptors(case, tma_launches):
    pattern, b, hq, hkv, lq, lkv, d = FORWARD_CASES[case]
    q, k, v = random_qkv(b, hq, hkv, lq, lkv, d, dtype=BF16, seed=len(case))
    assert_matches_oracle(pattern, q, k, v, "triton")
    assert tma_launches and all(took for kind, took in tma_launches if kind == "forward")


def test_documents_through_descriptors(tma_launches):
    ids = torch.tensor([[0] * 20 + [1] * 19, [0] * 7 + [1] * 32])
    q, k, v = random_qkv(2, 2, 2, 39, 39, 40, dtype=BF16, seed=3)
    assert_matches_oracle(sf.documents(ids) & sf.causal(), q, k, v, "triton")
    assert tma_launches and all(took for _, took in tma_launches)


def test_decode_through_descriptors(tma_launches):
    q, k, v = random_qkv(2, 8, 2, 4, 301, 40, dtype=BF16, seed=2)
    assert_matches_oracle(sf.sliding_window(50) | sf.sinks(4), q, k, v, "triton")
    assert ("decode", True) in tma_launches


def test_backward_through_descriptors(tma_launches):
    q, k, v = random_qkv(1, 4, 2, 45, 60, 40, dtype=BF16, seed=4)
    pattern = sf.sliding_window(12) | sf.sinks(2)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sf.attention(*leaves, pattern, enable_gqa=True, backend="triton")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(BF16)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sf.reference_attention(*ref_leaves, pattern, enable_gqa=True)
    refs = torch.autograd.grad(ref, ref_leaves, go.double())
    for g, r in zip(grads, refs):
        assert (g.double() - r).abs().max().item() <= 3e-2 * max(1.0, r.abs().max().item())
    # dK/dV keeps pointer loads (descriptors made it spill on sm_90)
    assert {kind for kind, took in tma_launches if took} == {"forward", "backward_dq"}


def test_calls_a_descriptor_cannot_describe_take_pointer_loads(tma_launches):
    # D=36 bf16 rows are 72 bytes (not a 16-byte multiple): no descriptors, same answer
    q, k, v = random_qkv(1, 2, 2, 40, 40, 36, dtype=BF16, seed=5)
    assert_matches_oracle(sf.causal(), q, k, v, "triton")
    assert tma_launches and not any(took for _, took in tma_launches)
    # a key tensor at a 2-byte offset: the call runs with pointer loads
    tma_launches.clear()
    q, k, v = random_qkv(1, 2, 2, 40, 40, 64, dtype=BF16, seed=6)
    k_shifted = torch.empty(k.numel() + 1, dtype=BF16)[1:].view(k.shape).copy_(k)
    out = sf.attention(q, k_shifted, v, sf.causal(), backend="triton")
    torch.testing.assert_close(out, sf.attention(q, k, v, sf.causal(), backend="triton"))
    assert tma_launches[0] == ("forward", False) and tma_launches[-1] == ("forward", True)


def test_call_allows_tma_checks_alignment_and_strides():
    x = torch.randn(1, 2, 8, 64).to(BF16)
    assert call_allows_tma([x, 3, 0.5])
    shifted = torch.randn(1 * 2 * 8 * 64 + 1).to(BF16)[1:].view(1, 2, 8, 64)  # 2-byte offset
    assert not call_allows_tma([x, shifted])
    assert not call_allows_tma([x.transpose(2, 3)])  # head dim not unit-stride
    assert not call_allows_tma([torch.randn(1, 2, 8, 36).to(BF16)])  # 72-byte rows


def test_tma_mode_is_checked(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_TMA", "sometimes")
    with pytest.raises(ValueError, match="SPARSEFORGE_TMA"):
        tma_mode()
    monkeypatch.setenv("SPARSEFORGE_TMA", "OFF")
    assert tma_mode() == "off"


def test_auto_mode_uses_descriptors_on_sm90_only(monkeypatch):
    from sparseforge.runtime.sources import rendered
    from sparseforge.runtime.tma import call_tma, compiled_with_tma

    monkeypatch.delenv("SPARSEFORGE_TMA", raising=False)
    p = sf.plan(sf.causal(), q_len=256, kv_len=256, head_dim=64, dtype="bfloat16", target="sm_90")
    src = rendered(p, 0, "forward")
    assert compiled_with_tma(src, "sm_90") and compiled_with_tma(src, "sm_100")
    assert not compiled_with_tma(src, "sm_80")
    q = torch.randn(1, 2, 256, 64).to(BF16)
    assert not call_tma(src, [q], q.device, interpret=True)  # the interpreter: pointer loads
    monkeypatch.setenv("SPARSEFORGE_TMA", "off")
    assert not compiled_with_tma(src, "sm_90")
    fp32 = sf.plan(sf.causal(), q_len=256, kv_len=256, head_dim=64, dtype="float32", target="sm_90")
    d128 = sf.plan(sf.causal(), q_len=256, kv_len=256, head_dim=128, dtype="bfloat16",
                   target="sm_90")
    monkeypatch.delenv("SPARSEFORGE_TMA")
    assert not compiled_with_tma(rendered(fp32, 0, "forward"), "sm_90")
    assert compiled_with_tma(rendered(d128, 0, "backward_dq"), "sm_90")
    assert not compiled_with_tma(rendered(d128, 0, "backward_dkdv"), "sm_90")
