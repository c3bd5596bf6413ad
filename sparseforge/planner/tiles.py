"""Tile configurations per target, and the cost model that picks one.

A config is a plan decision recorded in the plan, so AOT builds and JIT dispatch pick
the same kernel. The candidate lists are ordered by preference; the cost model picks
the cheapest estimate, where a visited tile costs its area divided by how efficiently
that tile shape runs, plus a fixed per-tile overhead (large on CPU, where every tile is
a Python-level gather).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from .._env import triton_version

TARGETS = ("sm_80", "sm_90", "cpu", "interpret")

#: The CPU executor runs each contiguous run of a query tile's kv tiles as its own
#: window; a tiled N-D layout splits a row of tiles into several runs (neighbouring tile
#: rows), i.e. more, smaller kernel calls. Measured at L=4096 on the 2-core dev CPU
#: (cpu_flash.run_forward, both layouts): 2-D 7x7 tiled 109 ms / 420 tiles vs untiled
#: 44 ms / 448 tiles; 2-D 13x13 59 ms / 484 vs 70 ms / 832; 3-D 5x5x5 90 ms / 576 vs
#: 93 ms / 1280. So on the CPU a tiled layout must promise a quarter less work to win.
CPU_TILED_LAYOUT_PENALTY = 4 / 3
#: issue work per tile shape from compiled SASS (``python -m sparseforge.aot.tile_costs``)
COST_TABLE_PATH = Path(__file__).with_name("tile_costs.json")
#: the issue work (warp-instructions per 1000 scores) assumed for a tile the table lacks
DEFAULT_WORK = 300.0


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    efficiency: float = 1.0  # relative throughput of a full tile of this shape
    tile_overhead: float = 0.0  # fixed cost per visited tile, in units of pair-work
    #: warp-instructions per 1000 scores of a full / partial tile on the target, read from
    #: compiled SASS (``tile_costs.json``); None where the table has no entry
    full_work: float | None = None
    partial_work: float | None = None

    def __repr__(self) -> str:
        return (f"TileConfig(BLOCK_M={self.block_m}, BLOCK_N={self.block_n}, "
                f"num_warps={self.num_warps}, num_stages={self.num_stages})")


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def candidate_configs(target: str, head_dim: int, dtype: str, scored: bool = False) -> list[TileConfig]:
    """Forward tiles to choose from; ``scored``: the kernels apply score modifiers, whose
    [BM, BN] bias tiles (ALiBi offsets, gathered rel_bias entries, tanh) must fit beside
    the scores: 16-bit tiles up to D=128 come from ``_SCORED_CONFIGS`` then."""
    key = (target, padded_head_dim(head_dim))
    if scored and dtype != "float32" and key in _SCORED_CONFIGS:
        return list(_SCORED_CONFIGS[key])
    return _candidate_configs(target, head_dim, dtype)


def _candidate_configs(target: str, head_dim: int, dtype: str) -> list[TileConfig]:
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    d = padded_head_dim(head_dim)
    if target == "interpret":
        # Small tiles so that short test sequences still span several tiles.
        return [TileConfig(32, 32, 4, 1), TileConfig(16, 16, 4, 1)]
    if target == "cpu":
        # The CPU executor (runtime/cpu_flash.py) hands whole batches of tiles to one
        # fused kernel call, so tiles only set the granularity of masks and skipped work:
        # 64x64 was fastest or within noise of it for sliding window, causal, documents and
        # 2-D neighbourhoods at L=4096 (32x32 .. 256x256 measured on the 2-core dev CPU).
        # The per-tile overhead still prices tiled vs untiled N-D layouts.
        return [TileConfig(64, 64, tile_overhead=1200.0)]
    configs = _GPU_CONFIGS[(target, "float32" if dtype == "float32" else "16bit", d)]
    if head_dim != d:  # the head-dim mask on Q, K and V tiles takes registers too
        configs = [c for c in configs if (target, d, c.block_m, c.block_n) not in _PADDED_SPILLS]
    if dtype == "float32":
        return list(configs)
    return [priced(target, d, cfg) for cfg in configs]


def gpu_candidates() -> dict[tuple[str, int], list[TileConfig]]:
    """(arch, padded head dim) -> the 16-bit forward candidates the cost table prices."""
    return {(arch, d): list(configs) for (arch, kind, d), configs in _GPU_CONFIGS.items()
            if kind == "16bit"}


@functools.cache
def cost_table() -> dict[tuple, tuple[float, float]]:
    """(arch, padded head dim, BLOCK_M, BLOCK_N, warps, stages) -> (full, partial) issue
    work of the forward kernel, from the committed table."""
    data = json.loads(COST_TABLE_PATH.read_text())
    return {(e["arch"], e["head_dim"], e["block_m"], e["block_n"], e["num_warps"], e["num_stages"]):
            (e["full"], e["partial"]) for e in data["entries"]}


def priced(target: str, head_dim: int, cfg: TileConfig) -> TileConfig:
    """``cfg`` with its issue work on ``target`` from the cost table (unchanged if absent)."""
    key = (target, padded_head_dim(head_dim), cfg.block_m, cfg.block_n, cfg.num_warps,
           cfg.num_stages)
    work = cost_table().get(key)
    if work is None:
        return cfg
    return dataclasses.replace(cfg, full_work=work[0], partial_work=work[1])


# Spill-free on the template variants (cuobjdump: no stack/local bytes), found by
# compiling each candidate for the target; tests/codegen/test_compile.py keeps it so.
# fp32 uses an IEEE (FMA) dot, whose operands live in registers: only small tiles fit.
_C = TileConfig
_GPU_CONFIGS = {
    ("sm_90", "16bit", 16): [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],
    ("sm_90", "16bit", 32): [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],
    ("sm_90", "16bit", 64): [_C(128, 128, 8, 3), _C(128, 64, 8, 3), _C(64, 64, 4, 3)],
    ("sm_90", "16bit", 128): [_C(128, 128, 8, 2), _C(128, 64, 8, 2), _C(64, 64, 4, 2)],
    # every 64-row tile spilled at D=256; 32 rows fit but are below wgmma's 64-row
    # warpgroup tile, so these kernels use mma.sync (a known gap, see docs/planner.md)
    ("sm_90", "16bit", 256): [_C(32, 32, 4, 3, 0.6)],
    ("sm_80", "16bit", 16): [_C(128, 64, 8, 2), _C(64, 64, 4, 2)],
    ("sm_80", "16bit", 32): [_C(128, 64, 8, 2), _C(64, 64, 4, 2)],
    ("sm_80", "16bit", 64): [_C(128, 64, 8, 2), _C(64, 64, 8, 2, 0.85)],
    ("sm_80", "16bit", 128): [_C(128, 64, 8, 2), _C(128, 32, 8, 2, 0.9), _C(64, 32, 4, 2, 0.8)],
    ("sm_80", "16bit", 256): [_C(64, 64, 8, 2), _C(32, 32, 4, 2, 0.6)],
}
# Tiles that spill once the head dim is padded (D=80 at 128 x 128 on sm_90: 8 stack bytes)
_PADDED_SPILLS = {("sm_90", 128, 128, 128)}
# With score modifiers (the scores_* variants, swept with cuobjdump): 128 x 128 and
# 4-warp 64 x 64 tiles spilled at D=64, every 128-row tile at D=128.
_SCORED_CONFIGS = {}
for _arch, _stages in (("sm_80", 2), ("sm_90", 3)):
    for _d in (16, 32, 64):
        _SCORED_CONFIGS[(_arch, _d)] = [_C(128, 64, 8, _stages)]
    _SCORED_CONFIGS[(_arch, 128)] = [_C(64, 32, 8, 2, 0.8)]
for _arch in ("sm_80", "sm_90"):
    for _d, _cfg in ((16, _C(32, 16, 4, 2)), (32, _C(32, 16, 4, 2)), (64, _C(32, 16, 4, 2)),
                     (128, _C(16, 16, 4, 2)),
                     (256, _C(16, 16, 4, 1))):
        _GPU_CONFIGS[(_arch, "float32", _d)] = [_cfg]


def tiled_forward_config(cfg: TileConfig, target: str, head_dim: int, dtype: str,
                         scored: bool, ndim: int) -> TileConfig:
    """The forward tiles of an N-D tiled layout planned from candidate ``cfg``. A 3-D
    layout with score modifiers holds three coordinates per token beside the modifiers'
    positions: its 4- and 8-warp 128 x 64 and 4-warp 64 x 64 tiles at D <= 64 kept 56-72
    stack bytes (cuobjdump, rel_bias on a causal, dilated 3x7x7 window); 64 x 64 over 8
    warps compiles clean on sm_80 and sm_90."""
    if (scored and ndim == 3 and target in ("sm_80", "sm_90") and dtype != "float32"
            and padded_head_dim(head_dim) <= 64):
        return TileConfig(64, 64, 8, cfg.num_stages, 0.85)
    return cfg


def grid_part_forward_config(cfg: TileConfig, target: str, dtype: str) -> TileConfig:
    """The forward tiles of a pattern whose window-offset rel_bias table is read on a part
    of its grid (context parallelism: ``scores.RelGrid`` offsets). The table's grid
    coordinates come from positions moved by the part's offsets, beside the predicate's
    own: 128 x 64 over 8 warps kept 40 stack bytes on sm_90 (cuobjdump, a 7 x 7 window on
    a 128 x 64 grid with a 13 x 13 table, D=64); 64 x 64 over 8 warps compiles clean on
    sm_80 and sm_90."""
    if target in ("sm_80", "sm_90") and dtype != "float32" and cfg.block_m * cfg.block_n > 64 * 64:
        return TileConfig(64, 64, 8, cfg.num_stages, 0.85)
    return cfg


def backward_configs(target: str, head_dim: int, dtype: str, scored: bool = False,
                     tiled: bool = False, lean_walk: bool = True) -> tuple[TileConfig, TileConfig]:
    """Tiles of the backward (dQ kernel, dK/dV kernel). Smaller than the forward's: a
    dK/dV program keeps K, V and two fp32 [BLOCK_N, D] accumulators of its key tile
    live across all its query tiles, and both kernels recompute P and dP per tile.
    ``scored``: the kernels apply score modifiers (and dK/dV gathers the rel_bias
    gradient), which needs smaller 16-bit tiles up to D=128. ``tiled``: an N-D tiled
    layout, whose modifiers first map run positions back (``Tiled.original_positions``):
    sm_80's scored dQ then needs 32-row tiles (its 64-row tile spilled, cuobjdump).
    ``lean_walk``: every dK/dV kernel walks one segment, with no dilation groups and no
    document ids; sm_90's big 16-bit dK/dV tiles (64 or 32 query rows by 128 keys over 8
    warps, HGMMA) fit in registers only then: others take ``_BUSY_DKDV``."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    if target == "interpret":
        cfg = TileConfig(16, 32, 4, 1)  # unequal on purpose: inverted bounds get tested
        return cfg, cfg
    if target == "cpu":
        return TileConfig(64, 64), TileConfig(64, 64)
    d = max(64, padded_head_dim(head_dim))
    # swept with cuobjdump on the scores_* variants (64-row dK/dV tiles and 64 x 64 dQ
    # tiles spill with modifiers; fp32 dK/dV differs per target)
    if scored and dtype != "float32" and d <= 128:
        dq = _C(32, 32, 4, 2) if tiled and target == "sm_80" else _C(64, 32, 8, 2)
        return dq, _C(32, 32, 8, 1)
    if scored and dtype == "float32" and d == 64:
        dq, _ = _BACKWARD_CONFIGS[(target, "float32", d)]
        return dq, (_C(32, 16, 4, 1) if target == "sm_80" else _C(16, 32, 8, 1))
    dq, dkdv = _BACKWARD_CONFIGS[(target, "float32" if dtype == "float32" else "16bit", d)]
    if (target, d) in _BUSY_DKDV and dtype != "float32":
        if tiled or not lean_walk:
            dkdv = _BUSY_DKDV[(target, d)]
        elif triton_version() < (3, 9):
            # Triton 3.6 spilled these tiles with two stages and fits them with one (the
            # reverse of 3.9; both read with cuobjdump)
            dkdv = dataclasses.replace(dkdv, num_stages=1)
    return dq, dkdv


# (dQ, dK/dV) per target, dtype class and padded head dim (<= 64 share one entry).
# Spill-free on every template variant (tests/codegen/test_compile.py), found by
# compiling candidates for each target with the cuobjdump resource report.
_BACKWARD_CONFIGS = {
    ("sm_90", "16bit", 64): (_C(128, 64, 8, 2), _C(64, 128, 8, 2)),
    ("sm_90", "16bit", 128): (_C(128, 64, 8, 2), _C(32, 128, 8, 2)),
    ("sm_90", "16bit", 256): (_C(32, 32, 8, 1), _C(32, 32, 8, 1)),
    ("sm_80", "16bit", 64): (_C(64, 32, 4, 2), _C(64, 32, 8, 1)),
    ("sm_80", "16bit", 128): (_C(64, 64, 8, 2), _C(32, 32, 8, 1)),
    ("sm_80", "16bit", 256): (_C(32, 32, 8, 1), _C(16, 32, 8, 1)),
}
# sm_90 dK/dV tiles for walks that hold more state (several segments, dilation groups,
# document ids, tiled layouts): the big tiles above spilled there (cuobjdump)
_BUSY_DKDV = {("sm_90", 64): _C(32, 64, 4, 1), ("sm_90", 128): _C(32, 32, 8, 1)}
for _arch in ("sm_80", "sm_90"):
    # sm_80's 4-warp 32 x 16 fp32 dK/dV tile kept 8 stack bytes at D=32 (cuobjdump)
    _small = _C(32, 16, 8 if _arch == "sm_80" else 4, 1)
    for _d, _dkdv in ((64, _small), (128, _C(16, 16, 8, 1)), (256, _C(16, 16, 8, 1))):
        _BACKWARD_CONFIGS[(_arch, "float32", _d)] = (_C(16, 16, 4, 1), _dkdv)


#: the longest query a decode kernel serves (new tokens per step, speculative decoding)
DECODE_MAX_Q = 16


def decode_config(target: str, head_dim: int, dtype: str, scored: bool = False) -> TileConfig:
    """Tiles of the decode kernel: BLOCK_M rows hold (query head, new token) pairs of one
    GQA group, BLOCK_N is the kv tile each split walks. BLOCK_M >= DECODE_MAX_Q always,
    so every decode-short query fits one program. ``scored``: with score modifiers."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    if target in ("interpret", "cpu"):
        return TileConfig(16, 16, 4, 1)
    d = padded_head_dim(head_dim)
    if dtype == "float32":
        return TileConfig(16, 32, 4, 1) if d <= 64 else TileConfig(16, 16, 4, 1)
    # sm_80 keeps mma operands in registers: above D=64 it needs 8 warps to stay spill-free
    # (sm_90 too with score modifiers)
    warps = 8 if (target == "sm_80" or scored) and d > 64 else 4
    if d <= 128:
        return TileConfig(64, 64, warps, 2)
    return TileConfig(32, 32, warps, 1)


def estimated_cost(config: TileConfig, visited_tiles: int, partial_tiles: int) -> float:
    """Relative time of a schedule, in warp-instructions issued (thousands). A priced
    GPU tile (``full_work``/``partial_work`` from compiled SASS) costs its area times
    the issue work of its kind of tile; otherwise tile work / efficiency at
    ``DEFAULT_WORK``, partial tiles a little dearer, plus a fixed cost per tile (CPU)."""
    area = config.block_m * config.block_n
    if config.full_work is not None:
        full_tiles = visited_tiles - partial_tiles
        return area * (full_tiles * config.full_work + partial_tiles * config.partial_work) / 1e6
    work = (visited_tiles + 0.15 * partial_tiles) * area / config.efficiency
    return (work + config.tile_overhead * visited_tiles) * DEFAULT_WORK / 1e6
