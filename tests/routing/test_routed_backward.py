"""The routed backward kernels (dQ and dK/dV walking the forward's selection, dK/dV through
its on-device transpose) under Triton's interpreter: q, k and v gradients through out and
lse against fp64 autograd through the oracle, for every bucket rule with and without a
static part, GQA, Lq != Lkv, odd head dims, empty rows, a score modifier, and key tiles
spanning several buckets (where dK/dV must visit each query tile once); lines
(vertical_slash, through the transposed tile map) and clusters (on the sorted tokens);
bitwise repeatable; no host read in a warm training step."""

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import dispatch
from sparseforge.runtime.routed_tiles import RoutedTiles, transposed_selection
from tests.helpers import host_reads_during, random_qkv

BOUNDARIES = torch.tensor([0, 20, 45, 55, 70])

PATTERNS = {
    "moba": (sf.causal() & sf.topk_blocks(32, 2, query_block=1)) | (sf.causal() & sf.chunks(32)),
    "nsa_selection": sf.topk_blocks(24, 3) & sf.causal(),  # 24-key blocks in 32-key tiles
    "topk_or_window_group": sf.topk_blocks(20, 2, share="group") | sf.sliding_window(25),
    "threshold_and_sinks": sf.threshold_blocks(16, 0.6) | sf.sinks(3),
    "empty_rows": sf.topk_blocks(32, 1) & sf.window(3, 0),
    "topk_chunks": sf.topk_chunks(BOUNDARIES, 2) | sf.sinks(5),
    "hierarchical": sf.hierarchical(2, 8) & sf.causal(),
    "many_buckets_per_tile": sf.topk_blocks(3, 4) & sf.causal(),  # ~11 buckets per key tile
    "softcap": (sf.topk_blocks(16, 2) | sf.sliding_window(8)) & sf.softcap(3.0),
    # lines: dK/dV walks the tile map turned around; beside a static part, and alone
    "vertical_slash_sinks": (sf.vertical_slash(6, 5, last_q=16) & sf.causal()) | sf.sinks(2),
    "vertical_slash": sf.vertical_slash(3, 4, last_q=8) & sf.causal() & sf.softcap(4.0),
    # the cluster-sorted tokens: dQ and dK/dV run sorted, the gather and scatter carry the
    # gradient back to token order
    "clusters": sf.clusters(torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(2)))
                & sf.causal() & sf.softcap(5.0),
}


def _grads(pattern, q, k, v, backend):
    """(out, lse, dq, dk, dv) with random output and lse gradients (0 on empty rows)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sf.attention(*leaves, pattern, enable_gqa=True, backend=backend, return_lse=True)
    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.where(torch.isinf(lse), 0.0, torch.randn(lse.shape, generator=gen,
                                                           dtype=torch.float64))
    return (out, lse, *torch.autograd.grad((out, lse), leaves, (g_out.to(out.dtype),
                                                                g_lse.to(lse.dtype))))


@pytest.fixture
def no_torch_path(monkeypatch):
    """The torch path must not run: a gradient through the routed kernel is the point."""
    def refuse(*args, **kwargs):
        raise AssertionError("routed_attention (the torch path) ran")

    monkeypatch.setattr(dispatch, "routed_attention", refuse)


@pytest.mark.parametrize("lengths", [(70, 70), (29, 70)], ids=["square", "lq<lkv"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_gradients_equal_fp64_autograd(name, lengths, launched_kinds, no_torch_path):
    pattern, (q_len, kv_len) = PATTERNS[name], lengths
    q, k, v = random_qkv(1, 4, 2, q_len, kv_len, 12, seed=q_len + len(name))
    got = _grads(pattern, q, k, v, "triton")
    assert {"forward", "backward_dq", "backward_dkdv"} <= set(launched_kinds)
    want = _grads(pattern, q.double(), k.double(), v.double(), "reference")
    if name == "empty_rows":
        assert torch.isinf(want[1]).any()
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4, msg=label)


@pytest.mark.parametrize("name", ["nsa_selection", "vertical_slash_sinks", "clusters"])
def test_bitwise_repeatable(name):
    q, k, v = random_qkv(1, 2, 2, 64, 64, 12, seed=3)
    runs = [_grads(PATTERNS[name], q, k, v, "triton") for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_transposed_selection_lists_each_buckets_query_tiles_ascending():
    gen = torch.Generator().manual_seed(0)
    b, hr, tq, u, ck = 2, 3, 9, 4, 7
    lists = torch.full((b, hr, tq, u), -1, dtype=torch.int32)
    for index in range(b * hr * tq):
        chosen = torch.randperm(ck, generator=gen)[:int(torch.randint(0, u + 1, (1,), generator=gen))]
        lists.view(-1, u)[index, :len(chosen)] = chosen.sort().values.to(torch.int32)
    tiles = RoutedTiles(*(torch.zeros(1),) * 4, torch.zeros(1, ck + 1), lists, torch.zeros(1),
                        torch.zeros(1))
    t_ptr, t_idx = transposed_selection(tiles)
    assert t_ptr.shape == (b, hr, ck + 1) and t_idx.shape == (b, hr, tq * u)
    for i in range(b):
        for h in range(hr):
            for c in range(ck):
                want = [m for m in range(tq) if c in lists[i, h, m].tolist()]
                got = t_idx[i, h, t_ptr[i, h, c]:t_ptr[i, h, c + 1]].tolist()
                assert got == want, (i, h, c)


@pytest.mark.parametrize("bias_shape, q_len", [((4, 70), 70), ((2, 4, 70), 29)],
                         ids=["per_head", "per_batch_lq<lkv"])
def test_topk_keys_gradients_include_the_key_bias(bias_shape, q_len, no_torch_path):
    """DMA: the key bias is on every score, so it gets dS summed over the rows (per batch
    row, summed where it broadcasts); the top-k it decides is not differentiated."""
    q, k, v = random_qkv(2, 4, 2, q_len, 70, 16, seed=q_len)
    bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(1))

    def run(backend, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v, bias)]
        pattern = ((sf.causal() & sf.topk_keys(leaves[3], 12, query_block=16))
                   | sf.sliding_window(8))
        out, lse = sf.attention(*leaves[:3], pattern, enable_gqa=True, backend=backend,
                                return_lse=True)
        gen = torch.Generator().manual_seed(3)
        g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        g_lse = torch.where(torch.isinf(lse), 0.0, torch.randn(lse.shape, generator=gen,
                                                               dtype=torch.float64).to(lse.dtype))
        return (out, lse, *torch.autograd.grad((out, lse), leaves, (g_out, g_lse)))

    got, want = run("triton", torch.float32), run("reference", torch.float64)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4, msg=label)
    assert got[-1].shape == bias.shape and got[-1].abs().max() > 0


@pytest.mark.parametrize("name", ["nsa_selection", "vertical_slash_sinks"])
def test_explain_shows_the_backward_dag_at_the_sizes_a_call_builds(name, monkeypatch):
    pattern = PATTERNS[name]
    built = []
    real = dispatch.backward_routing
    monkeypatch.setattr(dispatch, "backward_routing",
                        lambda *args: built.append(real(*args)) or built[-1])
    q, k, v = random_qkv(1, 2, 1, 70, 70, 16, seed=5)
    _grads(pattern, q, k, v, "triton")
    p = dispatch.cached_plan(dispatch.compile_pattern(pattern), 70, 70, 16, torch.float32,
                             "interpret")
    text = p.explain()
    assert "backward    generated" in text
    routed, = built
    if name == "vertical_slash_sinks":  # the dK/dV tile map, turned around
        kv_tiles, q_tiles = routed.dkdv.tile_map.shape[2:]
        assert f"per key tile: byte map [{kv_tiles}, {q_tiles}]" in text
        assert routed.dkdv.tile_span.shape[2] == kv_tiles
    else:
        ck = routed.t_ptr.shape[-1] - 1
        assert f"CSR: pointers [{ck + 1}], query tiles [{routed.t_idx.shape[-1]}]" in text
    assert f"dK/dV {p.backward_dkdv.block_m}x{p.backward_dkdv.block_n}" in text
    for step in ("transpose0", "dq ", "dkdv "):
        assert f"\n  {step}" in text


@pytest.mark.parametrize("name", ["moba", "threshold_and_sinks", "topk_chunks", "hierarchical",
                                  "vertical_slash_sinks", "clusters"])
def test_warm_training_steps_never_read_a_tensor_on_the_host(name, monkeypatch):
    """A warm forward + backward (routing, tile lists, their backward layout and
    transpose, the kernels) reads no tensor value on the host: on a GPU, no sync, and the
    step can be captured in a CUDA graph."""
    q, k, v = random_qkv(1, 2, 2, 70, 70, 12, seed=13)
    _grads(PATTERNS[name], q, k, v, "triton")  # warm: plans, caches
    reads = host_reads_during(lambda: _grads(PATTERNS[name], q, k, v, "triton"), monkeypatch)
    assert not reads, reads


def test_build_lists_the_routed_backward_and_decode_kernels():
    """`sparseforge build` of a routed spec with backward=True builds its dQ and dK/dV
    kernels; a decode-short spec its routed decode kernel (rendered here; compiling them
    for sm_80/sm_90 is tests/codegen/test_compile.py's routed variants)."""
    from sparseforge.aot.build import plan_jobs

    specs = [sf.BuildSpec("moba_train", PATTERNS["moba"], q_len=4096, kv_len=4096, head_dim=64,
                          dtype="bfloat16", heads=4, backward=True),
             sf.BuildSpec("moba_serve", PATTERNS["moba"], q_len=4, kv_len=4096, head_dim=64,
                          dtype="bfloat16", heads=4),
             sf.BuildSpec("lines_train", PATTERNS["vertical_slash_sinks"], q_len=4096,
                          kv_len=4096, head_dim=64, dtype="bfloat16", heads=4, backward=True),
             sf.BuildSpec("clusters_train", sf.causal() & sf.clusters(torch.randn(4, 8, 64)),
                          q_len=4096, kv_len=4096, head_dim=64, dtype="bfloat16", heads=4,
                          backward=True)]
    jobs, uses = plan_jobs(specs, ["sm_80", "sm_90"])
    kinds = {name: {(jobs[key].arch, jobs[key].kind) for key in keys}
             for name, keys in uses.items()}
    for arch in ("sm_80", "sm_90"):
        for name in ("moba_train", "lines_train", "clusters_train"):
            assert {(arch, k) for k in ("forward", "backward_dq", "backward_dkdv")} <= kinds[name]
        assert (arch, "decode") in kinds["moba_serve"]


def test_a_learned_rel_bias_table_gets_its_gradient_through_the_routed_kernels(no_torch_path):
    """Only the table wants a gradient: the routed call still runs under autograd."""
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, seed=1)
    table = torch.randn(2, 9, requires_grad=True)
    reference = table.detach().double().requires_grad_()

    def pattern(t):
        return (sf.causal() & sf.topk_blocks(8, 2)) & sf.rel_bias(t)

    sf.attention(q, k, v, pattern(table), backend="triton").square().sum().backward()
    sf.reference_attention(q.double(), k.double(), v.double(),
                           pattern(reference)).square().sum().backward()
    torch.testing.assert_close(table.grad.double(), reference.grad, atol=1e-4, rtol=1e-4)


def test_per_batch_chunk_boundaries(no_torch_path):
    """DHSA-style chunks that differ per batch row: each row's dK/dV walks its own
    transposed selection and its own key buckets."""
    boundaries = torch.tensor([[0, 20, 45, 55, 70], [0, 5, 33, 60, 70]])
    pattern = sf.topk_chunks(boundaries, 2) | sf.sinks(3)
    q, k, v = random_qkv(2, 4, 2, 70, 70, 12, seed=9)
    got = _grads(pattern, q, k, v, "triton")
    want = _grads(pattern, q.double(), k.double(), v.double(), "reference")
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4, msg=label)
