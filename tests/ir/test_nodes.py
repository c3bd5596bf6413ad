import pytest
import torch

import sparseforge as sf
from sparseforge.ir.nodes import Union, Window


@pytest.mark.parametrize("build, error, message", [
    (lambda: sf.window(-3, 0), ValueError, "window(left=-3): left must be >= 0"),
    (lambda: sf.window(3, -1), ValueError, "window(right=-1): right must be >= 0"),
    (lambda: sf.window(3, 0, dilation=0), ValueError, "dilation must be >= 1"),
    (lambda: sf.window(2.5, 0), TypeError, "left must be an int"),
    (lambda: sf.window(True, 0), TypeError, "left must be an int"),
    (lambda: sf.sliding_window(0), ValueError, "sliding_window(size=0)"),
    (lambda: sf.sinks(-1), ValueError, "sinks(n=-1)"),
    (lambda: sf.global_queries(-2), ValueError, "global_queries(n=-2)"),
    (lambda: sf.chunks(0), ValueError, "chunks(size=0)"),
    (lambda: sf.prefix_lm(-1), ValueError, "prefix_lm(n=-1)"),
    (lambda: sf.documents([0, 0, 1]), TypeError, "documents(ids=...)"),
    (lambda: sf.documents(torch.zeros(4)), TypeError, "integer dtype"),
    (lambda: sf.documents(torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "shape"),
    (lambda: sf.causal() | 3, TypeError, "sparseforge patterns"),
    (lambda: sf.per_head([]), ValueError, "at least one"),
    (lambda: sf.per_head([sf.causal(), "x"]), TypeError, "every entry"),
    (lambda: sf.per_head([sf.per_head([sf.causal()])]), ValueError, "nested"),
    (lambda: sf.per_head([sf.causal()]) | sf.causal(), TypeError, "inside per_head"),
])
def test_bad_construction_raises_clear_errors(build, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build()


def test_repr_is_the_building_expression():
    p = (sf.sliding_window(128) | sf.sinks(4)) & sf.causal()
    assert repr(p) == "((window(left=127, right=0) | sinks(4)) & causal())"
    assert eval(repr(p), {**vars(sf), "window": sf.window}) == p


def test_nodes_are_frozen_and_hashable():
    w = Window(3, 1)
    with pytest.raises(AttributeError):
        w.left = 5
    assert {w, Window(3, 1)} == {w}
    assert isinstance(sf.causal() | w, Union)


def test_prefix_lm_is_causal_or_sinks():
    assert sf.prefix_lm(8) == sf.causal() | sf.sinks(8)
