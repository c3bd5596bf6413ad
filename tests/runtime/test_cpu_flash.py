"""The fused CPU executor (runtime/cpu_flash.py, runtime/cpu_program.py): outputs, lse and
gradients against the fp64 oracle, the shape of its programs, caching, and when dispatch
hands a call to the gather executor instead."""

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import cpu_flash, cpu_program, dispatch, torch_exec
from tests.helpers import assert_matches_oracle, random_qkv

IDS = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 37, 130, 63]))  # 330 tokens
SHUFFLED = IDS[torch.randperm(330, generator=torch.Generator().manual_seed(0))]
BATCHED = torch.stack([IDS, IDS.flip(0)])

PATTERNS = [
    sf.sliding_window(37), sf.causal(), sf.sliding_window(50) | sf.sinks(4),
    sf.window(20, 3, dilation=3), sf.chunks(64) & sf.causal(), sf.prefix_lm(70),
    sf.documents(IDS), sf.documents(IDS) & sf.causal(), sf.documents(SHUFFLED) & sf.causal(),
    (sf.documents(IDS) & sf.causal()) | sf.documents(IDS, kv_ids=torch.zeros(330, dtype=torch.long)),
    sf.global_queries(5) | sf.window(2, 2),
    sf.per_head([sf.causal(), sf.sliding_window(16), sf.full(), sf.sinks(0)]),
]


def _grads(q, k, v, pattern, dtype=torch.float64):
    """Gradients of sum(out * g) (no gradient through lse: the fused backward's case)."""
    gqa = q.shape[1] != k.shape[1]
    leaves = [t.detach().clone().to(dtype).requires_grad_() for t in (q, k, v)]
    out = (sf.attention if dtype != torch.float64 else sf.reference_attention)(
        *leaves, pattern, enable_gqa=gqa, **({"backend": "torch"} if dtype != torch.float64 else {}))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * g.to(out.dtype)).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_forward_backward_match_oracle(pattern):
    q, k, v = random_qkv(2, 4, 2, 330, 330, 24, seed=3)  # GQA, 330 = 5 tiles and a part
    assert cpu_flash.supports(dispatch.compile_pattern(pattern).scored, q, v)
    assert_matches_oracle(pattern, q, k, v, "torch")
    for name, got, ref in zip("qkv", _grads(q, k, v, pattern, torch.float32), _grads(q, k, v, pattern)):
        err = (got.double() - ref).abs().max().item()
        assert err <= 2e-4 * max(1.0, ref.abs().max().item()), f"{pattern!r}: d{name} error {err:.3g}"


@pytest.fixture()
def pool_units(monkeypatch):
    """Two intra-op threads, so that the executor runs its units on the worker pool
    (the suite's xdist workers run one thread, where it does not); yields the list of
    units the pool was handed."""
    from sparseforge.runtime import cpu_threads

    handed = []
    real = cpu_threads._executor

    class Recording:
        def __init__(self, workers):
            self.pool = real(workers)

        def submit(self, fn, unit):
            handed.append(unit)
            return self.pool.submit(fn, unit)
    monkeypatch.setattr(cpu_threads, "_executor", Recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield handed
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("pattern", [
    sf.sliding_window(50) | sf.sinks(4), sf.documents(IDS) & sf.causal(),
    sf.per_head([sf.causal(), sf.sliding_window(16), sf.full(), sf.sinks(0)])], ids=repr)
def test_worker_pool_matches_oracle(pattern, pool_units):
    """Forward and backward on the pool (every user with more than one core runs it):
    the same bounds as on one thread, and gradients bitwise repeatable."""
    q, k, v = random_qkv(2, 4, 2, 330, 330, 24, seed=3)
    assert_matches_oracle(pattern, q, k, v, "torch")
    grads = _grads(q, k, v, pattern, torch.float32)
    for name, got, ref in zip("qkv", grads, _grads(q, k, v, pattern)):
        err = (got.double() - ref).abs().max().item()
        assert err <= 2e-4 * max(1.0, ref.abs().max().item()), f"{pattern!r}: d{name} error {err:.3g}"
    assert all(torch.equal(a, b) for a, b in zip(grads, _grads(q, k, v, pattern, torch.float32)))
    assert len(pool_units) > 2


@pytest.mark.parametrize("lq, lkv", [(70, 300), (300, 70), (1, 129), (129, 1)])
def test_unequal_lengths_empty_rows_and_odd_head_dim(lq, lkv):
    q, k, v = random_qkv(1, 3, 1, lq, lkv, 13, seed=4)
    for pattern in (sf.causal(), sf.sliding_window(40) | sf.sinks(2), sf.window(5, 0) & sf.sinks(3)):
        _out, _lse = assert_matches_oracle(pattern, q, k, v, "torch")
        grads, refs = _grads(q, k, v, pattern, torch.float32), _grads(q, k, v, pattern)
        for got, ref in zip(grads, refs):
            assert not torch.isnan(got).any()
            assert (got.double() - ref).abs().max().item() <= 2e-4 * max(1.0, ref.abs().max().item())


def test_batched_document_ids():
    q, k, v = random_qkv(2, 2, 2, 330, 330, 16, seed=6)
    pattern = sf.documents(BATCHED) & sf.causal()
    assert_matches_oracle(pattern, q, k, v, "torch")
    for got, ref in zip(_grads(q, k, v, pattern, torch.float32), _grads(q, k, v, pattern)):
        assert (got.double() - ref).abs().max().item() <= 2e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs(dtype):
    q, k, v = random_qkv(1, 2, 2, 200, 200, 32, dtype=dtype, seed=7)
    for pattern in (sf.sliding_window(64), sf.documents(IDS[:200]) & sf.causal()):
        assert_matches_oracle(pattern, q, k, v, "torch")  # bf16/fp16 bound: helpers.py


def _program(pattern, length, dim=16):
    p = sf.plan(pattern, q_len=length, kv_len=length, head_dim=dim, dtype="float32", target="cpu")
    compiled = dispatch.compile_pattern(pattern)
    (_row, prog), = cpu_program.programs(p, 0, 0, p.kernels[0], compiled.head_patterns[0],
                                        p.schedules[0][0])
    return p, prog


def test_sliding_window_is_bands_with_one_shared_mask():
    _p, prog = _program(sf.sliding_window(256), 4096)
    band = [b for b in prog.batches if b.windows[0].step > 0]
    assert band and sum(b.count for b in band) > 0.8 * prog.q_tiles
    for b in band:
        (window,) = b.windows
        (piece,) = window.pieces
        assert piece.allowed.shape[0] == 1  # one mask, a stride-0 view over the items
        mask = piece.mask(torch.float32, b)
        assert mask.shape[0] == b.count and mask.stride(0) == 0


def test_sinks_get_a_fixed_window_beside_the_band():
    _, prog = _program(sf.sliding_window(256) | sf.sinks(4), 4096)
    assert len(prog.batches) <= 3
    long = max(prog.batches, key=lambda b: b.count)
    assert [(w.step, w.width) for w in long.windows] == [(0, 1), (1, 5)]
    # no tile is computed twice: each window owns its run's tiles only
    q, k, v = random_qkv(1, 2, 2, 1000, 1000, 16, seed=14)
    assert_matches_oracle(sf.sliding_window(200) | sf.sinks(4), q, k, v, "torch")


def test_causal_runs_prefixes_without_masks():
    p, prog = _program(sf.causal(), 4096)
    pieces = [piece for b in prog.batches for w in b.windows for piece in w.pieces]
    assert all(w.step == 0 for b in prog.batches for w in b.windows)
    assert all(piece.allowed is None for piece in pieces)  # bodies and causal-mode diagonals
    assert sum(piece.causal for piece in pieces) == len(prog.batches)
    # work within the planner's slack of the causal tiles
    work = sum(b.count * piece.width // (2 if piece.causal else 1) for b in prog.batches
               for w in b.windows for piece in w.pieces)
    assert work <= cpu_program.SLACK * p.schedules[0][0].visit.sum()


def test_document_ids_refine_the_tiles():
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([2048, 1024, 640, 384]))
    p, prog = _program(sf.documents(ids), 4096)
    assert p.schedules[0][0].visit.all()  # the plan cannot see the ids ...
    computed = sum(b.count * piece.width for b in prog.batches for w in b.windows
                   for piece in w.pieces)
    tiles = sum((-(-n // 64)) ** 2 for n in (2048, 1024, 640, 384))
    assert computed == tiles  # ... the program only the documents' own tiles


def test_programs_are_cached_and_follow_in_place_id_edits(monkeypatch):
    ids = IDS.clone()
    pattern = sf.documents(ids) & sf.causal()
    q, k, v = random_qkv(1, 2, 2, 330, 330, 16, seed=8)
    sf.attention(q, k, v, pattern, backend="torch")

    def no_masks(*args, **kw):
        raise AssertionError("a warm call evaluated the mask")
    monkeypatch.setattr(cpu_program, "tile_mask", no_masks)
    sf.attention(q, k, v, pattern, backend="torch")  # warm: views of cached programs only
    monkeypatch.undo()
    ids[:200] = 7  # in place: the cached tiles are stale, equality with the cached copy says so
    assert_matches_oracle(pattern, q, k, v, "torch")


def test_inference_mode_ids_edited_in_place():
    _inference_mode_ids_edited_in_place(*random_qkv(1, 2, 2, 330, 330, 16, seed=13))


def test_inference_mode_on_the_worker_pool(pool_units):
    """Inference mode is per thread: the pool's workers take the caller's."""
    _inference_mode_ids_edited_in_place(*random_qkv(1, 2, 2, 330, 330, 16, seed=13))
    assert pool_units


def _inference_mode_ids_edited_in_place(q, k, v):
    with torch.inference_mode():
        ids = IDS.clone()
        pattern = sf.documents(ids) & sf.causal()
        sf.attention(q, k, v, pattern, backend="torch")
        ids[100:] = 3
        out = sf.attention(q, k, v, pattern, backend="torch")
    ref = sf.reference_attention(q, k, v, sf.documents(ids.clone()) & sf.causal())
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_score_modifiers_take_the_gather_executor(monkeypatch):
    q, k, v = random_qkv(1, 2, 2, 100, 100, 16, seed=9)
    scored = sf.causal() & sf.softcap(20.0)
    assert not cpu_flash.supports(dispatch.compile_pattern(scored).scored, q, v)
    calls = []
    real = torch_exec.run_forward
    monkeypatch.setattr(torch_exec, "run_forward", lambda *a: calls.append(1) or real(*a))
    sf.attention(q, k, v, sf.causal(), backend="torch")
    assert not calls
    assert_matches_oracle(scored, q, k, v, "torch")
    assert calls


def test_gradient_through_lse_runs_fused(monkeypatch):
    """The extra head-dim column carries dL/dlse (cpu_flash.run_backward)."""
    monkeypatch.setattr(torch_exec, "run_backward", None)  # the gather backward must not run
    q, k, v = random_qkv(1, 2, 1, 150, 150, 16, seed=10)
    pattern = sf.sliding_window(40) | sf.sinks(2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sf.attention(*leaves, pattern, return_lse=True, enable_gqa=True, backend="torch")
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*ref_leaves, pattern, return_lse=True, enable_gqa=True)
    g = torch.randn(lse.shape, generator=torch.Generator().manual_seed(11))
    ((out * 0.5).sum() + (lse * g).sum()).backward()
    ((ref * 0.5).sum() + (ref_lse * g.double()).sum()).backward()
    for got, want in zip(leaves, ref_leaves):
        assert (got.grad.double() - want.grad).abs().max().item() <= 1e-4 * want.grad.abs().max().item()


def test_backward_is_bitwise_repeatable_on_the_thread_pool():
    q, k, v = random_qkv(2, 4, 2, 300, 300, 16, seed=12)
    runs = [_grads(q, k, v, sf.documents(IDS[:300]) & sf.causal(), torch.float32) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("pattern", [
    sf.sliding_window(100) | sf.sinks(3),
    sf.documents(torch.stack([IDS[:256], IDS[:256].flip(0)])) & sf.causal(),  # per-row programs
], ids=repr)
def test_whole_tile_lengths_run_on_views_of_the_inputs(pattern):
    """L = 4 tiles, no GQA: q/k/v are used in place (views, second batch row at a storage
    offset); results exact, inputs untouched, also with a gradient through lse."""
    q, k, v = random_qkv(2, 2, 2, 256, 256, 32, seed=15)
    before = [t.clone() for t in (q, k, v)]
    assert_matches_oracle(pattern, q, k, v, "torch")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sf.attention(*leaves, pattern, return_lse=True, backend="torch")
    (out.sum() + lse.sum()).backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*ref_leaves, pattern, return_lse=True)
    (ref.sum() + ref_lse.sum()).backward()
    for got, want in zip(leaves, ref_leaves):
        assert (got.grad.double() - want.grad).abs().max().item() <= 1e-4 * want.grad.abs().max().item()
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))
