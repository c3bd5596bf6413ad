"""``part_pattern`` rewrites a pattern over a part of the sequence (queries at ``a + i``,
keys at ``c + t``) exactly: its mask on the part equals the whole sequence's mask
sliced, for offsets on and off the block, chunk and dilation grids, and ``sf.attention``
on the part equals the oracle's on the sliced mask."""

import importlib
import itertools

import pytest
import torch

import sparseforge as sf
import sparseforge.distributed as sfd
from sparseforge.distributed.layout import self_attention_pattern
from sparseforge.distributed.parts import part_pattern, part_selection
from sparseforge.routing.rules import route
from sparseforge.runtime.dispatch import attention_with_selection
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
        "neighborhood_1d": sf.neighborhood(L, 7, stride=2),
        "neighborhood_2d": sf.neighborhood((9, 10), (3, 5), dilation=(2, 1)),
        "neighborhood_3d_causal": sf.neighborhood((3, 5, 6), (2, 3, 3), causal=(True, False, False)),
        "neighborhood_or_sinks": sf.neighborhood((10, 9), 3) | sf.sinks(2),
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


@pytest.mark.parametrize("name", ["window_sinks", "documents", "chunks_or_dilated", "softcap",
                                  "neighborhood_2d", "neighborhood_3d_causal"])
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


def modified_patterns():
    """Score modifiers that read positions: each moves with its part."""
    g = torch.Generator().manual_seed(5)
    slopes = sf.alibi_slopes(4)
    table = torch.randn(4, 15, generator=g)
    bias = torch.randn(2, 4, L, L, generator=g)
    return {
        "alibi": sf.sliding_window(30) & sf.alibi(slopes),
        "rel_bias": sf.causal() & sf.rel_bias(table),
        "pair_bias": sf.causal() & sf.pair_bias(bias),
        "all_three": sf.sliding_window(40) & sf.alibi(slopes) & sf.rel_bias(table)
                     & sf.pair_bias(bias[:, :1]),
        "per_head_alibi": sf.per_head([sf.causal() & sf.alibi(slopes), sf.causal(),
                                       sf.sinks(2) | sf.sliding_window(9),
                                       sf.causal() & sf.alibi(slopes)]),
        "rel_bias_softcap": sf.causal() & sf.rel_bias(table) & sf.softcap(3.0),
        "alibi_softcap": sf.causal() & sf.alibi(slopes) & sf.softcap(4.0),
        "neighborhood_2d": patterns()["neighborhood_2d"],
        # window-offset tables (NATTEN's rpb): covering the windows, and clipped beside sinks
        "neighborhood_window_table": (patterns()["neighborhood_2d"]
                                      & sf.rel_bias(torch.randn(4, 5, 9, generator=g))),
        "neighborhood_clipped_table": ((sf.neighborhood((10, 9), 3) | sf.sinks(2))
                                       & sf.rel_bias(torch.randn(4, 3, 3, generator=g))),
    }


@pytest.mark.parametrize("name", list(modified_patterns()))
def test_parts_merged_equal_the_whole(name):
    """A query run attended to the sequence cut into three key runs, each through
    ``sf.attention`` on its part, merged by log-sum-exp: the whole sequence's oracle
    rows, output and lse."""
    pattern = modified_patterns()[name]
    canonical = self_attention_pattern(pattern)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, L, 12, generator=g, dtype=torch.float64) for _ in range(3))
    want, want_lse = sf.reference_attention(q, k, v, pattern, return_lse=True)

    def attend(a, n, c, end):
        part = part_pattern(canonical, a, c, n, end - c, L)
        assert part is not None, name
        return sf.attention(q[:, :, a:a + n].float(), k[:, :, c:end].float(),
                            v[:, :, c:end].float(), part, return_lse=True)

    _merged_parts_equal_the_rows(attend, RUNS, want, want_lse, name)


#: (first query, queries, key cuts covering the sequence): runs on and off the grids
RUNS = ((33, 25, (0, 21, 58, L)), (0, 40, (0, 40, 41, L)), (71, 19, (0, 8, 70, L)))


def _merged_parts_equal_the_rows(attend, runs, want, want_lse, name):
    """Each run of queries attended to each key cut by ``attend(a, n, c, end)`` (out,
    lse), merged by log-sum-exp: the whole's rows ``want``/``want_lse``."""
    for a, n, cuts in runs:
        done = [attend(a, n, c, end) for c, end in zip(cuts, cuts[1:])]
        out, lse = sf.merge([o for o, _ in done], [s for _, s in done])
        rows = want_lse[:, :, a:a + n].float()
        assert torch.equal(torch.isinf(lse), torch.isinf(rows)), (name, a)
        torch.testing.assert_close(torch.nan_to_num(lse, neginf=0.0),
                                   torch.nan_to_num(rows, neginf=0.0), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out, want[:, :, a:a + n].float(), atol=1e-5, rtol=1e-5)


def test_alibi_on_a_far_part_is_exact_in_fp32():
    """ALiBi on a part far from its keys' frame: the part's own ``t - P`` is ~1800, the
    whole's ``j - p`` within the window; the offset is added as an integer, so the
    part's output equals the whole's rows at fp32 precision (a bias of hundreds added
    and taken off again in floats would not)."""
    length, window = 4096, 256
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, length, 16, generator=g) for _ in range(3))
    pattern = sf.sliding_window(window) & sf.alibi(sf.alibi_slopes(4))
    a, c = 2048, 2048 - window  # the run's queries against the keys just before them
    part = part_pattern(self_attention_pattern(pattern), a, c, 2048, window, length)
    assert "offset=" in repr(part)
    out, lse = sf.attention(q[:, :, a:], k[:, :, c:a], v[:, :, c:a], part, return_lse=True)
    rows = slice(a, a + 64)  # the first rows see only keys before the run
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[rows, c:a] = True
    want, want_lse = sf.reference_attention(q, k, v, sf.mask_table(mask) & pattern,
                                            return_lse=True)
    torch.testing.assert_close(lse[:, :, :64], want_lse[:, :, rows].float(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, :, :64], want[:, :, rows].float(), atol=2e-6, rtol=1e-6)


def test_a_moved_rel_bias_table_passes_its_gradient_back():
    g = torch.Generator().manual_seed(8)
    table = torch.randn(4, 9, generator=g, requires_grad=True)
    q, k, v = (torch.randn(1, 4, L, 8, generator=g) for _ in range(3))
    pattern = sf.sliding_window(11) & sf.rel_bias(table)
    part = part_pattern(self_attention_pattern(pattern), 50, 40, 30, 40, L)
    sf.attention(q[:, :, 50:80], k[:, :, 40:80], v[:, :, 40:80], part).sum().backward()
    got = table.grad.clone()
    table.grad = None
    whole = sf.reference_attention(q.double(), k.double(), v.double(), pattern)
    whole[:, :, 50:80].sum().backward()  # rows 50..79 see keys 40..79 only
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, table.grad.float(), atol=1e-4, rtol=1e-4)


def test_patterns_with_no_form_on_a_part():
    """A token-offset table moved 200k positions over a 70k-token part would need more
    entries than the kernels take: the caller evaluates it on original positions."""
    pattern = sf.causal() & sf.rel_bias(torch.randn(4, 9))
    canonical = self_attention_pattern(pattern)
    assert part_pattern(canonical, 200_000, 0, 70_000, 70_000, 300_000) is None
    assert part_pattern(canonical, 200_000, 190_000, 70_000, 70_000, 300_000) is not None


def test_window_table_on_a_part_in_the_kernels():
    """A window-offset table on a grid part, in Triton's interpreter (the kernels read it
    at the part's positions moved onto the grid), against the oracle on the part."""
    canonical = self_attention_pattern(modified_patterns()["neighborhood_window_table"])
    g = torch.Generator().manual_seed(4)
    for a, c, n, m in ((40, 17, 21, 30), (24, 48, 33, 9)):
        part = part_pattern(canonical, a, c, n, m, L)
        q = torch.randn(1, 4, n, 16, generator=g)
        k, v = (torch.randn(1, 4, m, 16, generator=g) for _ in range(2))
        out, lse = sf.attention(q, k, v, part, return_lse=True, backend="triton")
        want, want_lse = sf.reference_attention(q, k, v, part, return_lse=True)
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), (a, c)
        torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)


def routed_patterns():
    """Routing across ranks: buckets of 12 and 10 keys (and uneven chunks) that the
    parts cut off their grid."""
    return {
        "topk_or_window": (sf.causal() & sf.topk_blocks(12, 2)) | sf.sliding_window(6),
        "topk_max_group": sf.topk_blocks(10, 3, query_block=7, pool="max", share="group")
                          & sf.causal(),
        "chunks_or_sinks": sf.topk_chunks(torch.tensor([0, 30, 41, 77, L]), 2) | sf.sinks(2),
        "coverage": sf.threshold_blocks(9, 0.6) & sf.causal(),
    }


@pytest.mark.parametrize("name,backend", [
    *((name, "torch") for name in routed_patterns()),
    ("topk_or_window", "triton"), ("chunks_or_sinks", "triton")])  # (the interpreter is slow)
def test_routed_parts_with_the_whole_selection_equal_the_whole(name, backend):
    """The whole sequence routed once; each part attended with that selection cut to it
    (``part_selection``: the routed kernels in Triton's interpreter, or the torch routed
    path) and merged: the whole sequence's oracle rows, output and lse, and the gradient
    of q, k and v."""
    pattern = routed_patterns()[name]
    canonical = self_attention_pattern(pattern)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, L, 12, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    if backend == "triton":  # one batch row: the interpreter runs every program in turn
        q, k, v = q[:1], k[:1], v[:1]
    scale = 12 ** -0.5
    selection, = route(canonical, q, k, scale).values()
    want, want_lse = sf.reference_attention(q, k, v, pattern, enable_gqa=True, return_lse=True)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))

    def attend(a, n, c, end):
        return attention_with_selection(qf[:, :, a:a + n], kf[:, :, c:end], vf[:, :, c:end],
                                        part_pattern(canonical, a, c, n, end - c, L),
                                        part_selection(selection, a, c, n, end - c),
                                        scale=scale, enable_gqa=True, backend=backend,
                                        origin=(a, c, L))

    _merged_parts_equal_the_rows(attend, RUNS if backend == "torch" else RUNS[:1], want,
                                 want_lse, name)
    # gradients: every row's parts against the whole's
    g_out = torch.randn(want.shape, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.autograd.backward(sf.reference_attention(*leaves, pattern, enable_gqa=True), g_out)
    outs = []
    for a, n in ((0, 50), (50, L - 50)):
        parts = [attend(a, n, c, end) for c, end in ((0, 45), (45, L))]
        outs.append(sf.merge([o for o, _ in parts], [s for _, s in parts])[0])
    torch.autograd.backward(torch.cat(outs, 2), g_out.float())
    for got, leaf in zip((qf, kf, vf), leaves):
        torch.testing.assert_close(got.grad, leaf.grad.float(), atol=1e-4, rtol=1e-4)


def test_parts_of_a_trained_table_are_built_each_step():
    """A ``rel_bias`` table that is trained: each step's parts gather from it anew (kept
    parts would hold the first step's graph), and its gradient arrives every step."""
    cp = importlib.import_module("sparseforge.distributed.attention")
    table = torch.randn(4, 9, requires_grad=True)
    pattern = sf.sliding_window(11) & sf.rel_bias(table)
    layout = sfd.plan_shards(pattern, L, 2, block=8)
    canonical = self_attention_pattern(pattern)
    rows = layout.positions(1)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, L, 8, generator=g)[:, :, rows] for _ in range(3))
    blocks = layout.blocks_of(1)
    for _ in range(2):
        table.grad = None
        out, _ = cp.attend_parts(q, k, v, cp.part_calls(canonical, layout, blocks, blocks),
                                 0.3, False)
        out.sum().backward()
        assert table.grad is not None and table.grad.abs().sum() > 0


def test_attention_with_selection_refuses_what_it_cannot_attend():
    """A rule whose decision is not a block selection, or no selection at all: a
    ValueError naming what it takes, not a kernel error."""
    q = k = v = torch.randn(1, 2, 32, 8)
    pattern = sf.causal() & sf.topk_blocks(8, 2)
    selection, = route(self_attention_pattern(pattern), q, k, 8 ** -0.5).values()
    for bad_pattern, bad_selection in ((sf.causal() & sf.vertical_slash(2, 2), selection),
                                       (sf.causal(), selection), (pattern, "selection")):
        with pytest.raises(ValueError, match="BlockSelection"):
            attention_with_selection(q, k, v, bad_pattern, bad_selection)
    out = attention_with_selection(q, k, v, pattern, selection)[0]
    torch.testing.assert_close(out, sf.attention(q, k, v, pattern), atol=1e-5, rtol=1e-5)
