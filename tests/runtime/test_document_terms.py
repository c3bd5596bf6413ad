"""Patterns holding several ``documents(...)`` terms (per-document prefix LM, a shared
prompt, Flamingo-style cross attention, text beside a neighbourhood) run in the generated
kernels: forward, dQ, dK/dV and decode against the fp64 oracle, batched and shared ids
mixed."""

import pytest
import torch

import sparseforge as sf
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
@pytest.mark.parametrize("name", list(PATTERNS))
def test_forward(name, backend):
    q, k, v = random_qkv(2, 4, 2, L, L, 20, seed=len(name))
    assert_matches_oracle(PATTERNS[name], q, k, v, backend)


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
