"""Call-time tile sets for patterns that hold document ids or mask tables (the CPU
executor's input).

The plan cannot see document ids (they are run-time data), so its schedule visits every
tile a ``documents(...)`` term allows structurally, with no full tile: correct, but it
costs the whole rectangle plus a mask on every pair. The CPU executor refines that
schedule once per ids tensor: each tile's smallest and largest id bound which other
tiles can share a document (exact for packed, sorted ids; a safe superset otherwise),
and a pair of tiles holding one and the same id throughout is full. The refinement
walks the pattern's union/intersection tree with the plan's own segments at the other
leaves, so ``documents(ids) & causal()``, prefix-LM per document and unions of several
id terms all get tight tiles. A ``mask_table`` gives its tiles directly: a tile is
visited where the table holds a true pair, full where every pair of a whole tile is.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ir.affine import TopLeft
from ..ir.nodes import Documents, Intersection, MaskTable, Pattern, Union
from ..planner.ranges import tile_segments
from ..planner.schedule import GroupSchedule, visit_matrices
from ..semantics import document_ids, strip_scores, table_mask


def refinable(plan, kernel) -> bool:
    """Whether the kernel's tiles can be refined from its document ids: it holds some,
    runs on original token order and has no dilation groups (the leaves' segments are
    then stated on the same lengths as the schedule)."""
    return ((kernel.has_documents or kernel.has_tables) and kernel.groups == 1
            and plan.layout is None)


def refined_schedule(plan, call_pattern: Pattern, sched: GroupSchedule) -> list[GroupSchedule]:
    """The schedule narrowed by the call's document ids: one per batch row of the ids
    (a single one when the ids are shared by the batch)."""
    q_len, kv_len = plan.q_len, plan.kv_len
    visit, full = _tile_sets(strip_scores(call_pattern), plan, q_len, kv_len)
    visit = visit & sched.visit
    full = full & visit
    return [GroupSchedule(sched.geometry, visit[b], full[b]) for b in range(visit.shape[0])]


def _tile_sets(pattern: Pattern, plan, q_len: int, kv_len: int,
               top_left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(visit, full), bool ``[B, Tq, Tk]`` (B = 1 unless ids are batched). ``top_left``:
    the leaves sit inside a ``top_left`` (ids and tables index rows either way; the
    closed-form leaves are aligned to the first key)."""
    if isinstance(pattern, TopLeft):
        return _tile_sets(pattern.pattern, plan, q_len, kv_len, True)
    if isinstance(pattern, (Union, Intersection)):
        parts = [_tile_sets(p, plan, q_len, kv_len, top_left) for p in pattern.parts]
        combine = np.logical_or if isinstance(pattern, Union) else np.logical_and
        visit, full = parts[0]
        for v, f in parts[1:]:
            visit, full = combine(visit, v), combine(full, f)
        return visit, full
    if isinstance(pattern, Documents):
        return _document_tiles(pattern, q_len, kv_len, plan.block_m, plan.block_n)
    if isinstance(pattern, MaskTable):
        return _table_tiles(pattern, q_len, kv_len, plan.block_m, plan.block_n)
    leaf = TopLeft(pattern) if top_left else pattern
    visit, full = visit_matrices(tile_segments(leaf), q_len, kv_len, plan.block_m, plan.block_n)
    return visit[None], full[None]


def _document_tiles(pat: Documents, q_len: int, kv_len: int, bm: int, bn: int):
    ids_q, ids_k = (x.cpu() for x in document_ids(pat, q_len, kv_len))
    q_lo, q_hi = _tile_range(ids_q, bm)
    k_lo, k_hi = _tile_range(ids_k, bn)
    visit = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    k_whole = torch.arange(k_lo.shape[1]) * bn + bn <= kv_len  # no column past the end
    full = ((q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :]
            & (q_lo[:, :, None] == k_lo[:, None, :]) & k_whole)
    return visit.numpy(), full.numpy()


def _table_tiles(pat: MaskTable, q_len: int, kv_len: int, bm: int, bn: int):
    """Tiles holding a true pair (visit) and whole tiles holding only true pairs (full)."""
    mask = table_mask(pat, q_len, kv_len).cpu()
    b = mask.shape[0]
    tq, tk = -(-q_len // bm), -(-kv_len // bn)
    padded = torch.zeros(b, tq * bm, tk * bn, dtype=torch.bool)
    padded[:, :q_len, :kv_len] = mask
    blocks = padded.view(b, tq, bm, tk, bn)
    visit = blocks.any(4).any(2)
    whole = ((torch.arange(tq) + 1) * bm <= q_len)[:, None] & ((torch.arange(tk) + 1) * bn <= kv_len)
    full = blocks.all(4).all(2) & whole
    return visit.numpy(), full.numpy()


def _tile_range(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``block`` positions: the smallest and largest id ([B, T] each);
    positions past the end repeat the last id (they never widen its tile)."""
    b, n = ids.shape
    tiles = max(1, -(-n // block))
    if n == 0:
        empty = torch.zeros(b, tiles, dtype=torch.long)
        return empty + 1, empty  # lo > hi: meets nothing
    pad = tiles * block - n
    padded = torch.cat([ids, ids[:, -1:].expand(b, pad)], 1).view(b, tiles, block)
    return padded.amin(-1), padded.amax(-1)
