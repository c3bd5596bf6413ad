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
                   block_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Bool ``visit[Tq, Tk]`` and ``full[Tq, Tk]`` for one group's lengths."""
    tq = max(1, -(-q_len // block_m))
    tk = max(0, -(-kv_len // block_n))
    visit = np.zeros((tq, tk), dtype=bool)
    full = np.zeros((tq, tk), dtype=bool)
    if q_len == 0 or kv_len == 0:
        return visit[: max(0, -(-q_len // block_m))], full[: max(0, -(-q_len // block_m))]
    env = environment(q_len, kv_len, block_m, block_n)
    cols = np.arange(tk)[None, :]
    for seg in segments:
        lo, hi, flo, fhi = (np.broadcast_to(a, (tq,))[:, None] for a in seg.evaluate(env))
        visit |= (cols >= lo) & (cols < hi)
        full |= (cols >= flo) & (cols < fhi)
    return visit, full & visit
