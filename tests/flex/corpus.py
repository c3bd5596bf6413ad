"""A corpus of FlexAttention mask_mods written the way Flex users write them (Flex's
documentation and attention-gym, and the patterns of the seed papers), at any scale.

``mask_corpus(scale)`` builds every mask with its lengths, windows, documents and
prefixes multiplied by ``scale``: the tests run ``scale=1`` (lengths 29 to 66, not
multiples of 128, Lq != Lkv both ways), ``bench/flex_corpus_tiles.py`` runs larger ones
to count the tiles each side visits. Per-head and per-batch masks and compositions with
``and_masks``/``or_masks`` are included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.attention import flex_attention as flex

B, H = 2, 2  # the batch and heads the per-batch and per-head masks are written for


@dataclass(frozen=True)
class CorpusMask:
    """One mask_mod, the ``from_mask_mod`` keywords it needs, and its lengths."""

    mask_mod: object
    q_len: int
    kv_len: int
    keywords: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.mask_mod.__name__


def tree_table(q_len: int, kv_len: int, prefix: int) -> torch.Tensor:
    """Speculative decoding: each draft token sees the prompt and its tree ancestors
    (a binary tree of ``q_len`` drafts after ``prefix`` prompt keys)."""
    parents = torch.div(torch.arange(q_len) - 1, 2, rounding_mode="floor")
    tree = torch.eye(q_len, dtype=torch.bool)
    for node in range(1, q_len):  # parents come first: one pass closes the ancestry
        tree[node] |= tree[int(parents[node])]
    table = torch.zeros(q_len, kv_len, dtype=torch.bool)
    table[:, prefix:prefix + q_len] = tree
    return table


def _ids(*lengths: int) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def mask_corpus(scale: int = 1) -> dict[str, CorpusMask]:
    """Every mask of the corpus, by name, at ``scale`` times the base sizes."""
    s = scale
    square, wide, tall = (50 * s, 50 * s), (29 * s, 66 * s), (66 * s, 29 * s)
    docs = _ids(22 * s, 26 * s, 18 * s)  # three packed documents
    batch_docs = torch.stack([docs, _ids(36 * s, 30 * s)])  # ids per batch row
    query_docs = _ids(12 * s, 17 * s)  # queries against ``docs`` (cross attention)
    windows = torch.tensor([8 * s, 21 * s])  # per head
    prefix = 17 * s
    tree = tree_table(29 * s, 66 * s, 37 * s)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding_window(b, h, q_idx, kv_idx):  # attention-gym: look back WINDOW tokens
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 24 * s)

    def symmetric_window(b, h, q_idx, kv_idx):  # Longformer / NATTEN 1-D local attention
        return (q_idx - kv_idx).abs() <= 8 * s

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)

    def document_causal(b, h, q_idx, kv_idx):  # packed sequences
        return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)

    def document_bidirectional(b, h, q_idx, kv_idx):
        return docs[q_idx] == docs[kv_idx]

    def batch_documents(b, h, q_idx, kv_idx):
        return (batch_docs[b, q_idx] == batch_docs[b, kv_idx]) & (q_idx >= kv_idx)

    def cross_documents(b, h, q_idx, kv_idx):  # queries of one document see its keys only
        return query_docs[q_idx] == docs[kv_idx]

    def chunked_causal(b, h, q_idx, kv_idx):  # Llama 4's chunked attention
        return (q_idx // (32 * s) == kv_idx // (32 * s)) & (q_idx >= kv_idx)

    def block_causal(b, h, q_idx, kv_idx):  # causal between blocks, full inside (MoBA)
        return q_idx // (16 * s) >= kv_idx // (16 * s)

    def dilated_window(b, h, q_idx, kv_idx):  # DiNA / LongNet dilation
        return ((q_idx - kv_idx) % 3 == 0) & ((q_idx - kv_idx).abs() <= 15 * s)

    def strict_causal(b, h, q_idx, kv_idx):
        return q_idx > kv_idx

    def streaming_llm(b, h, q_idx, kv_idx):  # attention sinks beside a sliding window
        return (kv_idx < 4) | ((q_idx >= kv_idx) & (q_idx - kv_idx < 32 * s))

    def global_tokens(b, h, q_idx, kv_idx):  # Longformer global positions
        return (q_idx < 3) | (kv_idx < 3) | ((q_idx - kv_idx).abs() <= 4 * s)

    def per_head_window(b, h, q_idx, kv_idx):  # a different window per head
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

    def alternating_heads(b, h, q_idx, kv_idx):  # even heads local, odd heads causal
        return torch.where(h % 2 == 0, (q_idx - kv_idx).abs() <= 6 * s, q_idx >= kv_idx)

    def full(b, h, q_idx, kv_idx):  # Flex's noop_mask, written with the indices
        return q_idx >= 0

    def offset_causal(b, h, q_idx, kv_idx):  # bottom-right causal written by hand
        return q_idx + (66 - 29) * s >= kv_idx

    def kv_scaled_band(b, h, q_idx, kv_idx):  # keys at twice the query rate
        return (kv_idx <= 2 * q_idx + 1) & (kv_idx >= 2 * q_idx - 20 * s)

    def early_queries_see_all(b, h, q_idx, kv_idx):
        return torch.where(q_idx < 8 * s, kv_idx >= 0, q_idx >= kv_idx)

    def tree_decoding(b, h, q_idx, kv_idx):  # Medusa / EAGLE draft trees
        return (kv_idx < 37 * s) | tree[q_idx, kv_idx]

    def window_or_prefix_chunks(b, h, q_idx, kv_idx):
        return ((q_idx // (24 * s)) == (kv_idx // (24 * s))) | ((kv_idx < 10 * s) & (q_idx >= kv_idx))

    def prefix_keys(b, h, q_idx, kv_idx):
        return kv_idx < 5 * s

    causal_and_window = flex.and_masks(causal, symmetric_window)
    documents_or_prefix = flex.or_masks(document_causal, prefix_keys)
    nested_composition = flex.and_masks(flex.or_masks(sliding_window, global_tokens), causal)
    causal_and_window.__name__ = "and_masks_causal_window"
    documents_or_prefix.__name__ = "or_masks_documents_prefix"
    nested_composition.__name__ = "and_or_masks_nested"

    docs_len = (66 * s, 66 * s)
    entries = [
        (causal, square), (sliding_window, tall), (symmetric_window, wide), (prefix_lm, square),
        (document_causal, docs_len), (document_bidirectional, docs_len),
        (batch_documents, docs_len, {"batch": B}), (cross_documents, wide),
        (chunked_causal, tall), (block_causal, square), (dilated_window, wide),
        (strict_causal, tall), (streaming_llm, square), (global_tokens, wide),
        (per_head_window, square, {"heads": H}), (alternating_heads, tall, {"heads": H}),
        (full, wide), (offset_causal, wide), (kv_scaled_band, wide),
        (early_queries_see_all, tall), (tree_decoding, wide), (window_or_prefix_chunks, square),
        (causal_and_window, tall), (documents_or_prefix, docs_len),
        (nested_composition, square),
    ]
    corpus = {}
    for mask_mod, (q_len, kv_len), *kw in entries:
        corpus[mask_mod.__name__] = CorpusMask(mask_mod, q_len, kv_len, kw[0] if kw else {})
    return corpus
