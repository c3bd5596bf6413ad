"""The oracle implements docs/semantics.md literally: checked against plain Python loops."""

import math

import pytest
import torch

import sparseforge as sf
from tests.helpers import random_qkv


def loop_mask(rule, lq, lkv):
    delta = lkv - lq
    return torch.tensor([[rule(i, i + delta, j) for j in range(lkv)] for i in range(lq)])


RULES = [
    (sf.full(), lambda i, p, j: True),
    (sf.causal(), lambda i, p, j: j <= p),
    (sf.window(3, 2, dilation=2),
     lambda i, p, j: (j - p) % 2 == 0 and -3 <= (j - p) / 2 <= 2),
    (sf.sliding_window(5), lambda i, p, j: j <= p and p - j < 5),
    (sf.sinks(3), lambda i, p, j: j < 3),
    (sf.global_queries(4), lambda i, p, j: p < 4),
    (sf.chunks(6), lambda i, p, j: math.floor(p / 6) == j // 6),
    (sf.prefix_lm(5), lambda i, p, j: j <= p or j < 5),
]


@pytest.mark.parametrize("pattern, rule", RULES, ids=[repr(p) for p, _ in RULES])
@pytest.mark.parametrize("lq, lkv", [(17, 17), (9, 23), (23, 9)])
def test_dense_mask_is_the_semantics_table(pattern, rule, lq, lkv):
    assert torch.equal(sf.dense_mask(pattern, lq, lkv), loop_mask(rule, lq, lkv))


def test_documents_mask_and_batch():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    m = sf.dense_mask(sf.documents(ids), 4, 6)
    assert m.shape == (2, 1, 4, 6)
    for b in range(2):
        expect = ids[b, 2:][:, None] == ids[b][None, :]
        assert torch.equal(m[b, 0], expect)
    sep = sf.dense_mask(sf.documents(torch.tensor([1, 2]), kv_ids=torch.tensor([2, 1, 2])), 2, 3)
    assert torch.equal(sep[0, 0], torch.tensor([[False, True, False], [True, False, True]]))


def test_per_head_mask_stacks_heads():
    m = sf.dense_mask(sf.per_head([sf.causal(), sf.sinks(2)]), 5, 5)
    assert m.shape == (2, 5, 5)
    assert torch.equal(m[1], sf.dense_mask(sf.sinks(2), 5, 5))


def test_empty_rows_give_zero_and_minus_inf():
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16)
    out, lse = sf.reference_attention(q, k, v, sf.global_queries(3), return_lse=True)
    assert torch.all(out[:, :, 3:] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 3:]))
    assert torch.isfinite(lse[:, :, :3]).all()


def test_reference_equals_sdpa_on_causal():
    q, k, v = random_qkv(2, 3, 3, 20, 20, 16, dtype=torch.float64)
    ref = sf.reference_attention(q, k, v, sf.causal())
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ref, sdpa)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_tolerance_rejects_an_off_by_one_window(backend):
    """``sliding_window(64)`` judged against the oracle of ``sliding_window(63)`` at L=70
    in bf16 differs by one key per row: the comparison must fail, on the output and on
    the lse, while the right window passes."""
    from tests.helpers import LSE_TOL, assert_matches_oracle, output_tolerance

    q, k, v = random_qkv(1, 2, 2, 70, 70, 32, dtype=torch.bfloat16)
    assert_matches_oracle(sf.sliding_window(64), q, k, v, backend)
    out, lse = sf.attention(q, k, v, sf.sliding_window(64), return_lse=True, backend=backend)
    ref, ref_lse = sf.reference_attention(q, k, v, sf.sliding_window(63), return_lse=True)
    out_err = (out.double() - ref.double()).abs().max().item()
    lse_err = (lse.double() - ref_lse.double()).abs().max().item()
    assert out_err > output_tolerance(ref, v), out_err
    assert lse_err > LSE_TOL[torch.bfloat16] * ref_lse.abs().max().item(), lse_err
