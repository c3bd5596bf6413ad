"""sf.neighborhood: NATTEN's rule, checked against NATTEN itself (its flex-fna backend
runs on CPU), the conveniences that lower to it, and argument errors."""

import math
import os
import random
import warnings

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.neighborhood import NeighborhoodPart
from sparseforge.ir.patterns_parse import parse_pattern, parse_repr
from sparseforge.ir.scores import Alibi


@pytest.fixture()
def natten():
    """NATTEN for the tests that compare with it: skipped where it is not installed, but a
    failure in CI (``CI`` set), whose ``.ci/run`` installs it: a missing NATTEN must not
    quietly skip the comparison there."""
    try:
        import natten as module
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"NATTEN is not importable in CI ({exc}): .ci/run must install it")
        pytest.skip("install NATTEN: pip install --no-build-isolation natten")
    return module


def natten_mask(natten, shape, kernel, dilation, stride, causal) -> torch.Tensor:
    """NATTEN's own mask, read off its output: zero queries give uniform weights over the
    kept keys, and one-hot values make output[i, j] = 1/count where (i, j) is kept."""
    n = math.prod(shape)
    d = max(16, 1 << (n - 1).bit_length())
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    q = torch.zeros(1, *shape, 1, d)
    k = torch.randn(1, *shape, 1, d)
    v = torch.zeros(1, n, 1, d)
    v[0, torch.arange(n), 0, torch.arange(n)] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = fn(q, k, v.view(1, *shape, 1, d), kernel_size=kernel, dilation=dilation, stride=stride,
               is_causal=causal, backend="flex-fna")
    return o.reshape(n, d)[:, :n] > 1e-6


def random_configs(count, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        nd = rng.choice([1, 2, 3])
        shape = tuple(rng.randint(3, 10 if nd < 3 else 6) for _ in range(nd))
        kernel = tuple(rng.randint(2, n) for n in shape)
        if kernel == shape and nd == 1:
            continue  # NATTEN routes kernel == extent to plain attention
        dilation = tuple(rng.randint(1, max(1, n // k)) for n, k in zip(shape, kernel))
        stride = tuple(rng.randint(1, k) for k in kernel)
        causal = tuple(rng.random() < 0.3 for _ in shape)
        out.append((shape, kernel, dilation, stride, causal))
    return out


@pytest.mark.parametrize("shape,kernel,dilation,stride,causal", random_configs(40, 0))
def test_mask_equals_natten(natten, shape, kernel, dilation, stride, causal):
    ref = natten_mask(natten, shape, kernel, dilation, stride, causal)
    pattern = sf.neighborhood(shape, kernel, dilation, stride, causal)
    mine = sf.dense_mask(pattern, ref.shape[0], ref.shape[0])
    assert torch.equal(mine, ref), f"{(mine != ref).sum().item()} pairs differ"


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_na_api_matches_natten_outputs(natten, ndim, backend):
    """sf.naNd takes NATTEN's arguments and heads-last layout; random inputs, odd sizes,
    even and odd kernels, dilation, stride and a causal axis."""
    shape, kernel, dilation, stride, causal = {
        1: ((37,), (6,), (2,), (3,), (False,)),
        2: ((9, 11), (3, 4), (2, 1), (1, 2), (False, True)),
        3: ((4, 5, 6), (2, 3, 3), (1, 1, 2), (1, 2, 1), (True, False, False)),
    }[ndim]
    torch.manual_seed(ndim)
    # NATTEN: head dims in powers of two; two batch rows on the torch path, one in the
    # interpreter (the 3-D case took 43 s with two)
    batch = 2 if backend == "torch" else 1
    q, k, v = (torch.randn(batch, *shape, 2, 32) for _ in range(3))
    fn = getattr(sf, f"na{ndim}d")
    mine = fn(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal, scale=0.3,
              backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(natten, f"na{ndim}d")(q, k, v, kernel, stride=stride, dilation=dilation,
                                            is_causal=causal, scale=0.3, backend="flex-fna")
    assert mine.shape == q.shape
    torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_na_api_additional_tokens_and_lse_match_natten(natten, ndim):
    """NATTEN's extra keys/values (attended by every query, merged by log-sum-exp) and its
    log-sum-exp output, positional arguments in NATTEN's order, a NATTEN backend name."""
    shape, kernel = {1: ((13,), 5), 2: ((6, 7), (3, 5)), 3: ((3, 4, 5), 3)}[ndim]
    torch.manual_seed(10 + ndim)
    q, k, v = (torch.randn(2, *shape, 2, 16) for _ in range(3))
    extra_k, extra_v = (torch.randn(2, 5, 2, 16) for _ in range(2))
    fn = getattr(sf, f"na{ndim}d")
    out, lse = fn(q, k, v, kernel, 1, 1, False, 0.4, extra_k, extra_v, None, "cutlass-fna",
                  return_lse=True, q_tile_shape=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_lse = getattr(natten, f"na{ndim}d")(
            q, k, v, kernel, scale=0.4, additional_keys=extra_k, additional_values=extra_v,
            return_lse=True, backend="flex-fna")
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


def test_na_api_additional_tokens_train_like_the_oracle():
    """Gradients through the merge, GQA, the torch path: the mask is the grid's
    neighbourhood plus every extra key (keys after the grid in one sequence)."""
    torch.manual_seed(3)
    q = torch.randn(1, 5, 6, 4, 8, requires_grad=True)
    k, v = (torch.randn(1, 5, 6, 2, 8, requires_grad=True) for _ in range(2))
    extra_k, extra_v = (torch.randn(1, 3, 2, 8, requires_grad=True) for _ in range(2))
    out = sf.na2d(q, k, v, 3, additional_keys=extra_k, additional_values=extra_v,
                  backend="torch")

    def heads_first(t):
        return t.flatten(1, -3).transpose(1, 2)

    keys = torch.cat([heads_first(k), extra_k.transpose(1, 2)], 2)
    values = torch.cat([heads_first(v), extra_v.transpose(1, 2)], 2)
    mask = torch.cat([sf.dense_mask(sf.neighborhood((5, 6), 3), 30, 30),
                      torch.ones(30, 3, dtype=torch.bool)], 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", heads_first(q).double(),
                          keys.double().repeat_interleave(2, 1)) * 8 ** -0.5
    ref = torch.einsum("bhqk,bhkd->bhqd", scores.masked_fill(~mask, float("-inf")).softmax(-1),
                       values.double().repeat_interleave(2, 1))
    ref = ref.transpose(1, 2).reshape(q.shape)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-5)
    go = torch.randn_like(out)
    inputs = (q, k, v, extra_k, extra_v)
    for g, w in zip(torch.autograd.grad(out, inputs, go),
                    torch.autograd.grad(ref, inputs, go.double())):
        torch.testing.assert_close(g, w.float(), atol=5e-5, rtol=1e-5)


def test_na_api_gqa_and_errors():
    q = torch.randn(1, 6, 7, 4, 16)
    kv = torch.randn(1, 6, 7, 2, 16)
    out = sf.na2d(q, kv, kv, 3)
    ref = sf.reference_attention(q.flatten(1, 2).transpose(1, 2), kv.flatten(1, 2).transpose(1, 2),
                                 kv.flatten(1, 2).transpose(1, 2), sf.neighborhood((6, 7), 3),
                                 enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(q.shape).float(), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="na2d\\(query=...\\): expected \\[batch, 2 spatial"):
        sf.na2d(torch.randn(1, 6, 4, 16), kv, kv, 3)
    with pytest.raises(ValueError, match="na2d\\(key=...\\): batch and spatial dims"):
        sf.na2d(q, torch.randn(1, 6, 8, 2, 16), kv, 3)
    with pytest.raises(ValueError, match="kernel \\* dilation must be <= the extent"):
        sf.na2d(q, kv, kv, 4, dilation=2)
    with pytest.raises(ValueError, match="na2d\\(backend='fast'\\): expected one of"):
        sf.na2d(q, kv, kv, 3, backend="fast")
    with pytest.raises(ValueError, match="give both or neither"):
        sf.na2d(q, kv, kv, 3, additional_keys=torch.randn(1, 3, 2, 16))
    with pytest.raises(ValueError, match="na2d\\(additional_keys=...\\): expected \\[batch, tokens"):
        sf.na2d(q, kv, kv, 3, additional_keys=torch.randn(1, 3, 4, 16),
                additional_values=torch.randn(1, 3, 4, 16))
    with pytest.raises(TypeError, match="unexpected keyword argument.*tile_size"):
        sf.na2d(q, kv, kv, 3, tile_size=8)


def test_every_query_sees_the_kernel_volume():
    """Windows shift inward at borders: each query keeps prod(kernel) keys (non-causal)."""
    pattern = sf.neighborhood((9, 7, 5), (3, 4, 5), dilation=(3, 1, 1), stride=(1, 2, 3))
    m = sf.dense_mask(pattern, 315, 315)
    assert (m.sum(1) == 3 * 4 * 5).all()


def test_tokens_past_the_grid_take_no_part_and_compose():
    """A grid shorter than the sequence: extra tokens join only through other primitives."""
    pattern = sf.neighborhood((4, 5), 3) | sf.global_queries(2)
    m = sf.dense_mask(pattern, 24, 24)
    grid = sf.dense_mask(sf.neighborhood((4, 5), 3), 20, 20)
    assert torch.equal(m[2:20, :20], grid[2:])
    assert not m[20:, :].any() and m[:2].all()


def test_conveniences_lower_to_the_rule():
    block = sf.maxvit_block((8, 12), 4)
    m = sf.dense_mask(block, 96, 96)
    y, x = torch.arange(96) // 12, torch.arange(96) % 12
    same = (y[:, None] // 4 == y[None] // 4) & (x[:, None] // 4 == x[None] // 4)
    assert torch.equal(m, same)
    assert sf.swin_window((8, 12), 4) == block
    grid = sf.dense_mask(sf.maxvit_grid((8, 12), (2, 3)), 96, 96)
    assert torch.equal(grid, (y[:, None] % 4 == y[None] % 4) & (x[:, None] % 4 == x[None] % 4))
    halo = sf.dense_mask(sf.halo_blocks((12,), 4, 1), 12, 12)
    assert halo[5].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8]  # block 1 plus 1 each side
    with pytest.raises(ValueError, match="maxvit_block\\(window=\\(5, 5\\)\\): extent 8"):
        sf.maxvit_block((8, 10), 5)


@pytest.mark.parametrize("bad,error,match", [
    (dict(shape=(4, 4, 4, 4), kernel=3), ValueError, "1 to 3 dimensions"),
    (dict(shape=(8, 8), kernel=(3, 3, 3)), ValueError, "expected an int or 2 ints"),
    (dict(shape=(8, 8), kernel=3, stride=4), ValueError, "stride must be <= kernel"),
    (dict(shape=(8, 8), kernel=3.0), TypeError, "expected ints"),
    (dict(shape=(8, 8), kernel=3, causal=(True, 1)), TypeError, "expected a bool or 2 bools"),
    (dict(shape=(8, 0), kernel=1), ValueError, "must be >= 1"),
])
def test_bad_arguments_name_the_argument(bad, error, match):
    with pytest.raises(error, match=match):
        sf.neighborhood(**bad)


def test_repr_round_trips_through_both_parsers():
    for p in (sf.neighborhood((5, 6), (3, 2), dilation=(1, 2), causal=(True, False)),
              sf.neighborhood(10, 3, stride=2) | sf.sinks(2), sf.maxvit_grid((8, 8), 2)):
        assert parse_pattern(repr(p)) == p
        assert parse_repr(repr(p), []) == p


def test_a_part_of_a_grid_round_trips_and_names_its_offsets():
    """``NeighborhoodPart`` (context parallelism's part of a grid) and ALiBi's offset are
    in the repr: the plan key, and what the torch.compile custom op rebuilds."""
    slopes = sf.alibi_slopes(2)
    part = NeighborhoodPart(sf.neighborhood((5, 6), 3), 7, -4) & Alibi(slopes, -12)
    rebuilt = parse_repr(repr(part), [slopes])
    assert rebuilt == part and repr(rebuilt) == repr(part)
    assert "q_offset=7" in repr(part) and "offset=-12" in repr(part)
    assert Alibi(slopes, 3) != Alibi(slopes) and hash(Alibi(slopes, 0)) == hash(Alibi(slopes))
    with pytest.raises(TypeError, match="NeighborhoodPart"):
        NeighborhoodPart((5, 6), 0, 0)
    with pytest.raises(TypeError, match="offset"):
        Alibi(slopes, 1.5)
