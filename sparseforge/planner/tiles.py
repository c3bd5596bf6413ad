"""Tile configurations per target, and the cost model that picks one.

A config is a plan decision recorded in the plan, so AOT builds and JIT dispatch pick
the same kernel. The candidate lists are ordered by preference; the cost model picks
the cheapest estimate, where a visited tile costs its area divided by how efficiently
that tile shape runs, plus a fixed per-tile overhead (large on CPU, where every tile is
a Python-level gather).
"""

from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("sm_80", "sm_90", "cpu", "interpret")


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    efficiency: float = 1.0  # relative throughput of a full tile of this shape
    tile_overhead: float = 0.0  # fixed cost per visited tile, in units of pair-work

    def __repr__(self) -> str:
        return (f"TileConfig(BLOCK_M={self.block_m}, BLOCK_N={self.block_n}, "
                f"num_warps={self.num_warps}, num_stages={self.num_stages})")


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def candidate_configs(target: str, head_dim: int, dtype: str) -> list[TileConfig]:
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    d = padded_head_dim(head_dim)
    if target == "interpret":
        # Small tiles so that short test sequences still span several tiles.
        return [TileConfig(32, 32, 4, 1), TileConfig(16, 16, 4, 1)]
    if target == "cpu":
        return [TileConfig(128, 64, tile_overhead=6000.0), TileConfig(64, 64, tile_overhead=6000.0),
                TileConfig(128, 128, tile_overhead=6000.0), TileConfig(256, 128, tile_overhead=6000.0)]
    wide = dtype == "float32"  # 4-byte operands: halve the kv tile to stay in registers
    stages = 3 if target == "sm_90" else 2
    if d <= 64:
        cfgs = [TileConfig(128, 64, 4, stages, 1.0), TileConfig(64, 64, 4, stages, 0.85),
                TileConfig(128, 128, 8, stages, 1.05)]
    elif d <= 128:
        cfgs = [TileConfig(128, 64, 8, stages, 1.0), TileConfig(64, 64, 4, stages, 0.85),
                TileConfig(128, 32, 4, stages, 0.8)]
    else:
        cfgs = [TileConfig(64, 64, 4, 2, 1.0), TileConfig(64, 32, 4, 2, 0.85)]
    if wide:
        cfgs = [TileConfig(c.block_m, max(16, c.block_n // 2), c.num_warps, 2, c.efficiency * 0.9)
                for c in cfgs if c.block_m * d <= 128 * 128]
    return cfgs


def estimated_cost(config: TileConfig, visited_tiles: int, partial_tiles: int) -> float:
    """Relative time of a schedule: tile work / efficiency, partial tiles a little dearer."""
    area = config.block_m * config.block_n
    work = (visited_tiles + 0.15 * partial_tiles) * area / config.efficiency
    return work + config.tile_overhead * visited_tiles
