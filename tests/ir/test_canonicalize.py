import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize, expression_dag, is_empty
from sparseforge.ir.nodes import Empty, Full, Window
from tests.strategies import static_patterns


def test_flatten_and_sort():
    a = (sf.sinks(4) | sf.causal()) | (sf.chunks(8) | sf.sinks(4))
    c = canonicalize(a)
    assert repr(c) == "(causal() | chunks(8) | sinks(4))"


def test_full_and_empty_absorb():
    assert canonicalize(sf.full() & sf.causal()) == sf.causal()
    assert canonicalize(sf.full() | sf.causal()) == Full()
    assert canonicalize(sf.sinks(0) | sf.causal()) == sf.causal()
    assert canonicalize(sf.sinks(0) & sf.causal()) == Empty()
    assert is_empty(sf.sinks(0) & sf.window(3, 3))
    assert is_empty(sf.per_head([sf.sinks(0), sf.sinks(0) & sf.causal()]))
    # queries with p = i + Lkv - Lq < 0 are global even for n == 0: not provably empty
    assert not is_empty(sf.global_queries(0))
    assert sf.dense_mask(sf.global_queries(0), 2, 1).any()
    assert not is_empty(sf.causal())


def test_windows_merge():
    assert canonicalize(sf.window(3, 1) | sf.window(1, 5)) == Window(3, 5)
    assert canonicalize(sf.window(3, 1) & sf.window(1, 5)) == Window(1, 1)
    assert canonicalize(sf.causal() & sf.window(7, 4)) == Window(7, 0)
    assert canonicalize(sf.causal() | sf.sliding_window(9)) == sf.causal()
    kept = canonicalize(sf.window(3, 1, 2) | sf.window(1, 5))
    assert repr(kept) == "(window(left=1, right=5) | window(left=3, right=1, dilation=2))"


def test_counts_and_chunks_merge():
    assert canonicalize(sf.sinks(4) | sf.sinks(9)) == sf.sinks(9)
    assert canonicalize(sf.sinks(4) & sf.sinks(9)) == sf.sinks(4)
    assert canonicalize(sf.chunks(4) & sf.chunks(16)) == sf.chunks(4)
    assert canonicalize(sf.chunks(4) | sf.chunks(16)) == sf.chunks(16)


def test_per_head_of_equal_patterns_collapses():
    assert canonicalize(sf.per_head([sf.causal(), sf.full() & sf.causal()])) == sf.causal()


def test_dag_shares_subexpressions():
    shared = sf.window(5, 5)
    dag = expression_dag((shared | sf.sinks(1)) & (shared | sf.causal()))
    assert sum(1 for n in dag.nodes if n == shared) == 1
    assert dag.in_degree(shared) == 2


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=static_patterns(), lq=st.integers(1, 48), lkv=st.integers(1, 48))
def test_canonicalisation_preserves_the_mask(pattern, lq, lkv):
    assert torch.equal(sf.dense_mask(pattern, lq, lkv), sf.dense_mask(canonicalize(pattern), lq, lkv))


def test_canonical_form_is_stable():
    p = (sf.sinks(4) | sf.window(3, 3)) & sf.causal()
    assert canonicalize(canonicalize(p)) == canonicalize(p)


def test_affine_and_top_left_reprs_parse_back():
    from sparseforge.ir.patterns_parse import parse_pattern

    for pattern in (sf.affine(2, -1, -3), sf.top_left(sf.causal() | sf.affine(0, 1, -5)),
                    sf.top_left(sf.window(3, 0) & sf.affine(1, 0, -8))):
        assert repr(parse_pattern(repr(pattern))) == repr(pattern)


def test_affine_canonical_forms():
    c = canonicalize
    assert repr(c(sf.affine(2, -2, 1))) == "causal()"  # 2p - 2j + 1 >= 0 <=> j <= p
    assert repr(c(sf.affine(0, -1, 9))) == "sinks(10)"
    assert repr(c(sf.affine(-1, 0, 4))) == "global_queries(5)"
    assert repr(c(sf.affine(0, 3, 0))) == "full()"
    assert repr(c(sf.affine(0, 0, -1))) == "empty()"
    assert repr(c(sf.causal() & sf.affine(-1, 1, 255))) == "window(left=255, right=0)"
    assert repr(c(sf.affine(1, -1, -3) & sf.affine(-1, 1, 1))) == "empty()"
    assert repr(c(sf.top_left(sf.sinks(4)))) == "sinks(4)"  # reads no query position
    assert repr(c(sf.top_left(sf.top_left(sf.causal())))) == "top_left(causal())"


def test_top_left_refuses_what_it_cannot_align():
    with pytest.raises(ValueError, match="kv_ids"):
        sf.top_left(sf.documents(torch.zeros(8, dtype=torch.long)))
    with pytest.raises(ValueError, match="static masks"):
        sf.top_left(sf.causal() & sf.softcap(5.0))
    with pytest.raises(ValueError, match="const"):
        sf.affine(1, -1, 1 << 30)
    with pytest.raises(TypeError, match="int"):
        sf.affine(1.5, -1)
