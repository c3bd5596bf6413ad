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
)


def static_patterns(max_leaves: int = 4):
    return st.recursive(
        primitives,
        lambda inner: st.one_of(
            st.builds(lambda a, b: a | b, inner, inner),
            st.builds(lambda a, b: a & b, inner, inner),
        ),
        max_leaves=max_leaves,
    )
