"""The FlexAttention BlockMask counts that ``plan.explain()`` compares against: a lone
neighbourhood's are listed from its allowed pairs (linear in the sequence), and must
equal the dense count exactly."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.planner.flex_blocks import _dense_blocks, _neighborhood_blocks, flex_blocks
from tests.strategies import neighbourhoods


@st.composite
def neighbourhood_problems(draw):
    pattern = draw(neighbourhoods(min_extent=3))
    size = pattern.size
    q_len = draw(st.sampled_from([size, size + 5, max(1, size - 7)]))
    kv_len = draw(st.sampled_from([size, size + 9]))
    return pattern, q_len, kv_len, draw(st.sampled_from([8, 16, 128]))


@settings(max_examples=60, deadline=None)
@given(neighbourhood_problems())
def test_listed_pairs_count_like_the_dense_mask(problem):
    """Odd and even kernels, dilation, stride, causal axes, tail tokens past the grid,
    Lq != Lkv and blocks that do not divide the lengths."""
    pattern, q_len, kv_len, block = problem
    assert _neighborhood_blocks(pattern, q_len, kv_len, block) == _dense_blocks(
        pattern, q_len, kv_len, block)


def test_video_grid_is_counted_without_the_dense_mask():
    """3x7x7 on 16x64x64 (65536 tokens, 4.3e9 pairs): every query keeps 147 keys."""
    counts = flex_blocks(sf.neighborhood((16, 64, 64), (3, 7, 7)), 65536, 65536)
    assert counts.useful_pairs == 65536 * 147
    assert counts.visited * 128 * 128 >= counts.useful_pairs and counts.full == 0


@pytest.mark.parametrize("length", [3136])
def test_neighbourhood_beside_another_primitive_stays_dense(length):
    pattern = sf.neighborhood((56, 56), 7) | sf.sinks(2)
    dense = flex_blocks(pattern, length, length)
    assert dense.useful_pairs > flex_blocks(sf.neighborhood((56, 56), 7), length, length).useful_pairs
