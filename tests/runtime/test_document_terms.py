"""Patterns holding run-time data run in the generated kernels: several ``documents(...)``
terms (per-document prefix LM, a shared prompt, Flamingo-style cross attention) and bool
``mask_table``s (tree masks). Forward, dQ, dK/dV and decode against the fp64 oracle,
batched and shared tensors mixed, in-place edits seen, CPU tiles exact."""

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.affine import data_conjuncts
from sparseforge.planner.data_hulls import tile_hulls
from sparseforge.planner.schedule import GroupSchedule, group_geometry, visit_matrices
from sparseforge.runtime.cpu_tiles import refined_schedule
from tests.helpers import assert_matches_oracle, random_qkv
from tests.runtime.test_backward import _check as check_gradients
from tests.runtime.test_decode import _check as check_decode

L = 67
DOCS = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 30, 17]))
BATCHED = torch.stack([DOCS, DOCS.flip(0)])
#: 1 on the first 5 tokens of each document (its prefix), 0 elsewhere
PREFIX = torch.cat([(torch.arange(n) < 5).long() for n in (20, 30, 17)])
ONES = torch.ones(L, dtype=torch.long)
#: a shared prompt: tokens 0..9 (id 1) are seen by every query
PROMPT = (torch.arange(L) < 10).long()

PATTERNS = {
    # each document causal, plus its own prefix bidirectional
    "per_document_prefix_lm": sf.documents(BATCHED) & (sf.causal()
                                                       | sf.documents(ONES, kv_ids=PREFIX)),
    # packed documents, all of them seeing a shared prompt
    "shared_prompt": (sf.documents(DOCS) & sf.causal()) | sf.documents(ONES, kv_ids=PROMPT),
    # text tokens (the last 40) see the image tokens of their own sample (Flamingo)
    "cross_attention": sf.documents(torch.where(torch.arange(L) >= 27, DOCS, -1),
                                    kv_ids=torch.where(torch.arange(L) < 27, DOCS, -2))
                       | (sf.documents(DOCS) & sf.causal()),
}


def test_three_terms_are_counted():
    pattern = PATTERNS["per_document_prefix_lm"] | sf.documents(PROMPT)
    assert len(sf.ir.nodes.document_terms(pattern)) == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["per_document_prefix_lm", "shared_prompt", "cross_attention",
                                  "table_or_sinks", "batched_table_and_causal",
                                  "table_beside_documents"])
def test_forward(name, backend):
    q, k, v = random_qkv(2, 4, 2, L, L, 20, seed=len(name))
    assert_matches_oracle({**PATTERNS, **TABLES}[name], q, k, v, backend)


@pytest.mark.parametrize("name", ["per_document_prefix_lm", "shared_prompt"])
def test_gradients(name):
    check_gradients(*random_qkv(2, 2, 2, L, L, 16, seed=5), PATTERNS[name], "triton")


def test_decode(launched_kinds):
    # three new tokens against the cache: one id tensor over the cache gives them its
    # last ids; separate query ids are the new tokens' own
    pattern = (sf.documents(BATCHED) & sf.causal()) | sf.documents(ONES[:3], kv_ids=PROMPT)
    check_decode(*random_qkv(2, 4, 2, 3, L, 32, seed=7), pattern)
    assert "decode" in launched_kinds


def test_flex_mask_with_two_id_tensors():
    """A Flex mask_mod reading two captured id tensors lowers to two terms and runs."""
    def prompt_and_documents(b, h, q_idx, kv_idx):
        same = (DOCS[q_idx] == DOCS[kv_idx]) & (q_idx >= kv_idx)
        return same | (ONES[q_idx] == PROMPT[kv_idx])

    pattern = sf.from_mask_mod(prompt_and_documents)
    assert len(sf.ir.nodes.document_terms(pattern)) == 2
    assert_matches_oracle(pattern, *random_qkv(1, 2, 2, L, L, 16, seed=3), "triton")


# --------------------------------------------------------------------- mask tables

TREE = torch.rand(2, L, L, generator=torch.Generator().manual_seed(4)) > 0.7
TABLES = {
    "table_or_sinks": sf.mask_table(TREE[0]) | sf.sinks(3),
    "batched_table_and_causal": sf.mask_table(TREE) & sf.causal(),
    "table_beside_documents": (sf.documents(DOCS) & sf.causal()) | sf.mask_table(TREE[1]),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_table_gradients(backend):
    check_gradients(*random_qkv(2, 2, 2, L, L, 16, seed=6), TABLES["batched_table_and_causal"],
                    backend)


def test_mask_table_decode(launched_kinds):
    table = torch.rand(2, 3, L, generator=torch.Generator().manual_seed(8)) > 0.5
    check_decode(*random_qkv(2, 4, 2, 3, L, 32, seed=7), sf.mask_table(table) | sf.sinks(2))
    assert "decode" in launched_kinds


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_table_edited_in_place_is_seen(backend):
    """The packed tables (Triton) and refined CPU programs are cached; an in-place edit
    must never be served stale."""
    table = torch.rand(L, L, generator=torch.Generator().manual_seed(9)) > 0.5
    pattern = sf.mask_table(table)
    q, k, v = random_qkv(1, 2, 2, L, L, 16, seed=9)
    assert_matches_oracle(pattern, q, k, v, backend)
    table[:, : L // 2] = ~table[:, : L // 2]
    assert_matches_oracle(pattern, q, k, v, backend)


def test_mask_table_tiles_are_exact_on_cpu():
    """The CPU executor computes only the tiles where the table holds a true pair."""
    table = torch.zeros(256, 256, dtype=torch.bool)
    table[60:90, 10:20] = True  # two query tiles of 64, one key tile
    table[64:128, 128:192] = True  # a whole tile: full
    p = sf.plan(sf.mask_table(table), q_len=256, kv_len=256, head_dim=16, dtype="float32",
                target="cpu")
    geo = group_geometry(256, 256, 1)[0]
    visit, full = visit_matrices(list(p.kernels[0].walked_segments), 256, 256, p.block_m,
                                 p.block_n)
    assert visit.all() and not full.any()  # the plan cannot see the table
    (refined,) = refined_schedule(p, sf.mask_table(table), GroupSchedule(geo, visit, full))
    assert refined.visit.sum() == 3 and refined.full.sum() == 1 and refined.full[1, 2]


def test_mask_table_checks_its_shape():
    q, k, v = random_qkv(1, 2, 2, 20, 30, 16)
    with pytest.raises(ValueError, match="mask_table"):
        sf.attention(q, k, v, sf.mask_table(torch.ones(30, 20, dtype=torch.bool)))
    with pytest.raises(TypeError, match="bool"):
        sf.mask_table(torch.ones(20, 30))


def test_table_hulls_bound_each_tile_row():
    """Per tile row, the first and one past the last tile holding a true pair of every
    conjunct table; empty rows get an empty range; a table makes no tile full; a table
    in a union bounds nothing."""
    table = torch.zeros(2, 100, 130, dtype=torch.bool)
    table[0, 5, 40] = table[0, 5, 100] = True  # batch 0, query tile 0: key tiles 1 .. 3
    table[1, 70, 0] = True  # batch 1, query tile 2: key tile 0
    pattern = sf.causal() & sf.mask_table(table)
    hulls = tile_hulls(pattern, 100, 130, 32, 32, False, "cpu")
    assert hulls.shape == (2, 4, 4)
    assert hulls[0, 0].tolist() == [1, 4, 0, 0] and hulls[1, 2].tolist() == [0, 1, 0, 0]
    assert hulls[0, 1, 0] >= hulls[0, 1, 1]  # nothing in query tile 1
    by_keys = tile_hulls(pattern, 100, 130, 32, 32, True, "cpu")  # per key tile: query tiles
    assert by_keys.shape == (2, 5, 4)
    assert by_keys[0, 1, :2].tolist() == [0, 1] and by_keys[0, 3, :2].tolist() == [0, 1]
    assert by_keys[1, 0, :2].tolist() == [2, 3]
    assert data_conjuncts(sf.top_left(sf.causal() & sf.mask_table(table[0])))
    assert not data_conjuncts(sf.causal() | sf.mask_table(table))


def _dense_tile_ranges(mask, block_rows, block_cols):
    """Per tile row: [first, last + 1) of occupied tiles and the set of all-true tiles."""
    b, rows, cols = mask.shape
    tr, tc = -(-rows // block_rows), -(-cols // block_cols)
    out = []
    for batch in range(b):
        per_row = []
        for r in range(tr):
            occupied, full = [], set()
            for c in range(tc):
                tile = mask[batch, r * block_rows:(r + 1) * block_rows,
                            c * block_cols:(c + 1) * block_cols]
                if tile.any():
                    occupied.append(c)
                if tile.all() and tile.shape[1] == block_cols:
                    full.add(c)
            per_row.append((occupied, full))
        out.append(per_row)
    return out


@pytest.mark.parametrize("by_keys", [False, True])
def test_document_hulls_bound_tiles_and_name_only_full_ones(by_keys):
    """Document ids give each tile row the hull of the tiles holding one of its ids
    (ids need not be sorted or contiguous, per batch row, queries apart from keys), and a
    full range made of all-true tiles only; every occupied tile lies in the hull."""
    gen = torch.Generator().manual_seed(5)
    packed = torch.repeat_interleave(torch.arange(5), torch.tensor([9, 40, 3, 70, 28]))
    scattered = torch.randint(0, 4, (150,), generator=gen)
    cases = [(sf.documents(packed), 120, 150, True),
             (sf.documents(torch.stack([packed, scattered])), 150, 150, True),
             (sf.documents(packed[:100], kv_ids=packed), 100, 150, True),
             (sf.documents(packed) & sf.documents(torch.stack([packed // 2, packed // 3])), 150,
              150, True),
             (sf.documents(scattered), 150, 150, False)]
    for pattern, q_len, kv_len, some_full in cases:
        dense = sf.dense_mask(pattern, q_len, kv_len, batch=2).expand(2, 1, q_len, kv_len)[:, 0]
        dense = dense.transpose(1, 2) if by_keys else dense
        hulls = tile_hulls(pattern, q_len, kv_len, 16, 32, by_keys, "cpu").expand(2, -1, -1)
        fulls = 0
        for batch, per_row in enumerate(_dense_tile_ranges(dense, 16, 32)):
            for r, (occupied, full) in enumerate(per_row):
                lo, hi, flo, fhi = hulls[batch, r].tolist()
                if occupied:
                    assert (lo, hi) == (occupied[0], occupied[-1] + 1), (pattern, batch, r)
                else:
                    assert lo >= hi
                assert set(range(flo, fhi)) <= full, (pattern, batch, r)
                fulls += fhi > flo
        assert (fulls > 0) == some_full, pattern


@pytest.mark.parametrize("data", ["table", "documents"])
@pytest.mark.parametrize("q_len", [128, 3])
def test_kernels_skip_tiles_outside_the_data(q_len, data, launched_kinds):
    """v is NaN at every key outside the tiles of the table's true pairs (of the queries'
    document): a kernel visiting one of those tiles would spread the NaN (0 * NaN) into
    the output or the gradients. The forward, dQ, dK/dV and decode kernels all walk only
    the tiles the data allows (documents: their inner tiles as full tiles)."""
    if data == "table":
        table = torch.zeros(q_len, 128, dtype=torch.bool)
        rows = min(q_len, 48)
        table[-rows:, 64:96] = torch.rand(rows, 32, generator=torch.Generator().manual_seed(1)) > 0.3
        pattern = sf.causal() & sf.mask_table(table)
    else:  # the last 48 queries belong to document 1, which holds keys 64 .. 95
        kv_ids = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([64, 32, 32]))
        q_ids = torch.full((q_len,), 3)
        q_ids[-min(q_len, 48):] = 1
        pattern = sf.top_left(sf.causal()) & sf.documents(q_ids, kv_ids=kv_ids) if q_len > 16 \
            else sf.documents(q_ids, kv_ids=kv_ids)
    q, k, v = random_qkv(1, 2, 2, q_len, 128, 16, seed=11)
    clean = v.clone()
    v[:, :, :64] = float("nan")
    v[:, :, 96:] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sf.attention(q, k, v, pattern, backend="triton")
    assert ("decode" if q_len <= 16 else "forward") in launched_kinds
    ref = sf.reference_attention(q.detach().double(), k.detach().double(), clean.double(), pattern)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert not (dq.isnan().any() or dk.isnan().any() or dv.isnan().any())
    assert dv[:, :, :64].abs().max() == 0 and dv[:, :, 96:].abs().max() == 0
