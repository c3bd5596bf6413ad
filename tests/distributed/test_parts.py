"""``part_pattern`` rewrites a pattern over a part of the sequence (queries at ``a + i``,
keys at ``c + t``) exactly: its mask on the part equals the whole sequence's mask
sliced, for offsets on and off the block, chunk and dilation grids, and ``sf.attention``
on the part equals the oracle's on the sliced mask."""

import itertools

import pytest
import torch

import sparseforge as sf
from sparseforge.distributed.layout import self_attention_pattern
from sparseforge.distributed.parts import part_pattern
from sparseforge.semantics import pair_mask

L = 90


def patterns():
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([31, 7, 40, 12]))
    g = torch.Generator().manual_seed(3)
    table = torch.rand(L, L, generator=g) < 0.3
    return {
        "causal": sf.causal(),
        "window_sinks": sf.sliding_window(20) | sf.sinks(3),
        "two_sided_window": sf.window(5, 9),
        "documents": sf.documents(ids[None].repeat(2, 1)) & sf.causal(),
        "prefix_lm": sf.prefix_lm(30),
        "global_queries": sf.global_queries(6) | sf.sliding_window(4),
        "chunks_or_dilated": sf.chunks(24) | sf.window(6, 2, dilation=3),
        "affine": sf.affine(2, -1, -5) & sf.causal(),
        "mask_table": sf.mask_table(table),
        "softcap": sf.causal() & sf.softcap(5.0),
        "per_head": sf.per_head([sf.causal(), sf.chunks(10)]),
    }


def _mask(pattern, n, m):
    return pair_mask(pattern, torch.arange(n)[:, None], torch.arange(m)[None], n, m)


@pytest.mark.parametrize("name", list(patterns()))
def test_part_mask_is_the_slice_of_the_whole(name):
    canonical = self_attention_pattern(patterns()[name])
    heads = canonical.patterns if isinstance(canonical, sf.ir.nodes.PerHead) else (canonical,)
    whole = [_mask(h, L, L) for h in heads]
    for a, c in itertools.product((0, 7, 24, 41, 66), (0, 5, 24, 48, 71)):
        n, m = min(23, L - a), min(19, L - c)
        part = part_pattern(canonical, a, c, n, m, L)
        assert part is not None, (name, a, c)
        parts = part.patterns if isinstance(part, sf.ir.nodes.PerHead) else (part,)
        for w, p in zip(whole, parts):
            want = w[..., a:a + n, c:c + m]
            got = _mask(p, n, m)
            assert torch.equal(*torch.broadcast_tensors(got, want)), (name, a, c)


@pytest.mark.parametrize("name", ["window_sinks", "documents", "chunks_or_dilated", "softcap"])
def test_attention_on_a_part_matches_the_oracle(name):
    canonical = self_attention_pattern(patterns()[name])
    g = torch.Generator().manual_seed(1)
    for a, c, n, m in ((40, 17, 21, 30), (24, 48, 33, 9), (0, 0, 45, 45)):
        part = part_pattern(canonical, a, c, n, m, L)
        q = torch.randn(2, 4, n, 12, generator=g)
        k, v = (torch.randn(2, 2, m, 12, generator=g) for _ in range(2))
        out, lse = sf.attention(q, k, v, part, enable_gqa=True, return_lse=True)
        want, want_lse = sf.reference_attention(q, k, v, part, enable_gqa=True, return_lse=True)
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), (name, a, c)
        torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)


def test_patterns_with_no_form_on_a_part():
    """Windows of a whole grid, routing and positional score modifiers read positions a
    part does not hold: the caller evaluates them on original positions."""
    for pattern in (sf.neighborhood((9, 10), 3), sf.topk_blocks(8, 2) & sf.causal(),
                    sf.causal() & sf.alibi(sf.alibi_slopes(4))):
        assert part_pattern(self_attention_pattern(pattern), 10, 0, 20, 20, L) is None, pattern
