import ast

import jinja2
import pytest
import torch

import sparseforge as sf
from sparseforge.codegen.predicate import triton_predicate
from sparseforge.codegen.render import render_kernel
from sparseforge.codegen.templates import environment


def _plan(pattern, **kw):
    return sf.plan(pattern, q_len=1000, kv_len=1200, head_dim=64, target="sm_90", **kw)


def test_same_plan_renders_byte_identical_source():
    a = render_kernel(_plan(sf.sliding_window(128) | sf.sinks(4)))
    b = render_kernel(_plan(sf.sinks(4) | sf.sliding_window(128)))  # same canonical pattern
    assert a.source == b.source and a.sha256 == b.sha256
    assert a.sha256 != render_kernel(_plan(sf.sliding_window(129) | sf.sinks(4))).sha256


def test_kernel_name_is_readable():
    p = _plan(sf.sliding_window(256))
    src = render_kernel(p)
    assert src.name == f"fwd_window_l255_r0_bm{p.block_m}_bn{p.block_n}_d64_bf16"
    assert src.module_stem.startswith(src.name + "_")


def test_rendered_source_is_valid_python_with_arithmetic_bounds():
    pattern = sf.sliding_window(100) | sf.sinks(8) | sf.global_queries(4)
    src = render_kernel(_plan(pattern)).source
    ast.parse(src)
    assert "_floordiv((-99 + p_first)" in src  # the window's lower bound, printed from sympy
    assert "tl.load(" in src and "Index" not in src  # static: no index tensor is read


def test_full_tiles_carry_no_predicate():
    src = render_kernel(_plan(sf.causal())).source
    body = src[src.index("def _attend_tile"):src.index("@triton.jit\ndef fwd_")]
    start = body.index("if IS_FULL:\n        # every pair")
    full_branch = body[start:body.index("    else:\n        in_kv = offs_n < kv_len\n        allowed")]
    assert "_allowed" not in full_branch and "tl.where" not in full_branch


def test_templates_are_strict():
    with pytest.raises(jinja2.UndefinedError):
        environment().get_template("forward.py.jinja").render(name="x")


def test_predicate_printer_uses_only_validated_integers():
    docs = sf.documents(torch.zeros(3, dtype=torch.long))
    p = triton_predicate(sf.window(3, 2, dilation=2) | sf.chunks(7) | docs)
    for piece in ("((j - p) % 2 == 0) & (j >= p - 6) & (j <= p + 4)",
                  "_floordiv(p, 7) == _floordiv(j, 7)", "doc_q0 == doc_k0"):
        assert piece in p


@pytest.mark.parametrize("bad", ['x"); import os #', "a\nb", "\\", 1.5, None, object()])
def test_only_checked_values_reach_the_template(bad):
    from sparseforge.codegen.templates import UnsafeTemplateValue, check_context

    with pytest.raises(UnsafeTemplateValue):
        check_context({"segments": [{"lo": bad}]})
    check_context({"segments": [{"lo": "tl.maximum(p_first - 3, 0) // BLOCK_N"}], "n": 3, "f": True})


def test_no_generated_kernel_uses_atomics():
    """Deterministic, bitwise-repeatable results rest on every output being written by
    exactly one program: no rendered kernel (the whole compiled variant set, every kind,
    and every routing pre-kernel family) may use an atomic operation."""
    from sparseforge.codegen.prekernels import (
        render_clusters,
        render_hip,
        render_lines,
        render_routing,
    )
    from sparseforge.runtime.variants import variant_kinds, variant_plan, variant_specs

    sources = []
    for name in variant_specs():
        p = variant_plan(name, "sm_90")
        sources += [render_kernel(p, i, kind).source for kind in variant_kinds(name)
                    for i in range(len(p.kernels))]
    sources += [render_routing(n).source for n in (
        sf.topk_blocks(64, 3), sf.threshold_blocks(64, 0.9),
        sf.topk_chunks(torch.tensor([0, 10, 64]), 2, share="all"))]
    sources += [render_hip(sf.hierarchical(4, 32)).source, render_clusters().source,
                render_lines(sf.vertical_slash(4, 4), "(j <= p)").source]
    for source in sources:
        code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
        assert "atomic" not in code
    assert len(sources) > 100
