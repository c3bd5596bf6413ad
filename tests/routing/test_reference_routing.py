"""The torch reference of each routing rule against plain-Python brute force (loops over
blocks, no code shared with the library), its index layouts, and the composition rules
of docs/semantics.md (candidates from the static siblings, unions added)."""

import math

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.oracle.routing import routing_members
from sparseforge.routing.rules import route


def _brute_buckets(q_starts, k_starts, q, k, node_pool, sqrt_len, static, share, lq, lkv):
    """scores [B][Hr][Cq][Ck] (None where not a candidate), by loops."""
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    group = hq // hkv
    qn, kn = q.double().numpy(), k.double().numpy()
    out = []
    for bi in range(b):
        qs, ks = q_starts[min(bi, len(q_starts) - 1)], k_starts[min(bi, len(k_starts) - 1)]
        per_head = []
        for heads in routing_members(share, hq, hkv):
            rows = []
            for cq in range(len(qs) - 1):
                q_rows = [i for i in range(lq) if qs[cq] <= i + lkv - lq < qs[cq + 1]]
                row = []
                for ck in range(len(ks) - 1):
                    keys = list(range(ks[ck], ks[ck + 1]))
                    allowed = any(static[bi if static.shape[0] > 1 else 0, i, j]
                                  for i in q_rows for j in keys)
                    if not (q_rows and keys and allowed):
                        row.append(None)
                        continue
                    total = 0.0
                    for h in heads:
                        qv = (qn[bi, h, q_rows].mean(0) if node_pool == "mean"
                              else qn[bi, h, q_rows].max(0))
                        kv = (kn[bi, h // group, keys].mean(0) if node_pool == "mean"
                              else kn[bi, h // group, keys].max(0))
                        if sqrt_len:
                            qv, kv = qv * math.sqrt(len(q_rows)), kv * math.sqrt(len(keys))
                        total += float(qv @ kv)
                    row.append(total)
                rows.append(row)
            per_head.append(rows)
        out.append(per_head)
    return out


def _brute_topk(scores, k):
    """selected [B][Hr][Cq] -> sorted list of chosen buckets."""
    return [[[sorted(sorted((c for c, s in enumerate(row) if s is not None),
                            key=lambda c, row=row: (-row[c], c))[:k]) for row in head]
             for head in batch] for batch in scores]


def _selected_lists(selection):
    sel = selection.selected
    return [[[sorted(np.nonzero(sel[b, h, c].numpy())[0].tolist()) for c in range(sel.shape[2])]
             for h in range(sel.shape[1])] for b in range(sel.shape[0])]


def _blocks(length, block, first=0):
    lo = math.floor(first / block) * block
    return [max(s, first) for s in range(lo, max(length, lo + 1), block)] + [length]


@pytest.mark.parametrize("block,k,query_block,pool,sqrt_len,share,lq,lkv,static", [
    (8, 2, None, "mean", False, "head", 40, 40, "causal"),
    (8, 3, 1, "mean", False, "head", 19, 37, "causal"),      # per-token, Lq != Lkv
    (16, 2, 8, "max", True, "group", 48, 48, None),
    (5, 2, 7, "mean", True, "all", 33, 41, "window"),
    (8, 4, None, "mean", False, "group", 24, 24, "causal"),   # k above some rows' candidates
])
def test_topk_blocks_equals_brute_force(block, k, query_block, pool, sqrt_len, share, lq, lkv,
                                        static):
    torch.manual_seed(lq * lkv + k)
    q, kk = torch.randn(2, 4, lq, 8), torch.randn(2, 2, lkv, 8)
    node = sf.topk_blocks(block, k, query_block=query_block, pool=pool,
                          scale_by_sqrt_len=sqrt_len, share=share)
    siblings = {"causal": sf.causal(), "window": sf.sliding_window(9), None: None}[static]
    pattern = canonicalize(node if siblings is None else siblings & node)
    (got,) = route(pattern, q, kk, 8 ** -0.5).values()
    static_mask = (sf.dense_mask(siblings, lq, lkv) if siblings is not None
                   else torch.ones(lq, lkv, dtype=torch.bool))[None].numpy()
    qs = [_blocks(lkv, query_block or block, lkv - lq)]
    ks = [_blocks(lkv, block)]
    scores = _brute_buckets(qs, ks, q, kk, pool, sqrt_len, static_mask, share, lq, lkv)
    assert _selected_lists(got) == _brute_topk(scores, k)


def test_topk_chunks_equals_brute_force_with_batched_boundaries():
    torch.manual_seed(3)
    lkv = 50
    bounds = torch.tensor([[0, 7, 8, 20, 33, 50], [0, 12, 25, 26, 40, 50]])
    q, kk = torch.randn(2, 2, lkv, 8), torch.randn(2, 1, lkv, 8)
    pattern = canonicalize(sf.causal() & sf.topk_chunks(bounds, 2, share="group"))
    (got,) = route(pattern, q, kk, 8 ** -0.5).values()
    static_mask = sf.dense_mask(sf.causal(), lkv, lkv)[None].numpy()
    scores = _brute_buckets(bounds.tolist(), bounds.tolist(), q, kk, "mean", True, static_mask,
                            "group", lkv, lkv)
    assert _selected_lists(got) == _brute_topk(scores, 2)


def test_threshold_blocks_equals_brute_force():
    torch.manual_seed(4)
    lq = lkv = 48
    q, kk = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lkv, 8)
    scale = 8 ** -0.5
    pattern = canonicalize(sf.causal() & sf.threshold_blocks(8, 0.7))
    (got,) = route(pattern, q, kk, scale).values()
    static_mask = sf.dense_mask(sf.causal(), lq, lkv)[None].numpy()
    scores = _brute_buckets([_blocks(lkv, 8)], [_blocks(lkv, 8)], q, kk, "mean", False,
                            static_mask, "head", lq, lkv)
    want = []
    for head in scores[0]:
        rows = []
        for row in head:
            cand = [c for c, s in enumerate(row) if s is not None]
            z = [math.exp(row[c] * scale) for c in cand]
            probs = {c: e / sum(z) for c, e in zip(cand, z)}
            kept, mass = [], 0.0
            for c in sorted(cand, key=lambda c: (-probs[c], c)):
                if mass >= 0.7:
                    break
                kept.append(c)
                mass += probs[c]
            rows.append(sorted(kept))
        want.append(rows)
    assert _selected_lists(got) == [want]


def test_vertical_slash_equals_brute_force():
    torch.manual_seed(5)
    lq = lkv = 40
    q, kk = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lkv, 8)
    scale = 8 ** -0.5
    pattern = canonicalize(sf.causal() & sf.vertical_slash(4, 3, last_q=6))
    (got,) = route(pattern, q, kk, scale).values()
    for h in range(2):
        s = (q[0, h, -6:].double() @ kk[0, h].double().T) * scale
        rows = torch.arange(lq - 6, lq)
        s = s.masked_fill(torch.arange(lkv)[None] > rows[:, None], float("-inf"))
        probs = torch.softmax(s, -1)
        col = probs.sum(0).tolist()
        diag = [0.0] * (2 * lkv - 1)
        for r, i in enumerate(rows.tolist()):
            for j in range(lkv):
                diag[i - j + lkv - 1] += float(probs[r, j])
        want_cols = sorted(sorted(range(lkv), key=lambda c: (-col[c], c))[:4])
        diag_cand = [d for d in range(2 * lkv - 1) if d >= lkv - 1]  # causal: p - j >= 0
        want_diag = sorted(sorted(diag_cand, key=lambda d: (-diag[d], d))[:3])
        assert np.nonzero(got.columns[0, h].numpy())[0].tolist() == want_cols
        assert np.nonzero(got.diagonals[0, h].numpy())[0].tolist() == want_diag


def test_index_layouts_hold_the_selection():
    torch.manual_seed(6)
    q, kk = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 64, 8)
    for node, kmax in ((sf.causal() & sf.topk_blocks(8, 3), 3),
                       (sf.causal() & sf.threshold_blocks(8, 0.5), 8)):
        (sel,) = route(canonicalize(node), q, kk, 0.3).values()
        fixed = sel.fixed_k_indices(kmax)
        assert fixed.dtype == torch.int32 and fixed.shape == (*sel.selected.shape[:3], kmax)
        ck = sel.selected.shape[-1]
        valid = fixed >= 0
        rebuilt = torch.zeros(*sel.selected.shape[:3], ck + 1, dtype=torch.bool)  # ck: padding
        rebuilt.scatter_(-1, torch.where(valid, fixed, ck).long(), True)
        assert torch.equal(rebuilt[..., :ck], sel.selected)
        assert (fixed[..., 1:][valid[..., 1:]] > fixed[..., :-1][valid[..., 1:]]).all()  # ascending
        counts, offsets, flat = sel.csr()
        assert flat.numel() == sel.selected.numel()  # worst-case size, not data-dependent
        rows = sel.selected.flatten(0, 2)
        for r in range(rows.shape[0]):
            got = flat[offsets[r]:offsets[r + 1]].tolist()
            assert got == np.nonzero(rows[r].numpy())[0].tolist()
        assert (flat[offsets[-1]:] == -1).all() and torch.equal(counts.flatten(), rows.sum(1).int())


def test_moba_composition():
    """Each token: its own block (causally) plus at most k earlier blocks it selected."""
    torch.manual_seed(7)
    q, kk = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    moba = (sf.causal() & sf.topk_blocks(8, 2, query_block=1)) | (sf.causal() & sf.chunks(8))
    mask = sf.dense_mask(moba, 64, 64, content=(q, kk))
    causal = sf.dense_mask(sf.causal(), 64, 64)
    own = sf.dense_mask(sf.causal() & sf.chunks(8), 64, 64)
    assert not (mask & ~causal).any() and (mask & own).eq(own).all()
    blocks = mask.view(1, 2, 64, 8, 8).any(-1)
    own_blocks = own.view(64, 8, 8).any(-1)
    assert ((blocks & ~own_blocks).sum(-1) <= 2).all()
    assert ((blocks & ~own_blocks).sum(-1) >= 1).any()


def test_candidates_come_from_the_static_siblings():
    """A routed block outside the window is never chosen; the union's window is always kept."""
    torch.manual_seed(8)
    q, kk = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    inside = sf.dense_mask(sf.sliding_window(12) & sf.topk_blocks(8, 5), 64, 64, content=(q, kk))
    window = sf.dense_mask(sf.sliding_window(12), 64, 64)
    assert not (inside[0, 0] & ~window).any()
    plus = sf.dense_mask(sf.topk_blocks(8, 1) | sf.sliding_window(12), 64, 64, content=(q, kk))
    assert (plus[0, 0] | ~window).all()


@pytest.mark.parametrize("build,error,match", [
    (lambda: sf.topk_blocks(0, 2), ValueError, "block"),
    (lambda: sf.topk_blocks(8, 2, share="heads"), ValueError, "share"),
    (lambda: sf.topk_blocks(8, 2, pool="sum"), ValueError, "pool"),
    (lambda: sf.topk_blocks(8, 2.0), TypeError, "k"),
    (lambda: sf.threshold_blocks(8, 1.5), ValueError, "coverage"),
    (lambda: sf.vertical_slash(0, 0), ValueError, "keeps nothing"),
    (lambda: sf.topk_chunks([0, 4, 8], 1), TypeError, "boundaries"),
    (lambda: sf.topk_chunks(torch.tensor([0.0, 4.0]), 1), TypeError, "integer dtype"),
])
def test_constructor_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_call_time_errors():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="content=\\(q, k\\)"):
        sf.dense_mask(sf.topk_blocks(4, 1), 16, 16)
    with pytest.raises(ValueError, match="first boundary 0 and the last kv_len=16"):
        sf.attention(q, q, q, sf.topk_chunks(torch.tensor([0, 8, 12]), 1))
    with pytest.raises(ValueError, match="strictly increasing"):
        sf.attention(q, q, q, sf.topk_chunks(torch.tensor([0, 8, 8, 16]), 1))
    with pytest.raises(ValueError, match="two routing nodes"):
        sf.attention(q, q, q, sf.topk_blocks(4, 1) & sf.threshold_blocks(4, 0.5))
    with pytest.raises(ValueError, match="no generated kernel"):
        sf.attention(q, q, q, sf.vertical_slash(1, 1) | sf.topk_blocks(4, 1), backend="triton")
    with pytest.raises(ValueError, match="per_head with routing nodes"):
        sf.attention(q, q, q, sf.per_head([sf.topk_blocks(4, 1), sf.causal()]))


def test_plan_records_the_routing_dag():
    p = sf.plan((sf.causal() & sf.topk_blocks(512, 3, query_block=1)) | (sf.causal() & sf.chunks(512)),
                q_len=8192, kv_len=8192, head_dim=128, target="sm_90")
    dag = p.routing_dag
    assert set(dag.predecessors("attention")) == {"tiles0"}
    assert list(dag.predecessors("tiles0")) == ["select0"]
    assert list(dag.predecessors("score0")) == ["pool_q0", "pool_k0"]
    text = p.explain()
    assert "routing     5 pre-kernel(s)" in text and "fixed-k indices [8192, 3]" in text
    # the kernel walks the static part (routing nodes read as empty) in closed form
    static = p.kernels[0].static_mask
    assert torch.equal(sf.dense_mask(static, 64, 64), sf.dense_mask(sf.causal() & sf.chunks(512), 64, 64))
    # two routing nodes (no kernel): the envelope (routing nodes read as full), for torch ops
    envelope = sf.plan(sf.causal() & (sf.vertical_slash(4, 4) | sf.topk_blocks(64, 1)),
                       q_len=512, kv_len=512, head_dim=64)
    assert torch.equal(sf.dense_mask(envelope.kernels[0].pattern, 64, 64),
                       sf.dense_mask(sf.causal(), 64, 64))
