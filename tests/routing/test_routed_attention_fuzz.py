"""Fuzz: 80 random routed patterns (every routing rule, composed with static parts,
document ids among them, by ``&`` and ``|``), GQA, Lq != Lkv, odd head dims. The mask
rebuilt here from the production routing's index layouts (fixed-k indices, column and
diagonal flags, cluster memberships) equals the oracle's (``sf.dense_mask``: literal
routing loops written from docs/semantics.md, no code shared with ``routing.rules``);
the CPU path's attention equals fp64 attention under that mask and
``sf.reference_attention``; gradients on a subset."""

import math
import random

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.ir.nodes import walk
from sparseforge.ir.routing import Clusters, DynamicPattern, TopkKeys, VerticalSlash
from sparseforge.routing.rules import route
from sparseforge.semantics import pair_mask

STATIC = [lambda r, lkv: sf.causal(), lambda r, lkv: sf.sliding_window(r.randint(4, 24)),
          lambda r, lkv: sf.causal() & sf.chunks(r.choice([8, 16])),
          lambda r, lkv: sf.causal() & sf.documents(
              torch.tensor(sorted(r.randint(0, 2) for _ in range(lkv))))]


def _config(seed):
    r = random.Random(seed)
    lkv = r.randint(20, 70)
    lq = lkv if r.random() < 0.5 else r.randint(1, lkv)
    hkv = r.choice([1, 2])
    hq = hkv * r.choice([1, 2, 3])
    d = r.choice([8, 13, 16, 24])
    kind = r.choice(["topk", "topk", "token", "chunks", "threshold", "vslash", "hip", "keys",
                     "clusters"])
    share = r.choice(["head", "group", "all"])
    if kind == "topk":
        node = sf.topk_blocks(r.choice([4, 8, 16]), r.randint(1, 3), share=share,
                              query_block=r.choice([None, 4, 8]), pool=r.choice(["mean", "max"]),
                              scale_by_sqrt_len=r.random() < 0.3)
    elif kind == "token":
        node = sf.topk_blocks(r.choice([4, 8]), r.randint(1, 3), query_block=1, share=share)
    elif kind == "chunks":
        cuts = sorted(r.sample(range(1, lkv), r.randint(1, min(6, lkv - 1))))
        node = sf.topk_chunks(torch.tensor([0, *cuts, lkv]), r.randint(1, 3), share=share)
    elif kind == "threshold":
        node = sf.threshold_blocks(r.choice([4, 8]), r.choice([0.3, 0.6, 0.9]), share=share)
    elif kind == "hip":
        node = sf.hierarchical(r.randint(1, 3), r.choice([2, 4, 8]), query_block=r.choice([None, 8]))
    elif kind == "keys":
        node = sf.topk_keys(torch.randn(hq, lkv, generator=torch.Generator().manual_seed(seed)),
                            r.randint(1, 12), query_block=r.choice([4, 16]))
    elif kind == "clusters":
        node = sf.clusters(torch.randn(r.choice([1, hkv]), r.randint(1, 4), d,
                                       generator=torch.Generator().manual_seed(seed)),
                           balanced=r.choice([None, None, r.randint(1, lq)]))
    else:
        node = sf.vertical_slash(r.randint(0, 5), r.randint(1, 4), last_q=r.randint(1, 16))
    form = r.choice(["alone", "and", "and_or", "or"])
    static = r.choice(STATIC)(r, lkv)
    extra = r.choice([sf.sinks(r.randint(1, 4)), sf.sliding_window(r.randint(2, 6))])
    pattern = {"alone": node, "and": static & node, "and_or": (static & node) | extra,
               "or": node | extra}[form]
    return pattern, lq, lkv, hq, hkv, d


def _rebuilt_mask(pattern, q, k, scale):
    """[B, Hq, Lq, Lkv] from the selections' index layouts, composed by hand."""
    canonical = canonicalize(pattern)
    b, hq, lq, _ = q.shape
    lkv = k.shape[2]
    routing = route(canonical, q, k, scale)
    p = torch.arange(lq) + lkv - lq
    j = torch.arange(lkv)

    def node_mask(node):
        sel = routing[node]
        if isinstance(node, Clusters):  # shared memberships, per head
            group = hq // sel.k_member.shape[1]
            km = sel.k_member.repeat_interleave(group, 1)
            return (sel.q_member.float() @ km.float().transpose(-1, -2)) > 0
        if isinstance(node, VerticalSlash):
            off = p[:, None] - j[None, :] + lkv - 1  # < 0: rows before the first key
            diag = sel.diagonals[:, :, off.clamp(min=0)] & (off >= 0)
            return sel.columns[:, :, None, :] | diag
        idx = sel.fixed_k_indices(sel.selected.shape[-1]).long()  # [B, Hr, Cq, Ck]
        qs, ks = sel.q_starts, sel.k_starts
        out = torch.zeros(b, hq, lq, lkv, dtype=torch.bool)
        for bi in range(b):
            qsb, ksb = qs[min(bi, len(qs) - 1)].tolist(), ks[min(bi, len(ks) - 1)].tolist()
            for h in range(hq):
                hr = int(sel.heads[h])
                for i in range(lq):
                    cq = next(c for c in range(len(qsb) - 1) if qsb[c] <= p[i] < qsb[c + 1])
                    for c in idx[bi, hr, cq].tolist():
                        if c >= 0:
                            out[bi, h, i, ksb[c]:ksb[c + 1]] = True
        return out

    def evaluate(node):
        if isinstance(node, DynamicPattern):
            return node_mask(node)
        if not any(isinstance(n, DynamicPattern) for n in walk(node)):
            m = pair_mask(node, torch.arange(lq)[:, None], torch.arange(lkv)[None, :], lq, lkv)
            return m[:, None] if m.dim() == 3 else m[None, None]
        parts = [evaluate(c) for c in node.parts]
        out = parts[0]
        for m in parts[1:]:
            out = out | m if type(node).__name__ == "Union" else out & m
        return out

    return evaluate(canonical).expand(b, hq, lq, lkv)


def _masked_attention(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(group, 1) for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ vv


@pytest.mark.parametrize("seed", range(80))
def test_routed_attention_matches_its_indices(seed):
    pattern, lq, lkv, hq, hkv, d = _config(seed)
    torch.manual_seed(seed)
    q = torch.randn(2, hq, lq, d, requires_grad=True)
    k, v = (torch.randn(2, hkv, lkv, d, requires_grad=True) for _ in range(2))
    scale = d ** -0.5
    mask = _rebuilt_mask(pattern, q.detach(), k.detach(), scale)
    assert torch.equal(sf.dense_mask(pattern, lq, lkv, content=(q.detach(), k.detach())), mask)
    out = sf.attention(q, k, v, pattern, enable_gqa=True)
    if not any(isinstance(n, TopkKeys) for n in walk(pattern)):  # DMA also biases the scores
        want = _masked_attention(q.detach(), k.detach(), v.detach(), mask, scale)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-5)
    if seed % 4 == 0:
        go = torch.randn_like(out)
        for g, w in zip(torch.autograd.grad(out, (q, k, v), go),
                        torch.autograd.grad(ref, (q, k, v), go.double())):
            torch.testing.assert_close(g, w.float(), atol=5e-5, rtol=1e-5)
    assert math.isfinite(float(out.detach().sum()))
