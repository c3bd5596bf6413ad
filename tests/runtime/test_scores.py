"""Score modifiers softcap / alibi / rel_bias: the oracle against a literal formula, then
forward, backward (q, k, v and the rel_bias table) and decode of both backends against
autograd through the fp64 oracle; bitwise-repeatable table gradients."""

import math

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.canonicalize import canonicalize
from tests.helpers import random_qkv

BACKENDS = ["torch", "triton"]
HQ, HKV = 4, 2
SLOPES = sf.alibi_slopes(HQ)


def _table(width=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(HQ, width, generator=g) * 0.7).requires_grad_()


# ------------------------------------------------------------------ IR and the oracle


def test_constructors_validate_their_arguments():
    with pytest.raises(ValueError, match="softcap"):
        sf.softcap(0.0)
    with pytest.raises(TypeError, match="softcap"):
        sf.softcap("30")
    with pytest.raises(TypeError, match="alibi"):
        sf.alibi([0.5, 0.25])
    with pytest.raises(TypeError, match="floating-point"):
        sf.alibi(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="slopes are fixed"):
        sf.alibi(torch.ones(4, requires_grad=True))
    with pytest.raises(ValueError, match="odd number"):
        sf.rel_bias(torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"\[Hq, 2R \+ 1\]"):
        sf.rel_bias(torch.zeros(7))


def test_modifiers_join_by_and_only_once_each():
    with pytest.raises(TypeError, match="score modifier inside '\\|'"):
        sf.causal() | (sf.sinks(4) & sf.softcap(5.0))
    with pytest.raises(ValueError, match="at most one softcap"):
        canonicalize(sf.causal() & sf.softcap(5.0) & sf.softcap(6.0))
    c = canonicalize(sf.softcap(5.0) & (sf.causal() & sf.window(8, 8)) & sf.alibi(SLOPES))
    assert repr(c) == "(alibi(<slopes 4>) & softcap(5.0) & window(left=8, right=0))"
    assert repr(canonicalize(sf.full() & sf.softcap(2.0))) == "softcap(2.0)"


def test_modifiers_do_not_change_the_mask():
    pat = sf.sliding_window(5) | sf.sinks(2)
    scored = pat & sf.softcap(3.0) & sf.rel_bias(_table()) & sf.alibi(SLOPES)
    assert torch.equal(sf.dense_mask(scored, 9, 14), sf.dense_mask(pat, 9, 14))


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(sf.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # not a power of two: the 4-head sequence, then every other slope of the 8-head one
    six = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert torch.allclose(sf.alibi_slopes(6), torch.tensor(six))


def test_oracle_applies_modifiers_literally():
    q, k, v = random_qkv(1, HQ, HKV, 9, 12, 8, seed=3)
    table = _table().detach()
    pat = sf.causal() & sf.softcap(2.0) & sf.alibi(SLOPES) & sf.rel_bias(table)
    out = sf.reference_attention(q.double(), k.double(), v.double(), pat, enable_gqa=True)
    kk, vv = (t.double().repeat_interleave(2, 1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(8)
    i, j = torch.arange(9)[:, None], torch.arange(12)[None]
    off = j - (i + 3)
    for h in range(HQ):
        s[:, h] += SLOPES[h].double() * off + table[h].double()[off.clamp(-3, 3) + 3]
    s = 2.0 * torch.tanh(s / 2.0)
    s = s.masked_fill(off > 0, float("-inf"))
    assert torch.allclose(out, torch.softmax(s, -1) @ vv, atol=1e-12)


def test_wrong_head_count_is_a_clear_error():
    q, k, v = random_qkv(1, HQ, HKV, 8, 8, 16)
    with pytest.raises(ValueError, match="slopes has 3 rows, expected one per query head"):
        sf.attention(q, k, v, sf.causal() & sf.alibi(torch.ones(3)), enable_gqa=True)


# ------------------------------------------------------------ kernels against the oracle


def _patterns():
    table = _table()
    return table, {
        "softcap": sf.causal() & sf.softcap(1.5),
        "alibi": sf.causal() & sf.alibi(SLOPES),
        "rel_bias": sf.window(6, 4) & sf.rel_bias(table),
        "all_sinks": (sf.sliding_window(8) | sf.sinks(3)) & sf.rel_bias(table) & sf.softcap(3.0)
        & sf.alibi(SLOPES),
        "per_head": sf.per_head([sf.causal() & sf.rel_bias(table), sf.causal() & sf.softcap(1.0),
                                 sf.window(3, 3) & sf.rel_bias(table), sf.chunks(7)]),
    }


def _check_grads(q, k, v, pattern, table, backend, tol=2e-4, **plan_kw):
    """out, lse and the gradients of q, k, v and the table against fp64 autograd."""
    gqa = q.shape[1] != k.shape[1]
    g = torch.Generator().manual_seed(5)
    results = []
    for run in ("sf", "ref"):
        dt = torch.float64 if run == "ref" else q.dtype
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in (q, k, v)]
        table.grad = None
        if run == "ref":
            out, lse = sf.reference_attention(*leaves, pattern, enable_gqa=gqa, return_lse=True)
        else:
            out, lse = sf.attention(*leaves, pattern, enable_gqa=gqa, return_lse=True,
                                    backend=backend)
            go = torch.randn(out.shape, generator=g)
            gl = torch.randn(lse.shape, generator=g)
        fin = torch.isfinite(lse)
        torch.autograd.backward([out, torch.where(fin, lse, 0)],
                                [go.to(out.dtype), torch.where(fin, gl, 0).to(lse.dtype)])
        results.append([out.detach(), *(t.grad for t in leaves),
                        None if table.grad is None else table.grad.clone()])
    for name, a, r in zip(["out", "dq", "dk", "dv", "dtable"], *results):
        if r is None:
            assert a is None, f"{name}: a gradient where the oracle has none"
            continue
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = (a.double() - r.double()).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{pattern!r}: {name} error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_patterns()[1]))
def test_forward_and_gradients(name, backend):
    table, patterns = _patterns()
    _check_grads(*random_qkv(2, HQ, HKV, 37, 53, 24, seed=1), patterns[name], table, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dilated_window_rel_bias_and_empty_rows(backend):
    # Lq > Lkv with a causal window: the first rows see nothing (0 output, no gradient);
    # the dilated window runs as strided dilation groups, whose offsets step by 3
    table = _table(9, seed=2)
    pat = sf.window(5, 2, dilation=3) & sf.causal() & sf.rel_bias(table) & sf.softcap(2.5)
    _check_grads(*random_qkv(1, HQ, HKV, 50, 41, 16, seed=4), pat, table, backend)


def test_wide_table_clips_beyond_the_tiles():
    # R = 30: a table entry's diagonals span several tiles, the far offsets still clip;
    # R = 1: almost every offset is clipped into the first or last entry
    for width in (61, 3):
        table = _table(width, seed=width)
        _check_grads(*random_qkv(1, HQ, HKV, 45, 45, 16, seed=6), sf.full() & sf.rel_bias(table),
                     table, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_wider_than_the_register_accumulators(backend):
    # radius 1024 (2R + 1 = 2049 > 1025): the dK/dV kernel sums the gradient in its buffer
    # row. Keys more than R behind a query (Lkv = 1100) clip into the first entry; a
    # dilated window strides the offsets by 2
    table = _table(2049, seed=12)
    _check_grads(*random_qkv(1, HQ, HKV, 20, 1100, 16, seed=13), sf.causal() & sf.rel_bias(table),
                 table, backend)
    dilated = sf.window(20, 20, dilation=2) & sf.rel_bias(table) & sf.softcap(3.0)
    _check_grads(*random_qkv(1, HQ, HKV, 60, 60, 16, seed=14), dilated, table, backend)


def test_table_wider_than_the_limit_is_refused():
    with pytest.raises(ValueError, match=r"2R \+ 1 in \[1, 131073\]"):
        sf.rel_bias(torch.zeros(4, 2 ** 17 + 3))


def test_bf16_forward_with_modifiers():
    _, patterns = _patterns()
    q, k, v = random_qkv(1, HQ, HKV, 40, 40, 32, seed=8)
    pat = patterns["all_sinks"]
    out = sf.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pat, enable_gqa=True,
                       backend="triton")
    ref = sf.reference_attention(q.double(), k.double(), v.double(), pat, enable_gqa=True)
    assert (out.double() - ref).abs().max().item() < 3e-2


def test_table_gradient_is_bitwise_repeatable():
    table = _table(11, seed=9)
    pat = sf.sliding_window(12) & sf.rel_bias(table) & sf.softcap(2.0)
    q, k, v = (t.requires_grad_() for t in random_qkv(2, HQ, HKV, 40, 40, 16, seed=10))
    grads = []
    for _ in range(2):
        for t in (q, k, v, table):
            t.grad = None
        sf.attention(q, k, v, pat, enable_gqa=True, backend="triton").square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v, table)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("q_len", [1, 4, 16])
def test_decode_with_modifiers(q_len, launched_kinds):
    _, patterns = _patterns()
    for name in ("alibi", "all_sinks", "per_head"):
        q, k, v = random_qkv(2, HQ, HKV, q_len, 301, 24, seed=q_len)
        out = sf.attention(q, k, v, patterns[name], enable_gqa=True, backend="triton")
        ref = sf.reference_attention(q, k, v, patterns[name], enable_gqa=True)
        assert (out - ref).abs().max().item() < 1e-5, name
    assert set(launched_kinds) == {"decode"}


def test_softcap_under_torch_compile():
    q, k, v = random_qkv(1, HQ, HKV, 24, 24, 16, seed=11)
    pat = sf.causal() & sf.softcap(4.0)

    def f(q, k, v):
        return sf.attention(q, k, v, pat, enable_gqa=True).sin()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    sf.reference_attention(*ref_leaves, pat, enable_gqa=True).sin().sum().backward()
    for a, r in zip(leaves, ref_leaves):
        assert (a.grad.double() - r.grad).abs().max().item() < 1e-4
