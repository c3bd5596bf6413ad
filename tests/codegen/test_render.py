import ast

import jinja2
import pytest
import torch

import sparseforge as sf
from sparseforge.codegen.predicate import triton_predicate
from sparseforge.codegen.render import _environment, render_forward


def _plan(pattern, **kw):
    return sf.plan(pattern, q_len=1000, kv_len=1200, head_dim=64, target="sm_90", **kw)


def test_same_plan_renders_byte_identical_source():
    a = render_forward(_plan(sf.sliding_window(128) | sf.sinks(4)))
    b = render_forward(_plan(sf.sinks(4) | sf.sliding_window(128)))  # same canonical pattern
    assert a.source == b.source and a.sha256 == b.sha256
    assert a.sha256 != render_forward(_plan(sf.sliding_window(129) | sf.sinks(4))).sha256


def test_kernel_name_is_readable():
    src = render_forward(_plan(sf.sliding_window(256)))
    assert src.name == "fwd_window_l255_r0_bm%d_bn%d_d64_bf16" % (
        _plan(sf.sliding_window(256)).block_m, _plan(sf.sliding_window(256)).block_n)
    assert src.module_stem.startswith(src.name + "_")


def test_rendered_source_is_valid_python_with_arithmetic_bounds():
    src = render_forward(_plan(sf.sliding_window(100) | sf.sinks(8) | sf.global_queries(4))).source
    ast.parse(src)
    assert "_floordiv((-99 + p_first)" in src  # the window's lower bound, printed from sympy
    assert "tl.load(" in src and "Index" not in src  # static: no index tensor is read


def test_full_tiles_carry_no_predicate():
    src = render_forward(_plan(sf.causal())).source
    body = src[src.index("def _attend_tile"):src.index("@triton.jit\ndef fwd_")]
    full_branch = body[body.index("if IS_FULL:\n        # every pair"):body.index("    else:\n        allowed")]
    assert "_allowed" not in full_branch and "tl.where" not in full_branch


def test_templates_are_strict():
    with pytest.raises(jinja2.UndefinedError):
        _environment().get_template("forward.py.jinja").render(name="x")


def test_predicate_printer_uses_only_validated_integers():
    p = triton_predicate(sf.window(3, 2, dilation=2) | sf.chunks(7) | sf.documents(torch.zeros(3, dtype=torch.long)))
    assert p == ("(doc_q == doc_k) | (_floordiv(p, 7) == _floordiv(j, 7)) | "
                 "(((j - p) % 2 == 0) & (j >= p - 6) & (j <= p + 4))") or "doc_q == doc_k" in p
