"""``sf.merge``: the union merge equals attention over the union of the key sets
(disjoint sets; two overlapping sets with their intersection subtracted), through
sparseforge's own kernels and through fp64 masked attention on random masks; gated
mixing is the gate-weighted sum (NSA); gradients flow; bad input is refused by name."""

import pytest
import torch

import sparseforge as sf


def _masked(q, k, v, mask):
    """fp64 (out, lse) of attention under a [.., Lq, Lkv] mask; empty rows 0 / -inf."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ v.double(), lse


def _qkv(seed, b=2, h=3, lq=37, lkv=53, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g) for n in (lq, lkv, lkv))


@pytest.mark.parametrize("seed", range(4))
def test_union_of_disjoint_random_masks(seed):
    q, k, v = _qkv(seed)
    g = torch.Generator().manual_seed(100 + seed)
    part = torch.randint(0, 3, (2, 3, 37, 53), generator=g)  # 0, 1: branch; 2: neither
    part[:, :, :4] = 2  # rows no branch sees
    o1, l1 = _masked(q, k, v, part == 0)
    o2, l2 = _masked(q, k, v, part == 1)
    out, lse = sf.merge([o1, o2], [l1, l2])
    want, want_lse = _masked(q, k, v, part <= 1)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    torch.testing.assert_close(lse[~torch.isinf(lse)], want_lse[~torch.isinf(want_lse)].float())
    assert bool((out[:, :, :4] == 0).all())


def test_overlapping_sets_with_the_intersection_subtracted():
    q, k, v = _qkv(7)
    g = torch.Generator().manual_seed(8)
    a = torch.rand(2, 3, 37, 53, generator=g) < 0.4
    b = torch.rand(2, 3, 37, 53, generator=g) < 0.4
    (oa, la), (ob, lb), (oab, lab) = (_masked(q, k, v, m) for m in (a, b, a & b))
    out, _ = sf.merge([oa, ob], [la, lb], subtract=(oab, lab))
    want, _ = _masked(q, k, v, a | b)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    naive, _ = sf.merge([oa, ob], [la, lb])  # without it the overlap counts twice
    assert (naive - want).abs().max() > 1e-3


def test_window_plus_sinks_through_sparseforge_kernels():
    q, k, v = (x.requires_grad_(True) for x in _qkv(3, lq=64, lkv=64))
    window, sinks = sf.sliding_window(16), sf.causal() & sf.sinks(4)
    parts = [sf.attention(q, k, v, p, return_lse=True) for p in (window, sinks, window & sinks)]
    out, _ = sf.merge([parts[0][0], parts[1][0]], [parts[0][1], parts[1][1]], subtract=parts[2])
    want = sf.attention(q, k, v, window | sinks)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    ref = torch.autograd.grad(want, (q, k, v), go)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_gated_mixing_is_the_gate_weighted_sum():
    outs = [torch.randn(2, 3, 37, 16) for _ in range(3)]
    lses = [torch.randn(2, 3, 37) for _ in range(3)]
    gates = [torch.rand(2, 3, 37), 0.5, torch.rand(2, 1, 37)]
    out, lse = sf.merge(outs, lses, weights=gates)
    want = gates[0][..., None] * outs[0] + 0.5 * outs[1] + gates[2][..., None] * outs[2]
    torch.testing.assert_close(out, want)
    assert lse is None


@pytest.mark.parametrize("call, error, match", [
    (lambda o, s: sf.merge([], []), TypeError, "outputs"),
    (lambda o, s: sf.merge([o, o], [s]), ValueError, "lses"),
    (lambda o, s: sf.merge([o, o[:, :, :3]], [s, s]), ValueError, r"outputs\[1\]"),
    (lambda o, s: sf.merge([o], [s[..., :2]]), ValueError, r"lses\[0\]"),
    (lambda o, s: sf.merge([o, o], [s, s], weights=[1.0]), ValueError, "weights"),
    (lambda o, s: sf.merge([o], [s], subtract=o), TypeError, "subtract"),
    (lambda o, s: sf.merge([o], [s], weights=[1.0], subtract=(o, s)), ValueError, "subtract"),
])
def test_bad_input_is_named(call, error, match):
    o, lse = torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5)
    with pytest.raises(error, match=match):
        call(o, lse)
