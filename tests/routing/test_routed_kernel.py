"""The routed forward kernel (static segments + selected tiles) under Triton's
interpreter: exact against fp64 attention under the mask its routing defines, on random
routed patterns (GQA, Lq != Lkv, odd head dims, tiles spanning many buckets, empty rows),
with the generated pre-kernels routing. A tile visited twice would count its keys twice
in the softmax, so exactness also checks the no-double-visit walk. The per-tile bucket
lists are checked against a brute-force union."""

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.ir.split import static_siblings
from sparseforge.planner.routing_steps import kernel_routing_node
from sparseforge.routing.rules import route_node
from sparseforge.runtime.routed_tiles import route_tiles
from tests.helpers import host_reads_during, random_qkv

from .test_routed_attention_fuzz import _config, _masked_attention, _rebuilt_mask


def _rule(seed):
    return type(kernel_routing_node(canonicalize(_config(seed)[0]))).__name__


RULES = ("TopkBlocks", "TopkChunks", "ThresholdBlocks", "VerticalSlash")
KERNEL_SEEDS = [s for rule in RULES for s in [s for s in range(200) if _rule(s) == rule][:10]]


def _check(pattern, q, k, v, atol=2e-5):
    scale = q.shape[-1] ** -0.5
    out, lse = sf.attention(q, k, v, pattern, enable_gqa=True, return_lse=True,
                            backend="triton")
    mask = _rebuilt_mask(pattern, q.float(), k.float(), scale)
    want = _masked_attention(q.float(), k.float(), v.float(), mask, scale)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=1e-2 if atol > 1e-3 else 1e-5)
    _, ref_lse = sf.reference_attention(q.float(), k.float(), v.float(), pattern,
                                          enable_gqa=True, return_lse=True)
    empty = ~mask.any(-1)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty].double(), atol=1e-4,
                               rtol=1e-4)
    return out, empty


def test_enough_kernel_configurations():
    assert len(KERNEL_SEEDS) == 40
    assert {_rule(s) for s in KERNEL_SEEDS} == set(RULES)


@pytest.mark.parametrize("seed", KERNEL_SEEDS)
def test_routed_kernel_matches_its_indices(seed):
    pattern, lq, lkv, hq, hkv, d = _config(seed)
    _check(pattern, *random_qkv(2, hq, hkv, lq, lkv, d, seed=seed))


@pytest.mark.parametrize("pattern", [
    sf.causal() & sf.topk_blocks(2, 3),  # 16 buckets per 32-key tile
    sf.topk_blocks(3, 5, query_block=1, share="group") | sf.sinks(2),
    sf.topk_chunks(torch.tensor([0, 1, 2, 3, 9, 10, 40, 41, 77]), 3) & sf.causal(),
    sf.causal() & sf.threshold_blocks(2, 1.0, query_block=8),  # rows holding ~39 buckets
], ids=["tiny_blocks", "per_token_tiny_blocks", "one_token_chunks", "long_coverage_rows"])
def test_tiles_spanning_many_buckets(pattern):
    _check(pattern, *random_qkv(1, 4, 2, 61, 77, 24, seed=1))


@pytest.mark.parametrize("pattern", [
    sf.topk_blocks(8, 2, query_block=4) | sf.sinks(3),
    sf.threshold_blocks(8, 0.6, share="all"),
    sf.vertical_slash(4, 5, last_q=8) | sf.sliding_window(4),
    sf.causal() & sf.vertical_slash(0, 3),
], ids=["topk", "threshold", "vertical_slash", "slash_only"])
def test_more_queries_than_keys(pattern):
    # positions p = i + Lkv - Lq are negative for the first rows
    _check(pattern, *random_qkv(1, 2, 1, 75, 40, 24, seed=11))


@pytest.mark.parametrize("n_vertical, n_slash", [(0, 1), (9, 0), (40, 40)])
def test_vertical_slash_lines(n_vertical, n_slash):
    # slash only, columns only, and more lines than a tile holds (many per tile)
    pattern = (sf.causal() & sf.vertical_slash(n_vertical, n_slash, last_q=12)) | sf.sinks(2)
    _check(pattern, *random_qkv(2, 4, 2, 97, 97, 40, seed=12))


def test_empty_rows_give_zero_and_minus_inf():
    pattern = sf.topk_blocks(8, 2) & sf.global_queries(10)  # rows >= 10 have no candidate
    out, empty = _check(pattern, *random_qkv(2, 2, 1, 45, 45, 16, seed=2))
    assert bool(empty[..., 10:].all()) and not bool(empty[..., :10].any())
    assert bool((out[..., 10:, :] == 0).all())


def test_scores_and_documents_with_routing():
    ids = torch.tensor([0] * 30 + [1] * 40)
    pattern = (sf.documents(ids) & sf.causal() & sf.topk_blocks(8, 2)
               & sf.alibi(torch.tensor([0.5, 0.25])) & sf.softcap(5.0))
    q, k, v = random_qkv(1, 2, 2, 70, 70, 16, seed=3)
    out = sf.attention(q, k, v, pattern, backend="triton")
    ref = sf.reference_attention(q, k, v, pattern)
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)


def test_bf16_moba_prefill():
    pattern = ((sf.causal() & sf.topk_blocks(16, 2, query_block=1))
               | (sf.causal() & sf.chunks(16)))
    _check(pattern, *random_qkv(1, 4, 2, 100, 100, 32, torch.bfloat16, seed=4), atol=2e-2)


def test_tile_lists_are_the_union_of_the_rows_selections():
    pattern = canonicalize(sf.causal() & sf.topk_blocks(8, 2, query_block=4))
    node = kernel_routing_node(pattern)
    q, k, _ = random_qkv(2, 2, 1, 50, 70, 16, seed=5)
    scale = 0.25
    tiles = route_tiles(node, static_siblings(pattern, node), q, k, scale, block_m=16,
                        prekernels="interpret")
    sel = route_node(node, static_siblings(pattern, node), q, k, scale)
    p = torch.arange(50) + 20
    qb = torch.div(p, 4, rounding_mode="floor") - 5  # query buckets start at position 20
    for b in range(2):
        for h in range(2):
            for t in range(tiles.tile_list.shape[2]):
                rows = qb[t * 16:(t + 1) * 16]
                want = sel.selected[b, h, rows].any(0).nonzero().flatten().tolist()
                n = int(tiles.tile_count[b, h, t])
                assert tiles.tile_list[b, h, t, :n].tolist() == want
                assert bool((tiles.tile_list[b, h, t, n:] == -1).all())


def test_two_routing_nodes_refused_on_the_triton_backend():
    # (training a rule without a generated backward: tests/routing/test_routed_backward.py)
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, seed=6)
    with pytest.raises(ValueError, match="no generated kernel"):
        sf.attention(q, k, v, sf.topk_blocks(8, 2) | sf.vertical_slash(2, 2), backend="triton")


def test_routed_plan_walks_the_static_part():
    p = sf.plan((sf.causal() & sf.topk_blocks(64, 3, query_block=1)) | (sf.causal() & sf.chunks(64)),
                q_len=1000, kv_len=1000, head_dim=64, target="sm_90")
    assert p.block_n <= 64
    static = p.kernels[0].static_mask
    assert torch.equal(sf.dense_mask(static, 100, 100),
                       sf.dense_mask(sf.causal() & sf.chunks(64), 100, 100))
    text = p.explain()
    assert "routed" in text and "select0" in text



@pytest.mark.parametrize("pattern", [
    (sf.causal() & sf.topk_blocks(16, 2, query_block=1)) | (sf.causal() & sf.chunks(16)),
    sf.causal() & sf.threshold_blocks(8, 0.8, share="group"),
    sf.causal() & sf.topk_chunks(torch.tensor([0, 10, 33, 64]), 2),
    sf.causal() & sf.vertical_slash(3, 3, last_q=8),
    sf.causal() & sf.topk_keys(torch.randn(4, 64), 9, query_block=16),
    (sf.causal() & sf.hierarchical(2, 8, query_block=16)) | sf.sliding_window(4),
    sf.causal() & sf.clusters(torch.randn(2, 3, 16)),
], ids=["moba", "threshold", "chunks", "vertical_slash", "topk_keys", "hierarchical", "clusters"])
def test_warm_routed_calls_never_read_a_tensor_on_the_host(pattern, monkeypatch):
    """What a CUDA graph needs of routing, checked on CPU: after a warm-up call, a routed
    call (pre-kernels, tile lists, kernel) never reads a tensor value from sparseforge's
    Python code (`.item()`, `bool(t)`, `.tolist()`, ...: each would be a device sync on a
    GPU and breaks capture), so every shape is fixed by the problem size alone."""
    q, k, v = random_qkv(1, 4, 2, 64, 64, 16, seed=13)
    sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton")  # warm: plans, caches
    reads = host_reads_during(
        lambda: sf.attention(q, k, v, pattern, enable_gqa=True, backend="triton"), monkeypatch)
    assert not reads, reads
