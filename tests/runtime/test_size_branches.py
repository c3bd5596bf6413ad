"""Branches that only large problems take, forced at small sizes: the CPU executor's
score budget (it splits batch x heads x tiles into several matmuls), the routed torch
path's row chunks and the routing candidates' row chunks. Each is compared with the
fp64 oracle, forward and backward."""

import pytest
import torch

import sparseforge as sf
from sparseforge.routing import geometry
from sparseforge.runtime import routed_torch, torch_exec
from tests.helpers import random_qkv


def _check_with_gradients(pattern, q, k, v, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    out = sf.attention(q, k, v, pattern, enable_gqa=gqa, backend="torch", **kw)
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=gqa, **kw)
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)
    go = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go.double())):
        torch.testing.assert_close(g.double(), w.double(), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", [sf.sliding_window(13) | sf.sinks(3), sf.causal(),
                                     sf.window(5, 5, dilation=3)], ids=repr)
def test_cpu_executor_with_a_tiny_score_budget(pattern, monkeypatch):
    # a budget below one tile's scores: every group of tiles runs in its own matmul
    monkeypatch.setattr(torch_exec, "SCORE_BUDGET", 16)
    q, k, v = random_qkv(2, 4, 2, 77, 91, 16, seed=3)
    _check_with_gradients(pattern, q, k, v)


def test_routed_torch_path_in_small_row_chunks(monkeypatch):
    monkeypatch.setattr(routed_torch, "ROW_CHUNK", 7)
    monkeypatch.setattr(geometry, "ROW_CHUNK", 5)
    q, k, v = random_qkv(1, 2, 1, 53, 61, 8, seed=4)
    for pattern in [(sf.causal() & sf.topk_blocks(8, 2)) | sf.sinks(2),
                    sf.causal() & sf.vertical_slash(3, 2, last_q=9),
                    sf.sliding_window(29) & sf.threshold_blocks(4, 0.5)]:
        _check_with_gradients(pattern, q, k, v)
