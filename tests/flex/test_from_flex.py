"""FlexAttention front end: mask_mods and score_mods read into patterns, checked against
the functions themselves on the grid, against the oracle, and against FlexAttention."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf
from tests.helpers import assert_matches_oracle, random_qkv

DOC = torch.tensor([0] * 30 + [1] * 45 + [2] * 25)
WINDOWS = torch.tensor([4, 9, 16, 33])
PAIR_BIAS = torch.randn(8, 8)
OTHER_PAIR_BIAS = torch.randn(8, 8)
BOOL_TABLE = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) > 0.5


def causal(b, h, q, kv):
    return q >= kv


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv < 20)


def prefix_lm(b, h, q, kv):
    return (kv <= 10) | (q >= kv)


def document_causal(b, h, q, kv):
    return (DOC[q] == DOC[kv]) & (q >= kv)


def chunked(b, h, q, kv):
    return q // 32 == kv // 32


def block_causal(b, h, q, kv):
    return q // 16 >= kv // 16


def dilated(b, h, q, kv):
    return ((q - kv) % 3 == 0) & ((q - kv).abs() <= 12)


def strict_causal(b, h, q, kv):
    return q > kv


def scaled_causal(b, h, q, kv):
    return kv <= 2 * q


def early_queries_see_all(b, h, q, kv):
    return torch.where(q < 8, kv >= 0, q >= kv)


def global_tokens(b, h, q, kv):
    return (q < 4) | (kv < 4) | (q == kv)


def per_head_windows(b, h, q, kv):
    return (q >= kv) & (q - kv < WINDOWS[h])


MASKS = {
    causal: "top_left(causal())",
    sliding: "top_left(window(left=19, right=0))",
    prefix_lm: "top_left((causal() | sinks(11)))",
    chunked: "top_left(chunks(32))",
    block_causal: "top_left((causal() | chunks(16)))",
    dilated: "top_left(window(left=4, right=4, dilation=3))",
    strict_causal: "top_left(affine(q=1, kv=-1, const=-1))",
    scaled_causal: "top_left(affine(q=2, kv=-1, const=0))",
    early_queries_see_all: "top_left(((affine(q=1, kv=0, const=-8) & causal()) | global_queries(8)))",
    global_tokens: "top_left((global_queries(4) | sinks(4) | window(left=0, right=0)))",
}
LENGTHS = [(100, 100), (37, 100), (100, 61), (1, 100), (5, 3)]


def on_grid(mask_mod, q_len, kv_len, h=0):
    q = torch.arange(q_len)[:, None]
    kv = torch.arange(kv_len)[None, :]
    return mask_mod(0, h, q, kv).expand(q_len, kv_len)


@pytest.mark.parametrize("mask_mod", list(MASKS), ids=lambda f: f.__name__)
def test_mask_mod_is_recognised(mask_mod):
    assert repr(sf.from_mask_mod(mask_mod)) == MASKS[mask_mod]


@pytest.mark.parametrize("mask_mod", list(MASKS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("q_len, kv_len", LENGTHS)
def test_pattern_equals_mask_mod_on_the_grid(mask_mod, q_len, kv_len):
    """Flex's q_idx is the row: the pattern is exact at every length, Lq != Lkv too."""
    got = sf.dense_mask(sf.from_mask_mod(mask_mod), q_len, kv_len).reshape(q_len, kv_len)
    assert torch.equal(got, on_grid(mask_mod, q_len, kv_len))


def test_documents_and_per_head():
    pattern = sf.from_mask_mod(document_causal)
    assert "documents" in repr(pattern) and "causal" in repr(pattern)
    assert torch.equal(sf.dense_mask(pattern, 100, 100).reshape(100, 100),
                       on_grid(document_causal, 100, 100))
    heads = sf.from_mask_mod(per_head_windows, heads=4)
    assert repr(heads).startswith("per_head([top_left(window(left=3, right=0))")
    mask = sf.dense_mask(heads, 50, 70)
    for h in range(4):
        assert torch.equal(mask[h], on_grid(per_head_windows, 50, 70, h))


def test_batched_document_ids():
    ids = torch.stack([DOC, DOC.flip(0)])

    def per_sequence(b, h, q, kv):
        return ids[b, q] == ids[b, kv]

    pattern = sf.from_mask_mod(per_sequence)
    mask = sf.dense_mask(pattern, 100, 100)
    for b in range(2):
        assert torch.equal(mask[b].reshape(100, 100), ids[b][:, None] == ids[b][None, :])


# ------------------------------------------------------------------ random mask_mods


@st.composite
def affine_atoms(draw):
    a, b = draw(st.integers(-3, 3)), draw(st.integers(-3, 3))
    c = draw(st.integers(-40, 40))
    op = draw(st.sampled_from(["ge", "gt", "le", "lt", "eq", "ne"]))
    return lambda q, kv: getattr(a * q + b * kv + c, op)(0)


@st.composite
def mask_mods(draw, depth=3):
    """Random trees of comparisons (affine, chunk, dilation, abs) under & | ~ where."""
    if depth == 0 or draw(st.booleans()):
        kind = draw(st.sampled_from(["affine", "chunks", "dilation", "abs"]))
        if kind == "affine":
            return draw(affine_atoms())
        if kind == "chunks":
            s = draw(st.integers(1, 40))
            return lambda q, kv: q // s == kv // s
        if kind == "dilation":
            d, w = draw(st.integers(2, 5)), draw(st.integers(0, 30))
            return lambda q, kv: ((kv - q) % d == 0) & (q - kv <= w) & (kv - q <= w)
        w = draw(st.integers(0, 30))
        return lambda q, kv: (q - kv).abs() <= w
    op = draw(st.sampled_from(["and", "or", "not", "where"]))
    left = draw(mask_mods(depth - 1))
    if op == "not":
        atom = draw(affine_atoms())  # a complement exists for half-planes only
        return lambda q, kv: ~atom(q, kv)
    right = draw(mask_mods(depth - 1))
    if op == "and":
        return lambda q, kv: left(q, kv) & right(q, kv)
    if op == "or":
        return lambda q, kv: left(q, kv) | right(q, kv)
    cond = draw(affine_atoms())
    return lambda q, kv: torch.where(cond(q, kv), left(q, kv), right(q, kv))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=mask_mods(depth=2), q_len=st.integers(1, 90), kv_len=st.integers(1, 90))
def test_random_mask_mods_are_exact(tree, q_len, kv_len):
    def mask_mod(b, h, q_idx, kv_idx):
        return tree(q_idx, kv_idx)

    pattern = sf.from_mask_mod(mask_mod)
    got = sf.dense_mask(pattern, q_len, kv_len).reshape(q_len, kv_len)
    assert torch.equal(got, on_grid(mask_mod, q_len, kv_len)), repr(pattern)


# ----------------------------------------------------------------------- errors


def test_control_flow_names_the_line():
    def branchy(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:  # the line the error must name
            return q_idx >= 0
        return kv_idx < 2

    with pytest.raises(ValueError, match=r"test_from_flex.py:\d+: if q_idx > kv_idx"):
        sf.from_mask_mod(branchy)


@pytest.mark.parametrize("mask_mod, words", [
    (lambda b, h, q, kv: ~BOOL_TABLE[q, kv], "mask_table"),
    (lambda b, h, q, kv: BOOL_TABLE[kv, q], "indexed \\[q_idx, kv_idx\\]"),
    (lambda b, h, q, kv: (q * kv) < 10, "product of positions"),
    (lambda b, h, q, kv: (q >= kv) & (b == 0), "depends on b"),
    (lambda b, h, q, kv: q % 4 == 0, "kv_idx - q_idx"),
    (lambda b, h, q, kv: torch.sin(q.float()) > 0, "sin has no closed form"),
    (lambda b, h, q, kv: q - kv < WINDOWS[h], "pass heads="),
])
def test_unsupported_constructs_are_named(mask_mod, words):
    with pytest.raises(ValueError, match=words):
        sf.from_mask_mod(mask_mod)


def test_bad_arguments():
    with pytest.raises(TypeError, match="mask_mod"):
        sf.from_mask_mod("causal")
    with pytest.raises(ValueError, match="heads"):
        sf.from_mask_mod(causal, heads=0)


def test_trace_is_cached_and_sees_rebound_closures():
    width = 5

    def window(b, h, q, kv):
        return (q >= kv) & (q - kv < width)

    first = sf.from_mask_mod(window)
    assert sf.from_mask_mod(window) is first
    width = 9  # noqa: F841 - read by the closure
    assert repr(sf.from_mask_mod(window)) == "top_left(window(left=8, right=0))"


# --------------------------------------------------------------------- score mods

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def alibi(score, b, h, q, kv):
    return score + SLOPES[h] * (kv - q)


def softcap(score, b, h, q, kv):
    return 20 * torch.tanh(score / 20)


def test_score_mods_are_recognised():
    assert "alibi" in repr(sf.from_score_mod(alibi))
    assert "softcap(20.0)" in repr(sf.from_score_mod(softcap))
    table = torch.randn(4, 17)

    def rel(score, b, h, q, kv):
        return score + table[h, torch.clamp(kv - q, -8, 8) + 8]

    assert "rel_bias(<table 4x17>)" in repr(sf.from_score_mod(rel))

    def capped_alibi(score, b, h, q, kv):
        return 30 * torch.tanh((score + SLOPES[h] * (kv - q)) / 30)

    found = repr(sf.from_score_mod(capped_alibi))
    assert "alibi" in found and "softcap(30.0)" in found


@pytest.mark.parametrize("score_mod, words", [
    (lambda s, b, h, q, kv: s * 0.5, "scale="),
    (lambda s, b, h, q, kv: s + PAIR_BIAS[kv, q], r"per-pair bias by \[\(b,\) \(h,\) q_idx"),
    (lambda s, b, h, q, kv: s + PAIR_BIAS[q, kv] + OTHER_PAIR_BIAS[q, kv], "one per-pair bias"),
    (lambda s, b, h, q, kv: s * s, "multiple of the score"),
])
def test_unsupported_score_mods_are_named(score_mod, words):
    with pytest.raises(ValueError, match=words):
        sf.from_score_mod(score_mod)


# ------------------------------------------------------------ against FlexAttention


def flex_reference(q, k, v, mask_mod=None, score_mod=None, **kw):
    from torch.nn.attention import flex_attention as flex

    block_mask = (None if mask_mod is None else
                  flex.create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2],
                                         device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, **kw)


@pytest.mark.parametrize("mask_mod, score_mod, q_len, kv_len", [
    (sliding, None, 70, 70),
    (sliding, alibi, 45, 70),
    (strict_causal, softcap, 70, 70),
    (prefix_lm, None, 33, 70),
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_flex_attention_matches_flex(mask_mod, score_mod, q_len, kv_len):
    """One import changed: the same outputs and lse as FlexAttention (GQA, Lq != Lkv),
    with both libraries' block masks."""
    q, k, v = random_qkv(2, 4, 2, q_len, kv_len, 24)
    want, want_lse = flex_reference(q, k, v, mask_mod, score_mod, enable_gqa=True,
                                    return_lse=True)
    block_mask = sf.create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu")
    out, lse = sf.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                 enable_gqa=True, return_lse=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)


def test_our_block_mask_equals_flex_and_runs_in_flex():
    from torch.nn.attention import flex_attention as flex

    for mask_mod in (sliding, causal, chunked, prefix_lm):
        for q_len, kv_len in ((300, 300), (130, 400)):
            ours = sf.create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu")
            theirs = flex.create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu")
            for field in ("kv_num_blocks", "full_kv_num_blocks"):
                assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    q, k, v = random_qkv(1, 2, 2, 130, 400, 16)
    ours = sf.create_block_mask(sliding, None, None, 130, 400, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex.flex_attention(q, k, v, block_mask=ours)
    torch.testing.assert_close(out, flex_reference(q, k, v, sliding), atol=1e-5, rtol=1e-5)


def test_untraceable_mask_runs_on_flex_with_a_warning():
    table = torch.rand(40, 40, generator=torch.Generator().manual_seed(1)) > 0.3

    def transposed(b, h, q, kv):  # a bool table read [kv, q]: no form here
        return table[kv, q] | (q == kv)

    q, k, v = random_qkv(1, 2, 2, 40, 40, 16)
    block_mask = sf.create_block_mask(transposed, None, None, 40, 40, device="cpu")
    with pytest.warns(UserWarning, match="running on FlexAttention"):
        out = sf.flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(out, flex_reference(q, k, v, transposed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tree_mask_from_a_captured_table(backend):
    """Speculative decoding's tree mask: the prefix causal, the draft tokens by a bool
    table; read as mask_table beside the closed-form part, exact, no hand-over to Flex."""
    prefix, draft = 30, 12
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5, 6, 6, 9])
    tree = torch.eye(draft, dtype=torch.bool)
    for node, parent in enumerate(parents.tolist()):
        if parent >= 0:
            tree[node] |= tree[parent]
    table = torch.zeros(draft, prefix + draft, dtype=torch.bool)
    table[:, prefix:] = tree

    def tree_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | table[q_idx, kv_idx]

    pattern = sf.from_mask_mod(tree_mask)
    assert repr(pattern) == f"(mask_table(<mask {draft}x{prefix + draft}>) | sinks({prefix}))"
    q, k, v = random_qkv(2, 4, 2, draft, prefix + draft, 16, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # runs on sparseforge: no hand-over warning
        out = sf.flex_attention(q, k, v, block_mask=sf.create_block_mask(
            tree_mask, None, None, draft, prefix + draft, device="cpu"), enable_gqa=True,
            backend=backend)
    torch.testing.assert_close(out, flex_reference(q, k, v, tree_mask, enable_gqa=True),
                               atol=2e-5, rtol=1e-5)


def test_flex_attention_checks_lengths():
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16)
    block_mask = sf.create_block_mask(causal, None, None, 64, 64, device="cpu")
    with pytest.raises(ValueError, match="built for lengths"):
        sf.flex_attention(q, k, v, block_mask=block_mask)
    with pytest.raises(TypeError, match="BlockMask"):
        sf.flex_attention(q, k, v, block_mask=causal)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_left_patterns_match_the_oracle(backend):
    """Lq < Lkv and Lq > Lkv, GQA, odd head dim: the generated kernels (interpreted) and
    the torch path agree with the oracle on Flex-aligned patterns, gradients too."""
    pattern = sf.from_mask_mod(scaled_causal) | sf.from_mask_mod(global_tokens)
    for q_len, kv_len in ((37, 90), (90, 61)):
        q, k, v = random_qkv(1, 4, 2, q_len, kv_len, 20, seed=q_len)
        assert_matches_oracle(pattern, q, k, v, backend)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 37, 90, 20))
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(g.dtype), atol=1e-4, rtol=1e-4)


def test_score_mod_gradient_reaches_the_bias_table():
    table = torch.randn(2, 17, requires_grad=True)

    def rel(score, b, h, q, kv):
        return score + table[h, torch.clamp(kv - q, -8, 8) + 8]

    q, k, v = random_qkv(1, 2, 2, 50, 50, 16)
    out = sf.flex_attention(q, k, v, score_mod=rel,
                            block_mask=sf.create_block_mask(sliding, None, None, 50, 50,
                                                            device="cpu"))
    (grad,) = torch.autograd.grad(out.square().sum(), table)
    table_ref = table.detach().clone().requires_grad_()

    def rel_ref(score, b, h, q, kv):
        return score + table_ref[h, torch.clamp(kv - q, -8, 8) + 8]

    want = flex_reference(q, k, v, sliding, rel_ref)
    (want_grad,) = torch.autograd.grad(want.square().sum(), table_ref)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ fallback="blocks"


def wavy(b, h, q, kv):  # no closed form: sin of a position
    return (torch.sin(q.float() * 0.3 + kv.float()) > 0.2) | (q == kv)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fallback_blocks_is_exact(backend):
    pattern = sf.from_mask_mod(wavy, fallback="blocks")
    assert repr(pattern).startswith("mask_table(<mask_mod wavy")
    for q_len, kv_len in ((40, 40), (23, 57)):
        assert torch.equal(sf.dense_mask(pattern, q_len, kv_len).reshape(q_len, kv_len),
                           on_grid(wavy, q_len, kv_len))
        q, k, v = random_qkv(1, 2, 2, q_len, kv_len, 16, seed=q_len)
        assert_matches_oracle(pattern, q, k, v, backend)


def test_fallback_blocks_per_head_and_errors():
    def head_wave(b, h, q, kv):
        return torch.sin(q.float() * (h + 1)) > kv.float() * 0.01

    pattern = sf.from_mask_mod(head_wave, heads=3, fallback="blocks")
    mask = sf.dense_mask(pattern, 20, 30).reshape(3, 20, 30)
    for h in range(3):
        assert torch.equal(mask[h], on_grid(head_wave, 20, 30, h))
    with pytest.raises(ValueError, match="sin has no closed form"):
        sf.from_mask_mod(head_wave, heads=3)  # no fallback: the error stands
    with pytest.raises(ValueError, match="fallback"):
        sf.from_mask_mod(head_wave, fallback="dense")


@pytest.mark.parametrize("form", ["q,kv", "h,q,kv", "b,q,kv", "b,h,q,kv"])
def test_per_pair_bias_is_recognised_and_matches_flex(form):
    """``score + bias[..., q_idx, kv_idx]`` (Graphormer): a pair_bias in every index form,
    with Flex's outputs (Lq != Lkv, GQA) and the bias's gradient from the fp64 oracle."""
    q, k, v = random_qkv(2, 4, 2, 33, 47, 16, seed=3)
    shape = {"q,kv": (33, 47), "h,q,kv": (4, 33, 47), "b,q,kv": (2, 33, 47),
             "b,h,q,kv": (2, 4, 33, 47)}[form]
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    index = {"q,kv": lambda b, h, q_, kv: (q_, kv), "h,q,kv": lambda b, h, q_, kv: (h, q_, kv),
             "b,q,kv": lambda b, h, q_, kv: (b, q_, kv),
             "b,h,q,kv": lambda b, h, q_, kv: (b, h, q_, kv)}[form]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[index(b, h, q_idx, kv_idx)]

    assert "pair_bias(<bias" in repr(sf.from_score_mod(score_mod))
    want = flex_reference(q, k, v, sliding, score_mod, enable_gqa=True)
    block_mask = sf.create_block_mask(sliding, None, None, 33, 47, device="cpu")
    got = sf.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    bias.requires_grad_()  # (traced again: the recognised modifier may hold a view of it)
    try:
        got = sf.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                enable_gqa=True)
        grad = torch.autograd.grad(got.square().sum(), bias)[0]
        pattern = sf.from_mask_mod(sliding) & sf.from_score_mod(score_mod)
        ref = sf.reference_attention(q.double(), k.double(), v.double(), pattern,
                                     enable_gqa=True)
        want_grad = torch.autograd.grad(ref.square().sum(), bias)[0]
        torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)
    finally:
        bias.requires_grad_(False)
