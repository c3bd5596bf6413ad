"""``sf.hierarchical`` (HiP): the tree search per query block, vectorised in the torch
reference, equals the oracle's loop implementation of the algorithm (k equal branches over
the candidate blocks, split in two, score the middle key of each child by the max over
the block's queries, keep the top k, repeat to single blocks); the generated pre-kernel
equals the reference in the interpreter and compiles for sm_80/sm_90 without spills;
attention equals the oracle on the torch path and in the routed kernel (interpreter);
the plan counts O(L log L) routing work."""

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.oracle.routing import hip_search
from sparseforge.routing.rules import route
from tests.helpers import compile_in_subprocess


def literal_hip(q, k, top, block, q_block, allowed_blocks):
    """The oracle's loop (``oracle.routing.hip_search``, written from docs/semantics.md)
    per batch, head and query bucket. ``allowed_blocks(c)``: the candidate key blocks of
    query bucket c (sorted)."""
    b, h, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    ck = -(-lkv // block)
    first = (lkv - lq) // q_block
    cq = -(-lkv // q_block) - first
    node = sf.hierarchical(top, block, query_block=q_block)
    out = torch.zeros(b, h, cq, ck, dtype=torch.bool)
    for bi in range(b):
        for hi_ in range(h):
            for c in range(cq):
                rows = [i for i in range(lq) if (i + lkv - lq) // q_block == c + first]
                cands = allowed_blocks(c)
                if rows and cands:
                    chosen = hip_search(node, q[bi, hi_].float(), k[bi, hi_ // (h // hkv)].float(),
                                        rows, cands, lkv)
                    out[bi, hi_, c, chosen] = True
    return out


@pytest.mark.parametrize("lq, lkv, top, block, q_block", [
    (100, 100, 3, 8, None),
    (40, 120, 2, 4, 8),  # Lq != Lkv, query blocks of 8
    (64, 64, 5, 2, 16),  # more blocks than k
    (30, 30, 8, 16, None),  # k above the candidates
])
def test_tree_search_equals_the_literal_algorithm(lq, lkv, top, block, q_block):
    g = torch.Generator().manual_seed(lq + top)
    q = torch.randn(2, 4, lq, 16, generator=g)
    k = torch.randn(2, 2, lkv, 16, generator=g)
    pattern = canonicalize(sf.causal() & sf.hierarchical(top, block, query_block=q_block))
    ((_, sel),) = route(pattern, q, k, 0.25).items()
    qb = q_block or block
    first = (lkv - lq) // qb

    def allowed(c):  # causal: blocks holding a key at or before the bucket's last position
        last = min((c + first + 1) * qb, lkv) - 1
        return list(range(last // block + 1))

    want = literal_hip(q, k, top, block, qb, allowed)
    assert torch.equal(sel.selected, want)
    assert bool((sel.selected.sum(-1) <= top).all())


@pytest.mark.parametrize("lq, lkv, top, block, q_block", [
    (100, 100, 3, 8, None), (40, 120, 2, 4, 8), (64, 64, 5, 2, 16), (30, 30, 8, 16, None),
])
def test_generated_search_equals_the_reference(lq, lkv, top, block, q_block):
    from sparseforge.ir.split import static_siblings
    from sparseforge.routing.selection import BlockSelection
    from sparseforge.runtime.prekernels import route_hip

    g = torch.Generator().manual_seed(lq + top)
    q = torch.randn(2, 4, lq, 16, generator=g)
    k = torch.randn(2, 2, lkv, 16, generator=g)
    pattern = canonicalize((sf.causal() & sf.hierarchical(top, block, query_block=q_block))
                           | sf.sinks(2))
    ((node, want),) = route(pattern, q, k, 0.25).items()
    idx, q_starts, k_starts, heads = route_hip(node, static_siblings(pattern, node), q, k,
                                               interpret=True)
    assert idx.dtype == torch.int32 and idx.shape[-1] == top
    got = BlockSelection.from_fixed_k(idx, q_starts, k_starts, heads)
    assert torch.equal(got.selected, want.selected)
    valid = idx >= 0  # ascending, -1 after the last
    assert bool((idx[..., 1:][valid[..., 1:]] > idx[..., :-1][valid[..., 1:]]).all())
    assert bool((valid[..., :-1] | ~valid[..., 1:]).all())


_COMPILE = """
import json, sparseforge as sf
from sparseforge.runtime.prekernel_compile import compile_hip
out = []
for node in (sf.hierarchical(8, 64), sf.hierarchical(16, 32, query_block=128)):
    for arch in ("sm_80", "sm_90"):
        for d, dtype, n_k in ((64, "float16", 512), (128, "bfloat16", 2048)):
            out.append(compile_hip(node, arch, d, dtype, n_k))
print(json.dumps(out))
"""


def test_generated_search_compiles_for_sm80_and_sm90_without_spills():
    results = compile_in_subprocess(_COMPILE)
    assert len(results) == 8 and {r["arch"] for r in results} == {"sm_80", "sm_90"}
    for r in results:
        assert r["cubin_size"] > 0 and r["spills"] == 0 and r["stack"] == 0, r
        assert 0 < r["registers"] <= 255, r


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hip_prefill_attention_equals_the_oracle(backend):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 90, 32, generator=g)
    k, v = (torch.randn(1, 2, 90, 32, generator=g) for _ in range(2))
    pattern = ((sf.causal() & sf.hierarchical(3, 8, query_block=16)) | sf.sliding_window(8)
               | (sf.causal() & sf.sinks(4)))
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend=backend)
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-5)


def test_plan_counts_l_log_l_routing_work():
    works = []
    for n in (8192, 32768, 131072):
        p = sf.plan(sf.causal() & sf.hierarchical(8, 64), q_len=n, kv_len=n, head_dim=128,
                    target="sm_90")
        assert "refine0" in p.explain()
        works.append(sum(s.work for s in p.routing_steps if s.name.startswith(("refine", "branches"))))
    # O(L log L): work / (L log2(L / block)) is the same at every size (quadratic would
    # grow 4x per step)
    per = [w / (n * (n // 64 - 1).bit_length()) for w, n in zip(works, (8192, 32768, 131072))]
    assert max(per) / min(per) < 1.01, works
