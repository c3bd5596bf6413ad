import pytest
import torch

import sparseforge as sf
from sparseforge.ir.neighborhood import NeighborhoodPart
from sparseforge.planner.ranges import tile_segments


def test_explain_reports_tiles_density_and_utilisation():
    p = sf.plan(sf.sliding_window(256) | sf.sinks(4), q_len=4096, kv_len=4096, head_dim=64,
                target="sm_90")
    text = p.explain()
    for word in ("visited", "full", "partial", "density", "utilisation", "no index tensor"):
        assert word in text
    st = p.stats[0]
    assert st.visited < st.q_tiles * st.kv_tiles * 0.2
    assert 0 < st.utilisation <= 1 and st.full > 0
    # the allowed pairs counted inside visited tiles are all the mask's pairs
    assert st.useful_pairs == int(sf.dense_mask(p.pattern, 4096, 4096).sum())


def test_dilation_groups_raise_utilisation():
    pattern = sf.window(64, 64, dilation=4)
    grouped = sf.plan(pattern, q_len=4096, kv_len=4096, head_dim=64, target="sm_90")
    flat = sf.plan(pattern, q_len=4096, kv_len=4096, head_dim=64, target="sm_90", groups=1)
    assert grouped.kernels[0].groups == 4
    assert grouped.stats[0].utilisation > 2 * flat.stats[0].utilisation
    assert grouped.stats[0].full > 0 and flat.stats[0].full == 0
    assert grouped.stats[0].useful_pairs == flat.stats[0].useful_pairs


def test_hull_fallback_when_segments_do_not_pay():
    # the sinks' tile is inside the window's range for every query tile: one hull suffices
    p = sf.plan(sf.window(4000, 0) | sf.sinks(4), q_len=4096, kv_len=4096, head_dim=64,
                target="sm_90")
    assert p.kernels[0].schedule == "hull"
    sparse = sf.plan(sf.sliding_window(256) | sf.sinks(4), q_len=32768, kv_len=32768,
                     head_dim=64, target="sm_90")
    assert sparse.kernels[0].schedule == "segments"


def test_plan_is_data_and_reused():
    a = sf.plan(sf.causal(), q_len=100, kv_len=100, head_dim=32)
    b = sf.plan(sf.causal(), q_len=100, kv_len=100, head_dim=32)
    assert a == b and hash(a) == hash(b)
    assert len(tile_segments(sf.causal() | sf.sinks(3))) == 2


@pytest.mark.parametrize("target, d, dtype", [("sm_90", 128, "bfloat16"), ("sm_80", 64, "float16"),
                                               ("sm_90", 256, "float32"), ("cpu", 64, "float32")])
def test_tile_config_by_target(target, d, dtype):
    p = sf.plan(sf.causal(), q_len=2048, kv_len=2048, head_dim=d, dtype=dtype, target=target)
    assert p.block_m >= 16 and p.block_n >= 16
    assert f"BLOCK_M={p.block_m}" in p.explain()


def test_save_png(tmp_path):
    p = sf.plan(sf.sliding_window(64) | sf.sinks(2), q_len=300, kv_len=300, head_dim=32)
    p.save_png(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_large_plans_draw_at_tile_resolution(tmp_path, monkeypatch):
    """A 32k x 32k plan draws one cell per tile from its visit matrices: the mask is never
    evaluated (that took ~50 s), and the cells are what the schedule visits."""
    from sparseforge.planner import picture

    def no_mask(*args, **kwargs):
        raise AssertionError("the mask was evaluated for a large plan")

    monkeypatch.setattr(picture, "pair_mask", no_mask)
    p = sf.plan(sf.sliding_window(256) | sf.sinks(4), q_len=32768, kv_len=32768, head_dim=64,
                target="sm_90")
    p.save_png(tmp_path / "big.png")
    assert (tmp_path / "big.png").read_bytes()[:4] == b"\x89PNG"
    classes = picture.tile_classes(p)
    assert classes.shape == (32768 // p.block_m, 32768 // p.block_n)
    sched = p.schedules[0][0]
    assert ((classes > 0) == sched.visit).all() and ((classes == 2) == sched.full).all()
    assert (classes[:, 0] > 0).all()  # every query tile reads the sinks' tile


def test_tiles_are_priced_by_their_sass_issue_work():
    # sm_90, D=128: a causal mask fills big tiles, whose loops issue least per score; a
    # 128-wide window wastes most of a 128 x 128 tile, so smaller tiles win there
    dense = sf.plan(sf.causal(), q_len=8192, kv_len=8192, head_dim=128, target="sm_90")
    sparse = sf.plan(sf.sliding_window(128), q_len=8192, kv_len=8192, head_dim=128,
                     target="sm_90")
    assert (dense.block_m, dense.block_n) == (128, 128)
    assert (sparse.block_m, sparse.block_n) == (64, 64)
    for p in (dense, sparse):
        assert len(p.tile_choices) == 3
        assert all(c.config.full_work < c.config.partial_work for c in p.tile_choices)
        best = min(p.tile_choices, key=lambda c: c.cost)
        assert best.config == p.config
        chosen = [line for line in p.explain().splitlines() if "<- chosen" in line]
        assert len(chosen) == 1 and f"{p.block_m}x{p.block_n}" in chosen[0]
    # the big tile's full-tile loop is the leanest per score in the table
    works = {(c.config.block_m, c.config.block_n): c.config.full_work for c in dense.tile_choices}
    assert works[(128, 128)] == min(works.values())
    # a routed plan's tiles follow fixed rules: nothing priced is shown as chosen
    routed = sf.plan(sf.causal() & sf.topk_blocks(256, 2), q_len=4096, kv_len=4096,
                     head_dim=128, target="sm_90")
    assert routed.tile_choices == () and "<- chosen" not in routed.explain()


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_a_window_table_on_a_grid_part_takes_smaller_forward_tiles(target):
    """A window-offset table read on a part of its grid (context parallelism) moves its
    positions onto the grid beside the predicate's own coordinates: 128 x 64 spilled on
    sm_90, so the forward takes 64 x 64 over 8 warps; the whole grid keeps its tiles."""
    grid = sf.neighborhood((128, 64), 7)
    table = sf.rel_bias(torch.zeros(8, 13, 13))
    part = sf.plan(NeighborhoodPart(grid, 2048, 2048) & table, q_len=2048, kv_len=4096,
                   head_dim=64, dtype="bfloat16", target=target)
    whole = sf.plan(grid & table, q_len=8192, kv_len=8192, head_dim=64, dtype="bfloat16",
                    target=target, tiled=False)
    assert (part.block_m, part.block_n, part.config.num_warps) == (64, 64, 8)
    assert whole.block_m * whole.block_n > 64 * 64
