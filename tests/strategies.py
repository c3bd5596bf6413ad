"""Hypothesis strategies for random pattern expressions."""

from hypothesis import strategies as st

import sparseforge as sf

primitives = st.one_of(
    st.just(sf.full()),
    st.just(sf.causal()),
    st.builds(sf.window, st.integers(0, 40), st.integers(0, 40), st.integers(1, 4)),
    st.builds(sf.sliding_window, st.integers(1, 64)),
    st.builds(sf.sinks, st.integers(0, 40)),
    st.builds(sf.global_queries, st.integers(0, 40)),
    st.builds(sf.chunks, st.integers(1, 48)),
    st.builds(sf.prefix_lm, st.integers(0, 40)),
    st.builds(sf.affine, st.integers(-3, 3), st.integers(-3, 3), st.integers(-60, 60)),
)


def static_patterns(max_leaves: int = 4):
    return st.recursive(
        primitives,
        lambda inner: st.one_of(
            st.builds(lambda a, b: a | b, inner, inner),
            st.builds(lambda a, b: a & b, inner, inner),
            st.builds(sf.top_left, inner),
        ),
        max_leaves=max_leaves,
    )


@st.composite
def neighbourhoods(draw, min_extent: int = 2):
    """Random 1-3-D neighbourhoods: odd and even kernels, dilation, stride, causal axes."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(min_extent, 9)) for _ in range(ndim))
    kernel = tuple(draw(st.integers(1, n)) for n in shape)
    dilation = tuple(draw(st.integers(1, max(1, n // k))) for n, k in zip(shape, kernel))
    stride = tuple(draw(st.integers(1, k)) for k in kernel)
    causal = tuple(draw(st.booleans()) for _ in range(ndim))
    return sf.neighborhood(shape, kernel, dilation=dilation, stride=stride, causal=causal)
