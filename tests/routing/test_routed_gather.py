"""The torch path of block-routed patterns in linear memory (``runtime/routed_gather.py``):
exact against fp64 autograd through the oracle, repeatable, and it keeps no
``[Lq, Lkv]``-sized tensor alive for the backward."""

import unittest.mock

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import routed_gather, routed_torch
from tests.helpers import random_qkv

BOUNDARIES = torch.tensor([0, 40, 90, 200, 250])

PATTERNS = {
    "moba": (sf.causal() & sf.topk_blocks(32, 2, query_block=1)) | (sf.causal() & sf.chunks(32)),
    "nsa_selection": sf.topk_blocks(24, 3) & sf.causal(),
    "topk_or_window_group": sf.topk_blocks(40, 2, share="group") | sf.sliding_window(50),
    "threshold_and_sinks": sf.threshold_blocks(32, 0.6) | sf.sinks(3),
    "empty_rows": sf.topk_blocks(32, 1) & sf.window(3, 0),
    "topk_chunks": sf.topk_chunks(BOUNDARIES, 2) | sf.sinks(5),
    "hierarchical": sf.hierarchical(2, 16) & sf.causal(),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles small enough that the test lengths span several chunks and key tiles."""
    monkeypatch.setattr(routed_gather, "CHUNK_ROWS", 32)
    monkeypatch.setattr(routed_gather, "KEY_TILE", 16)
    monkeypatch.setattr(routed_gather, "GATHER_FRACTION", 1.0)  # gather at any density
    monkeypatch.setattr(routed_gather, "GATHER_MIN_BYTES", 0)  # and any size


@pytest.fixture
def gathered(monkeypatch):
    """Whether each routed call took the gathered path."""
    taken = []
    real = routed_gather.gathered_routed_attention

    def spy(*args):
        result = real(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(routed_torch, "gathered_routed_attention", spy)
    return taken


@pytest.mark.parametrize("lengths", [(250, 250), (77, 250)], ids=["square", "lq<lkv"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_equals_fp64_autograd(name, lengths, small_tiles, gathered):
    """Out, lse and the q, k, v gradients (through out and lse) against the oracle; GQA,
    odd head dim, rows with no key."""
    pattern, (q_len, kv_len) = PATTERNS[name], lengths
    q, k, v = random_qkv(2, 4, 2, q_len, kv_len, 24, seed=q_len + len(name))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sf.attention(*leaves, pattern, enable_gqa=True, backend="torch", return_lse=True)
    assert gathered == [True]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*ref_leaves, pattern, enable_gqa=True, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-5, rtol=1e-5)
    if name == "empty_rows":
        assert torch.isinf(lse).sum() > 0 and out[torch.isinf(lse)].abs().max() == 0
    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.where(torch.isinf(ref_lse), 0.0, g_lse)
    got = torch.autograd.grad((out, lse), leaves, (g_out.float(), g_lse.float()))
    want = torch.autograd.grad((ref, ref_lse), ref_leaves, (g_out, g_lse.to(ref_lse.dtype)))
    for label, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=label)


def test_bitwise_repeatable(small_tiles):
    pattern = PATTERNS["moba"]
    q, k, v = random_qkv(1, 4, 2, 200, 200, 16, seed=3)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sf.attention(*leaves, pattern, enable_gqa=True, backend="torch")
        runs.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_keeps_nothing_quadratic_for_the_backward(small_tiles):
    """What the autograd graph holds between forward and backward, counted by the saved
    tensor hooks: the gathered path's grows linearly with the length (the inputs' pieces
    and per-row partials) and stays well under one [H, Lq, Lkv] plane; the row-chunk path
    keeps every chunk's probabilities, the whole plane."""
    heads = 2
    moba = (sf.causal() & sf.topk_blocks(256, 2, query_block=1)) | (sf.causal() & sf.chunks(256))
    saved = {}

    def pack(t):
        saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    def held(run, length):
        saved.clear()
        q, k, v = random_qkv(1, heads, heads, length, length, 16, seed=5)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(leaves)
        return sum(saved.values())

    def gathered(leaves):
        return sf.attention(*leaves, moba, backend="torch")

    short, long = held(gathered, 1024), held(gathered, 2048)
    plane = heads * 2048 * 2048 * 4
    assert long < 2.6 * short and long < plane / 3, (short, long)
    assert held(lambda leaves: _row_chunk_path(leaves, moba), 2048) >= plane


def _row_chunk_path(leaves, pattern):
    with unittest.mock.patch.object(routed_torch, "gathered_routed_attention",
                                    lambda *args: None):
        return sf.attention(*leaves, pattern, backend="torch")


def test_not_covered_patterns_take_the_row_chunk_path(gathered):
    """Score modifiers, DMA's key bias and line routing run the row-chunk path."""
    q, k, v = random_qkv(1, 2, 2, 64, 64, 16, seed=9)
    for pattern in (sf.topk_blocks(16, 2) & sf.alibi(sf.alibi_slopes(2)),
                    sf.vertical_slash(4, 4, last_q=16) & sf.causal()):
        out = sf.attention(q, k, v, pattern, backend="torch")
        torch.testing.assert_close(out.double(), sf.reference_attention(
            q.double(), k.double(), v.double(), pattern), atol=2e-5, rtol=1e-5)
    assert gathered == [False, False]
