"""The oracle (``sparseforge.oracle``, written from docs/semantics.md and sharing no code
with production) agrees with the production semantics on random compositions: static
primitives, documents, N-D neighbourhoods, ``per_head``, score modifiers and routing,
with Lq != Lkv. Hundreds of masks, and attention outputs through the torch path."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.ir.neighborhood import Neighborhood
from sparseforge.ir.nodes import PerHead, walk
from sparseforge.semantics import pair_mask
from tests.strategies import neighbourhoods, primitives

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def documents(draw, lq: int, lkv: int):
    """Document ids: one tensor read at absolute positions, or separate query/key ids,
    possibly batched."""
    batch = draw(st.sampled_from([None, 2]))
    shape = (lkv,) if batch is None else (batch, lkv)
    ids = torch.sort(torch.randint(0, draw(st.integers(1, 4)), shape), dim=-1).values
    if lq <= lkv and draw(st.booleans()):
        return sf.documents(ids)
    q_ids = torch.randint(0, 3, (lq,) if batch is None else (batch, lq))
    return sf.documents(q_ids, kv_ids=torch.randint(0, 3, shape))


@st.composite
def compositions(draw, lq: int, lkv: int):
    """Random unions and intersections of primitives, documents and a neighbourhood."""
    leaves = st.one_of(primitives, documents(lq, lkv), neighbourhoods(min_extent=2))
    tree = st.recursive(leaves, lambda inner: st.one_of(
        st.builds(lambda a, b: a | b, inner, inner),
        st.builds(lambda a, b: a & b, inner, inner)), max_leaves=4)
    return draw(tree)


def production_mask(pattern, lq: int, lkv: int) -> torch.Tensor:
    """``[B or 1, H or 1, Lq, Lkv]`` from the production semantics (canonical form, then
    ``semantics.pair_mask``): what the CPU path and the planner evaluate."""
    canonical = canonicalize(pattern)
    heads = canonical.patterns if isinstance(canonical, PerHead) else (canonical,)
    i, j = torch.arange(lq)[:, None], torch.arange(lkv)[None, :]
    masks = []
    for h in heads:
        m = pair_mask(h, i, j, lq, lkv)
        masks.append(m[:, None] if m.dim() == 3 else m[None, None])
    b = max(m.shape[0] for m in masks)
    return torch.cat([m.expand(b, 1, lq, lkv) for m in masks], 1)


def oracle_mask(pattern, lq: int, lkv: int) -> torch.Tensor:
    m = sf.dense_mask(pattern, lq, lkv, batch=None)
    if isinstance(pattern, PerHead):
        return m[None] if m.dim() == 3 else m
    return m[None, None] if m.dim() == 2 else m


lengths = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=500, **SETTINGS)
@given(st.data(), lengths)
def test_static_masks_agree_on_500_compositions(data, sizes):
    lq, lkv = sizes
    pattern = data.draw(compositions(lq, lkv))
    want = production_mask(pattern, lq, lkv)
    got = oracle_mask(pattern, lq, lkv)
    assert torch.equal(*torch.broadcast_tensors(got, want)), pattern


@settings(max_examples=60, **SETTINGS)
@given(st.data(), lengths, st.integers(1, 3))
def test_per_head_masks_agree(data, sizes, heads):
    lq, lkv = sizes
    pattern = sf.per_head([data.draw(compositions(lq, lkv)) for _ in range(heads)])
    got, want = oracle_mask(pattern, lq, lkv), production_mask(pattern, lq, lkv)
    assert torch.equal(*torch.broadcast_tensors(got, want)), pattern


@st.composite
def scored(draw, heads: int, lq: int, lkv: int):
    """A mask with a random set of score modifiers (ALiBi, a token-offset or a window
    rel_bias table, softcap)."""
    mask = draw(st.one_of(compositions(lq, lkv), neighbourhoods(min_extent=2)))
    parts = [mask]
    if draw(st.booleans()):
        parts.append(sf.alibi(torch.rand(heads)))
    grids = {(n.shape, n.dilation) for n in walk(mask) if isinstance(n, Neighborhood)}
    table = draw(st.sampled_from(["none", "token", "window"] if len(grids) == 1 else ["none", "token"]))
    if table == "token":
        parts.append(sf.rel_bias(torch.randn(heads, 2 * draw(st.integers(0, 6)) + 1)))
    elif table == "window":
        (shape, _), = grids
        parts.append(sf.rel_bias(torch.randn(heads, *(2 * min(e, 3) + 1 for e in shape))))
    if draw(st.booleans()):
        parts.append(sf.softcap(draw(st.floats(0.5, 20.0))))
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


@settings(max_examples=40, **SETTINGS)
@given(st.data(), st.integers(1, 24), st.integers(1, 24), st.sampled_from([(2, 1), (2, 2), (3, 1)]))
def test_attention_with_score_modifiers_agrees_with_the_torch_path(data, lq, lkv, heads):
    hq, hkv = heads
    pattern = data.draw(scored(hq, lq, lkv))
    g = torch.Generator().manual_seed(lq * 100 + lkv)
    q = torch.randn(2, hq, lq, 8, generator=g)
    k, v = torch.randn(2, hkv, lkv, 8, generator=g), torch.randn(2, hkv, lkv, 8, generator=g)
    gqa = hq != hkv
    out, lse = sf.attention(q, k, v, pattern, enable_gqa=gqa, return_lse=True, backend="torch")
    ref, ref_lse = sf.reference_attention(q, k, v, pattern, enable_gqa=gqa, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=2e-5, rtol=1e-5)
