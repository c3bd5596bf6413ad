"""Window-offset ``rel_bias`` (Swin / MaxViT / NATTEN rpb) on N-D neighbourhoods.

The entry each pair reads is checked three independent ways: against legacy NATTEN's
``rpb`` indexing (window start and ``pb_start``, transcribed from its CUDA source), against
a brute-force Python loop with per-dimension clipping, and through attention outputs on
every executor (torch path tiled and untiled, the generated kernels in the interpreter),
with gradients for q, k, v and, on the torch path, the table.
"""

import functools
import itertools
import math

import pytest
import torch

import sparseforge as sf
from sparseforge.ir.neighborhood import Neighborhood
from sparseforge.ir.nodes import walk
from sparseforge.ir.ops import TorchOps
from sparseforge.ir.scores import rel_index, score_spec
from sparseforge.planner.plan import plan
from sparseforge.runtime import dispatch

# ---------------------------------------------------- legacy NATTEN (<= 0.17) rpb indexing
# natten/csrc/include/natten/cuda/naive/natten_commons.cuh: get_window_start and
# get_pb_start, for odd kernels (NEIGHBORHOOD_SIZE = K // 2), stride 1, non-causal. The
# key at window slot ki is window_start + ki * dilation and reads rpb[pb_start + ki].


def _natten_window_start(index, length, kernel, dilation):
    ns = kernel // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    if index - ns * dilation < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel * dilation
    return index - ns * dilation


def _natten_pb_start(index, length, kernel, dilation):
    ns = kernel // 2
    if dilation <= 1:
        return ns + (index < ns) * (ns - index) + (index + ns >= length) * (length - index - 1 - ns)
    if index - ns * dilation < 0:
        return kernel - 1 - index // dilation
    if index + ns * dilation >= length:
        return (length - index - 1) // dilation
    return ns


@pytest.mark.parametrize("shape,kernel,dilation", [
    ((9, 11), (3, 5), (2, 1)), ((13, 8), (5, 3), (2, 2)), ((7, 7), (7, 3), (1, 2)),
    ((15, 12), (3, 3), (4, 3)),
])
def test_window_entries_equal_natten_rpb(shape, kernel, dilation):
    """Every pair NATTEN's window holds reads the rpb entry NATTEN's kernels read."""
    table = torch.zeros(1, *(2 * k - 1 for k in kernel))
    spec = score_spec(sf.neighborhood(shape, kernel, dilation=dilation) & sf.rel_bias(table))
    assert not spec.rel_grid.clipped  # the table covers every window
    strides = (shape[1], 1)
    for y, x in itertools.product(range(shape[0]), range(shape[1])):
        starts = [_natten_window_start(c, n, k, d) for c, n, k, d in zip((y, x), shape, kernel, dilation)]
        pbs = [_natten_pb_start(c, n, k, d) for c, n, k, d in zip((y, x), shape, kernel, dilation)]
        for ky, kx in itertools.product(range(kernel[0]), range(kernel[1])):
            key = ((starts[0] + ky * dilation[0]) * strides[0] + starts[1] + kx * dilation[1])
            want = (pbs[0] + ky) * (2 * kernel[1] - 1) + pbs[1] + kx
            got = rel_index(spec, torch.tensor(y * strides[0] + x), torch.tensor(key), TorchOps)
            assert int(got) == want, ((y, x), (ky, kx))


# ------------------------------------------------------------ brute force and the oracle


def _brute_force_bias(table, shape, dilation, lq, lkv):
    """[H, Lq, Lkv]: per dimension the group-coordinate difference, clipped to the table;
    plain Python, no code shared with the library."""
    halves = [(e - 1) // 2 for e in table.shape[1:]]
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]

    def coords(flat):
        out = []
        for d, n in enumerate(shape):
            c = flat // strides[d]
            out.append((c if d == 0 else c % n) // dilation[d])  # dim 0 runs on past the grid
        return out

    bias = torch.zeros(table.shape[0], lq, lkv, dtype=torch.float64)
    for i in range(lq):
        cq = coords(i + lkv - lq)
        for j in range(lkv):
            ck = coords(j)
            entry = tuple(min(max(b - a, -h), h) + h for a, b, h in zip(cq, ck, halves))
            bias[:, i, j] = table[(slice(None), *entry)].double()
    return bias


def _manual_attention(q, k, v, pattern, bias):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    mask = sf.dense_mask(pattern, q.shape[2], k.shape[2])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double()


CASES = [  # (mask, table extents, length): covered windows, and clipped ones beside sinks
    (sf.neighborhood((9, 11), (3, 5), dilation=(2, 1)), (5, 9), 99),
    (sf.neighborhood((8, 6), (3, 3), stride=(2, 1), causal=(False, True)), (5, 5), 48),
    (sf.neighborhood((12, 10), (5, 3), dilation=(1, 2)) | sf.sinks(3), (9, 5), 120),
    (sf.neighborhood((4, 6, 5), (3, 3, 2)), (5, 3, 3), 120),  # table narrower than kernel 3
    (sf.neighborhood((7, 9), 3), (5, 5), 66),  # extra tokens past the grid
]


@pytest.mark.parametrize("mask,extents,length", CASES)
def test_reference_equals_brute_force(mask, extents, length):
    torch.manual_seed(length)
    table = torch.randn(2, *extents)
    pattern = mask & sf.rel_bias(table)
    grid = next(n for n in walk(mask) if isinstance(n, Neighborhood))
    q, k, v = (torch.randn(1, 2, length, 8) for _ in range(3))
    bias = _brute_force_bias(table, grid.shape, grid.dilation, length, length)
    want = _manual_attention(q, k, v, mask, bias)
    torch.testing.assert_close(sf.reference_attention(q, k, v, pattern).double(), want,
                               atol=1e-6, rtol=1e-6)


@pytest.fixture(params=[False, True], ids=["original-order", "tiled"])
def layout(request, monkeypatch):
    monkeypatch.setattr(dispatch, "plan", functools.partial(plan, tiled=request.param))
    dispatch._plans.clear()
    yield request.param
    dispatch._plans.clear()


@pytest.mark.parametrize("mask,extents,length", CASES)
def test_torch_path_with_gradients(layout, mask, extents, length):
    """Forward and gradients (q, k, v and the table) on the CPU path, GQA, odd head dim,
    both token orders."""
    torch.manual_seed(length + 1)
    table = torch.randn(4, *extents, requires_grad=True)
    pattern = mask & sf.rel_bias(table) & sf.softcap(4.0)
    q = torch.randn(2, 4, length, 13, requires_grad=True)
    k, v = (torch.randn(2, 2, length, 13, requires_grad=True) for _ in range(2))
    p = dispatch.cached_plan(dispatch.compile_pattern(pattern), length, length, 13, q.dtype, "cpu")
    assert (p.layout is not None) == layout
    out = sf.attention(q, k, v, pattern, enable_gqa=True, backend="torch")
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-5)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, table), go)
    want = torch.autograd.grad(ref, (q, k, v, table), go.double())
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-5)


def test_lq_differs_from_lkv_on_the_torch_path():
    """Queries at the end of the key grid (bottom-right alignment), untiled."""
    torch.manual_seed(5)
    table = torch.randn(2, 5, 7)
    pattern = sf.neighborhood((8, 9), (3, 4)) & sf.rel_bias(table)
    q, k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 72, 16), torch.randn(1, 2, 72, 16)
    torch.testing.assert_close(sf.attention(q, k, v, pattern, backend="torch"),
                               sf.reference_attention(q, k, v, pattern).float(), atol=2e-5, rtol=1e-5)


INTERPRETED = [  # small: the interpreter pays per operation, most for the tiled layout
    (sf.neighborhood((6, 7), 3, dilation=(2, 1)), (5, 5), 42),
    (sf.neighborhood((6, 5), 3) | sf.sinks(2), (3, 5), 30),  # clipped in dimension 0
]


@pytest.mark.parametrize("case", [0, 1])
def test_generated_kernels_in_the_interpreter(layout, case):
    """The printed entry in the forward, dQ and dK/dV kernels (the table detached: its
    gradient is the torch path's for now), with ALiBi and softcap beside it."""
    mask, extents, length = INTERPRETED[case]
    torch.manual_seed(case)
    table = torch.randn(2, *extents)
    pattern = mask & sf.rel_bias(table) & sf.alibi(torch.tensor([0.1, -0.2])) & sf.softcap(5.0)
    q, k, v = (torch.randn(1, 2, length, 16, requires_grad=True) for _ in range(3))
    out = sf.attention(q, k, v, pattern, backend="triton")
    ref = sf.reference_attention(q, k, v, pattern)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-5)
    go = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go.double())):
        torch.testing.assert_close(g, w.float(), atol=5e-5, rtol=1e-5)


def test_table_gradient_on_the_kernels_is_refused():
    table = torch.randn(1, 5, 5, requires_grad=True)
    pattern = sf.neighborhood((6, 6), 3) & sf.rel_bias(table)
    q = torch.randn(1, 1, 36, 16)
    with pytest.raises(ValueError, match=r"rel_bias\(table=\[1x5x5\]\).*table.detach\(\)"):
        sf.attention(q, q, q, pattern, backend="triton")
    sf.attention(q, q, q, sf.neighborhood((6, 6), 3) & sf.rel_bias(table.detach()), backend="triton")


@pytest.mark.parametrize("pattern,match", [
    (lambda t: sf.sliding_window(8) & sf.rel_bias(t), "exactly one grid"),
    (lambda t: sf.neighborhood(36, 3) & sf.rel_bias(t), "has 2 window dimensions"),
    (lambda t: (sf.neighborhood((6, 6), 3) | sf.neighborhood((6, 6), 3, dilation=2))
     & sf.rel_bias(t), "found 2"),
])
def test_window_table_needs_one_neighbourhood_grid(pattern, match):
    with pytest.raises(ValueError, match=match):
        sf.plan(pattern(torch.zeros(1, 5, 5)), q_len=36, kv_len=36, head_dim=16, target="cpu")


def test_even_window_extent_is_refused():
    with pytest.raises(ValueError, match="every window extent must be odd"):
        sf.rel_bias(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match=r"expected shape \[Hq, 2R \+ 1\]"):
        sf.rel_bias(torch.zeros(2, 3, 3, 3, 3))
