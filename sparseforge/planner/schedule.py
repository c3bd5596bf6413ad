"""Numeric tile schedules: the closed-form segments evaluated over every query tile.

The kernel computes these bounds itself from the same expressions; the planner
evaluates them to count work and pick configurations, and the CPU path executes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ranges import TileSegment, environment


@dataclass(frozen=True)
class GroupGeometry:
    """Where dilation group ``g`` lives: rows ``q_start::groups``, keys ``g::groups``."""

    q_start: int
    kv_start: int
    q_len: int
    kv_len: int


@dataclass(frozen=True, eq=False)
class GroupSchedule:
    """One dilation group's tiles: ``visit[Tq, Tk]`` and ``full[Tq, Tk]`` (read-only)."""

    geometry: GroupGeometry
    visit: np.ndarray
    full: np.ndarray


def group_geometry(q_len: int, kv_len: int, groups: int) -> list[GroupGeometry]:
    """Split positions by residue mod ``groups`` (of the absolute query position)."""
    delta = kv_len - q_len
    out = []
    for g in range(groups):
        kv_n = max(0, -(-(kv_len - g) // groups))
        q_start = (g - delta) % groups  # first row whose absolute position is = g (mod groups)
        q_n = max(0, -(-(q_len - q_start) // groups))
        out.append(GroupGeometry(q_start, g, q_n, kv_n))
    return out


def visit_matrices(segments: list[TileSegment], q_len: int, kv_len: int, block_m: int,
                   block_n: int, side: str = "query") -> tuple[np.ndarray, np.ndarray]:
    """Bool ``visit[Tq, Tk]`` and ``full[Tq, Tk]`` for one group's lengths; key-side
    segments (``side="key"``) give ``[Tk, Tq]``: the query tiles each kv tile walks."""
    rows_len, rows_block, cols_len, cols_block = (
        (q_len, block_m, kv_len, block_n) if side == "query" else (kv_len, block_n, q_len, block_m))
    tr = max(1, -(-rows_len // rows_block))
    tc = max(0, -(-cols_len // cols_block))
    visit = np.zeros((tr, tc), dtype=bool)
    full = np.zeros((tr, tc), dtype=bool)
    if q_len == 0 or kv_len == 0:
        return visit[: max(0, -(-rows_len // rows_block))], full[: max(0, -(-rows_len // rows_block))]
    env = environment(q_len, kv_len, block_m, block_n, side=side)
    cols = np.arange(tc)[None, :]
    for seg in segments:
        for bounds in seg.run_bounds(env, side):
            lo, hi, flo, fhi = (np.broadcast_to(a, (tr,))[:, None] for a in bounds)
            visit |= (cols >= lo) & (cols < hi)
            full |= (cols >= flo) & (cols < fhi)
    return visit, full & visit
