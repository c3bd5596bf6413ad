"""The tiled N-D layout: its closed-form bounds against brute force on run positions,
execution through it against the oracle, and the utilisation it buys over Flex."""

import functools
import pathlib

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.planner.flex_blocks import flex_blocks
from sparseforge.planner.plan import plan
from sparseforge.planner.schedule import visit_matrices
from sparseforge.runtime import dispatch
from sparseforge.semantics import pair_mask
from tests.planner.test_ranges import brute_force_tiles

CASES = [
    (sf.neighborhood((7, 9), (3, 4), dilation=(2, 1)), 63),
    (sf.neighborhood((6, 5, 4), (3, 2, 3), causal=(True, False, False)) | sf.sinks(3), 125),
    (sf.neighborhood((9, 11), (5, 3), stride=(2, 3)), 104),  # 5 extra tokens after the grid
    (sf.neighborhood(50, 7, stride=3, dilation=2), 50),
    (sf.neighborhood((12, 10), 3) & sf.causal(), 120),
]


@pytest.mark.parametrize("pattern,length", CASES)
@pytest.mark.parametrize("target", ["cpu", "interpret", "sm_90"])
@pytest.mark.parametrize("side", ["query", "key"])
def test_tiled_bounds_match_brute_force(pattern, length, target, side):
    """Every kind's tiles (forward, dQ, dK/dV sizes) on the permuted tokens: no tile with
    an allowed pair is skipped and no tile called full holds a padding token or a
    forbidden pair."""
    p = plan(pattern, q_len=length, kv_len=length, head_dim=32, target=target, tiled=True)
    kernel = p.kernels[0]
    rows, cols = torch.arange(p.q_len), torch.arange(p.kv_len)
    mask = pair_mask(kernel.pattern, rows[:, None], cols[None, :], p.q_len, p.kv_len).numpy()
    segments = kernel.walked_segments if side == "query" else kernel.key_segments
    for cfg in {p.config, p.backward_dq, p.backward_dkdv}:
        bm, bn = cfg.block_m, cfg.block_n
        visit, full = visit_matrices(list(segments), p.q_len, p.kv_len, bm, bn, side)
        has, every = brute_force_tiles(mask, bm, bn, side)
        assert not (has & ~visit).any(), f"{bm}x{bn}: skipped tiles {np.argwhere(has & ~visit)[:4]}"
        assert not (full & ~every).any(), f"{bm}x{bn}: wrong full tiles {np.argwhere(full & ~every)[:4]}"


@pytest.fixture()
def tiled_dispatch(monkeypatch):
    monkeypatch.setattr(dispatch, "plan", functools.partial(plan, tiled=True))
    dispatch._plans.clear()
    yield
    dispatch._plans.clear()


@pytest.mark.parametrize("pattern,length", CASES)
def test_tiled_execution_matches_reference(tiled_dispatch, pattern, length):
    """Forward, autograd backward and the custom op's backward through the layout, with
    GQA and an odd head dim."""
    torch.manual_seed(length)
    q = torch.randn(2, 4, length, 24, requires_grad=True)
    k, v = (torch.randn(2, 2, length, 24, requires_grad=True) for _ in range(2))
    p = dispatch.cached_plan(dispatch.compile_pattern(pattern), length, length, 24, q.dtype, "cpu")
    assert p.layout is not None and p.q_len >= length
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend="torch")
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-5)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go.double())
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w.float(), atol=5e-5, rtol=1e-5)
    o, lse = sf.attention(q.detach(), k.detach(), v.detach(), pattern, enable_gqa=True,
                          backend="torch", return_lse=True)
    custom = dispatch.attention_backward(q.detach(), k.detach(), v.detach(), o, lse, go, None,
                                         pattern, enable_gqa=True, backend="torch")
    for g, w in zip(custom[:3], want):
        torch.testing.assert_close(g, w.float(), atol=5e-5, rtol=1e-5)


def test_tiled_kernel_in_the_interpreter(tiled_dispatch):
    """The generated forward runs the layout's predicate and N-D bounds (small: the
    interpreter pays per operation)."""
    pattern, length = CASES[0]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, length, 16) for _ in range(3))
    out = sf.attention(q, k, v, pattern, backend="triton")
    torch.testing.assert_close(out, sf.reference_attention(q, k, v, pattern).float(),
                               atol=2e-5, rtol=1e-5)


def _documented_utilisation(row: str) -> tuple[float, float]:
    """(sparseforge, Flex) utilisation of a row of docs/neighborhoods.md's table."""
    docs = (pathlib.Path(__file__).parents[2] / "docs" / "neighborhoods.md").read_text()
    line = next(line for line in docs.splitlines() if line.startswith(f"| {row} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    return float(cells[1]), float(cells[2])


@pytest.mark.parametrize("dilation", [1, 4])
def test_utilisation_against_flex_on_56x56(dilation):
    """7x7 on 56x56: the tiled plan's pair utilisation beside FlexAttention's 128x128
    BlockMask on the same mask equal the figures docs/neighborhoods.md prints (the
    dilated case >= 2x Flex's)."""
    pattern = sf.neighborhood((56, 56), 7, dilation=dilation)
    p = sf.plan(pattern, q_len=3136, kv_len=3136, head_dim=64, target="sm_90")
    ours = p.stats[0].utilisation
    flex = flex_blocks(pattern, 3136, 3136).utilisation
    print(f"dilation {dilation}: sparseforge {ours:.3f}, flex {flex:.3f}, ratio {ours / flex:.1f}")
    assert p.layout is not None
    assert "FlexAttention BlockMask" in p.explain()
    assert (round(ours, 3), round(flex, 3)) == _documented_utilisation(
        f"7x7 on 56x56, dilation {dilation}")
    assert ours > flex
    if dilation > 1:
        assert ours >= 2 * flex


# N-D boxes whose key tiles span several outer rows: each walked as one segment family
# (a loop over runs), forward on the query side and dK/dV on the key side
FAMILIES = [
    (sf.neighborhood((4, 4, 4), 3), 64),  # equal extents: bounds hold x * x (a sympy Pow)
    (sf.neighborhood((6, 11), (3, 5)) & sf.causal(), 66),
]


@pytest.mark.parametrize("pattern,length", FAMILIES)
def test_segment_families_in_the_interpreter(tiled_dispatch, launched_kinds, pattern, length):
    """Forward, dQ and dK/dV kernels walking a family of runs, with GQA and Lq-sized
    tiles that cut the grid: exact against the oracle, gradients included."""
    p = plan(pattern, q_len=length, kv_len=length, head_dim=16, target="interpret", tiled=True)
    kernel = p.kernels[0]
    assert len(kernel.walked_segments) == 1 and kernel.walked_segments[0].runs >= 3
    assert kernel.key_segments[0].runs >= 3
    torch.manual_seed(length)
    q = torch.randn(1, 2, length, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, length, 16, requires_grad=True) for _ in range(2))
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton")
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-5)
    go = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go.double())):
        torch.testing.assert_close(g, w.float(), atol=5e-5, rtol=1e-5)
    assert {"forward", "backward_dq", "backward_dkdv"} <= set(launched_kinds)


def test_a_family_beside_other_segments_is_expanded():
    """Sorting needs single segments: a union walks the family's runs one by one."""
    union = plan(sf.neighborhood((12, 13), (5, 7)) | sf.sinks(2), q_len=156, kv_len=156,
                 head_dim=16, target="interpret", tiled=True, schedule="segments")
    kernel = union.kernels[0]
    family = [seg for seg in kernel.segments if seg.runs > 1]
    assert len(family) == 1 and len(kernel.segments) == 2
    walked = kernel.walked_segments
    assert all(seg.runs == 1 for seg in walked) and len(walked) == family[0].runs + 1
