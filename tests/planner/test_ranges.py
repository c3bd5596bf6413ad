"""Closed-form tile bounds agree with brute force over dense_mask."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from sparseforge.ir.neighborhood import NeighborhoodPart
from sparseforge.planner.ranges import hull_segment, tile_segments
from sparseforge.planner.schedule import visit_matrices
from tests.strategies import neighbourhoods, static_patterns


def brute_force_tiles(mask: np.ndarray, bm: int, bn: int, side: str = "query"):
    """Tiles holding an allowed pair, and tiles that are full: every pair allowed and, on
    the query side, every column < Lkv (on the key side, every row < Lq: keys past Lkv
    are never stored, rows past Lq would add to dK/dV). Key side: [Tk, Tq]."""
    lq, lkv = mask.shape
    tq, tk = -(-lq // bm), -(-lkv // bn)
    has = np.zeros((tq, tk), bool)
    every = np.zeros((tq, tk), bool)
    for m in range(tq):
        for n in range(tk):
            block = mask[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
            has[m, n] = block.any()
            inside = (n + 1) * bn <= lkv if side == "query" else (m + 1) * bm <= lq
            every[m, n] = block.all() and inside
    return (has, every) if side == "query" else (has.T, every.T)


def check_segments(pattern, lq, lkv, bm, bn, hull=False, side="query"):
    canonical = canonicalize(pattern)
    segs = tile_segments(canonical, side)
    if hull:
        segs = [hull_segment(segs)]
    visit, full = visit_matrices(segs, lq, lkv, bm, bn, side)
    mask = sf.dense_mask(canonical, lq, lkv).numpy()
    has, every = brute_force_tiles(mask, bm, bn, side)
    missed = has & ~visit
    assert not missed.any(), f"{pattern}: tiles with allowed pairs skipped at {np.argwhere(missed)[:5]}"
    wrong_full = full & ~every
    assert not wrong_full.any(), f"{pattern}: tiles called full are not: {np.argwhere(wrong_full)[:5]}"
    return visit, full, has, every


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=static_patterns(), lq=st.integers(1, 150), lkv=st.integers(1, 150),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64]), hull=st.booleans())
def test_closed_forms_match_brute_force(pattern, lq, lkv, bm, bn, hull):
    check_segments(pattern, lq, lkv, bm, bn, hull)


@pytest.mark.parametrize("pattern", [sf.causal(), sf.sliding_window(40), sf.window(20, 5),
                                     sf.chunks(32), sf.sinks(16), sf.full()])
def test_bounds_are_tight_for_primitives(pattern):
    """For single primitives the visit set is exactly the tiles holding an allowed pair and
    the full set is exactly the fully allowed tiles (tile-aligned sizes)."""
    visit, full, has, every = check_segments(pattern, 256, 256, 32, 32)
    assert (visit == has).all()
    assert (full == every).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=static_patterns(), lq=st.integers(1, 150), lkv=st.integers(1, 150),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64]), hull=st.booleans())
def test_key_side_closed_forms_match_brute_force(pattern, lq, lkv, bm, bn, hull):
    check_segments(pattern, lq, lkv, bm, bn, hull, side="key")


@pytest.mark.parametrize("pattern", [sf.causal(), sf.sliding_window(40), sf.window(20, 5),
                                     sf.chunks(32), sf.sinks(16), sf.full(), sf.global_queries(40)])
@pytest.mark.parametrize("lq,lkv", [(256, 256), (128, 256), (256, 128)])
def test_key_side_bounds_are_tight_for_primitives(pattern, lq, lkv):
    """The inverted bounds visit exactly the query tiles with an allowed pair, and call
    full exactly the fully allowed ones: dK/dV does no wasted tile."""
    visit, full, has, every = check_segments(pattern, lq, lkv, 32, 32, side="key")
    assert (visit == has).all()
    assert (full == every).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=neighbourhoods(), extra_q=st.integers(-20, 20), extra_kv=st.integers(0, 20),
       bm=st.sampled_from([16, 32]), bn=st.sampled_from([16, 32]),
       side=st.sampled_from(["query", "key"]))
def test_neighbourhood_bounds_in_original_order(pattern, extra_q, extra_kv, bm, bn, side):
    """Original token order (decode, Lq != Lkv, layouts turned off): rows of dimension 0
    per dilation group, from both sides, with tokens past the grid and Lq != Lkv."""
    lkv = pattern.size + extra_kv
    check_segments(pattern, max(1, lkv + extra_q), lkv, bm, bn, side=side)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=neighbourhoods(), data=st.data(), bm=st.sampled_from([16, 32]),
       bn=st.sampled_from([16, 32]), side=st.sampled_from(["query", "key"]))
def test_neighbourhood_part_bounds(pattern, data, bm, bn, side):
    """A part of a grid (context parallelism: queries and keys offset into it, the
    windows clamped at the whole grid's borders): the grid's bounds, moved."""
    size = pattern.size
    lq, lkv = data.draw(st.integers(1, size)), data.draw(st.integers(1, size))
    q_offset = data.draw(st.integers(-lkv, size)) + lq - lkv  # any query run, aligned
    kv_offset = data.draw(st.integers(0, size - 1))
    check_segments(NeighborhoodPart(pattern, q_offset, kv_offset), lq, lkv, bm, bn, side=side)


def test_neighbourhood_decode_visits_only_the_window_rows():
    """One new token of a 64x64 grid (the last): its 7x7 window spans 7 rows of 64 keys,
    so 7 kv tiles of 64, where a band of (2k + s) rows each side visited 16."""
    pattern = sf.neighborhood((64, 64), 7)
    visit, _, has, _ = check_segments(pattern, 1, 4096, 16, 64)
    assert visit.sum() == has.sum() == 7
