"""CPU programs: a plan's tile schedule cut into calls of the fused CPU attention kernel.

The CPU executor (``cpu_flash``) runs PyTorch's fused FlashAttention kernel for CPUs
(``_scaled_dot_product_flash_attention_for_cpu``: blocked, vectorised, multi-threaded).
That kernel attends a batch of query blocks to key ranges of equal length, given as
strided views. A *program* says which views. Each query tile's visited kv tiles form a
few contiguous *runs* (one for a window or a causal prefix; two for a window plus
sinks; one per image row for a 2-D neighbourhood in token order). The program cuts one
dilation group's query tiles into **batches** of consecutive tiles with the same number
of runs, and gives run ``r`` a *window* ``[start_r + step_r*i, ... + width_r)`` for item
``i`` — ``step = 0`` for prefixes and fixed columns (causal, documents, sinks),
``step = 1`` for bands (sliding windows) — that covers it within ``SLACK`` of the
visited work. Each window is cut into **pieces**:

- *body* columns, full for every item: no mask at all;
- *edge* columns: an additive mask evaluated once here from the semantics
  (``pair_mask``); shared by every item (a stride-0 view) when the pattern looks the same
  from each of them, as sliding windows do; exactly ``j <= i`` (a causal diagonal): no
  mask, the kernel's causal mode;
- columns no item visits are dropped.

A window's pieces only ever hold its own run's tiles, so no pair is attended twice;
all pieces of a batch are merged by log-sum-exp. Programs are built once per plan,
kernel, dilation group (and document ids) and cached; a call only makes views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..ir.nodes import data_tensors
from ..planner.schedule import GroupSchedule
from .cpu_tiles import refinable, refined_schedule
from .torch_exec import tile_mask

#: a batch grows while its windows cost at most this much more than the tiles it visits
SLACK = 1.25
#: ... and while a mask it must materialise (edge pieces) stays under this many elements
MASK_BUDGET = 1 << 22
MAX_ITEMS = 64


@dataclass(eq=False)
class Piece:
    """Columns ``[col, col + width)`` of a batch's windows, with the mask they need."""

    col: int
    width: int
    allowed: torch.Tensor | None  # bool [nq or 1, BM, width*BN]; None: all pairs allowed
    valid: torch.Tensor | None  # bool [nq or 1, BM]: rows with some allowed key; None: all
    #: the piece's pairs are exactly ``j <= i`` in its own rows and columns: the kernel's
    #: causal mode skips the blocks above the diagonal (no mask, no wasted work)
    causal: bool = False
    _additive: dict = field(default_factory=dict)

    def mask(self, dtype: torch.dtype, batch: Batch) -> torch.Tensor | None:
        """The additive mask in the inputs' dtype for the batch's call shape,
        ``[items, 1, rows, width*BN]`` (a stride-0 view over items when shared), made
        once per dtype."""
        if self.allowed is None:
            return None
        found = self._additive.get(dtype)
        if found is None:
            allowed = self.allowed
            if batch.items == 1 and batch.count > 1:  # one call item of all the rows
                allowed = allowed.expand(batch.count, *allowed.shape[1:]).reshape(
                    1, -1, allowed.shape[-1])
            found = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
            self._additive[dtype] = found
        return found[:, None].expand(batch.items, 1, *found.shape[1:])

    def valid_rows(self, batch: Batch) -> torch.Tensor | None:
        """``valid`` in the batch's call shape, ``[items, rows]``."""
        if self.valid is None:
            return None
        return self.valid.expand(batch.count, -1).reshape(batch.items, -1)


@dataclass(frozen=True)
class Window:
    """The kv tiles one run of a batch sees: from ``start + step*i`` for item ``i`` (may
    lie before tile 0 or past the end: the executor pads K/V with zero tiles)."""

    start: int
    step: int
    width: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Batch:
    """Query tiles ``[first, first + count)`` and the windows of their runs."""

    first: int
    count: int
    windows: tuple[Window, ...]

    @property
    def items(self) -> int:
        """Items of one kernel call: when every window has ``step == 0`` every tile sees
        the same keys, so the batch is one item of ``count * BM`` rows (the kernel splits
        long query ranges into larger, faster blocks than single tiles)."""
        return 1 if all(w.step == 0 for w in self.windows) else self.count


@dataclass(frozen=True)
class GroupProgram:
    batches: tuple[Batch, ...]
    q_tiles: int
    kv_tiles: int
    front: int  # zero kv tiles padded before tile 0
    back: int  # ... and after the last tile


_programs: dict[tuple, tuple] = {}


def programs(plan, index: int, group: int, kernel, call_pattern, sched: GroupSchedule):
    """``[(batch_row, program)]`` for one kernel's dilation group: one program for all
    batch rows (``batch_row=None``) unless document ids differ per row.

    A program refined by document ids is cached with a copy of them and reused only
    while the call's ids are equal to it (compared on the host: O(L), no device sync on
    CPU), so an in-place edit, even of an inference tensor, is never served stale tiles."""
    refine = refinable(plan, kernel)
    ids = data_tensors(call_pattern) if refine else ()
    key = (id(plan), index, group, tuple(id(t) for t in ids))
    hit = _programs.get(key)
    if (hit is not None and hit[0] is plan and len(hit[2]) == len(ids)
            and all(torch.equal(a, b) for a, b in zip(hit[2], ids))):
        return hit[1]
    schedules = refined_schedule(plan, call_pattern, sched) if refine else [sched]
    rows = [None] if len(schedules) == 1 else list(range(len(schedules)))
    totals = plan.q_len, plan.kv_len
    built = [(row, build(call_pattern, kernel.groups, s, plan.block_m, plan.block_n, totals,
                         0 if row is None else row))
             for row, s in zip(rows, schedules)]
    if len(_programs) > 256:
        _programs.clear()
    # holding the plan keeps its id unique; the copies of the ids validate a later hit
    _programs[key] = (plan, built, tuple(t.detach().clone() for t in ids))
    return built


#: runs per query tile beyond which the nearest runs are merged (masked gaps cost less
#: than many small kernel calls)
MAX_RUNS = 8


def build(pattern, groups: int, sched: GroupSchedule, bm: int, bn: int, totals, row: int = 0
          ) -> GroupProgram:
    visit = sched.visit
    tq, tk = visit.shape
    counts = visit.sum(1)
    runs = [_row_runs(visit[t]) for t in range(tq)]
    batches = []
    t = 0
    while t < tq:
        if counts[t] == 0:
            t += 1
            continue
        windows, stop = _grow(sched, t, runs, counts, bm, bn)
        batches.append(Batch(t, stop - t, tuple(
            _window(pattern, groups, sched, t, stop - t, r, runs, start, step, width, bm, bn,
                    totals, row)
            for r, (start, step, width) in enumerate(windows))))
        t = stop
    ends = [(w.start, w.start + w.step * (b.count - 1) + w.width)
            for b in batches for w in b.windows]
    front = max([0] + [-lo for lo, _ in ends])
    back = max([0] + [hi - tk for _, hi in ends])
    return GroupProgram(tuple(batches), tq, tk, front, back)


def _row_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous visited ranges ``[lo, hi)`` of one query tile, at most ``MAX_RUNS``
    (the narrowest gaps closed first)."""
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    runs = list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))
    while len(runs) > MAX_RUNS:
        gap = min(range(len(runs) - 1), key=lambda n: runs[n + 1][0] - runs[n][1])
        runs[gap:gap + 2] = [(runs[gap][0], runs[gap + 1][1])]
    return runs


def _columns(sched: GroupSchedule, first: int, count: int, run: int, runs, start: int,
             step: int, width: int):
    """Per item and window column: the kv tile, whether it exists and belongs to the
    run (its pairs are this window's to compute), is visited, is full."""
    tk = sched.visit.shape[1]
    items = np.arange(count)
    tiles = start + step * items[:, None] + np.arange(width)
    lo = np.array([runs[first + i][run][0] for i in items])[:, None]
    hi = np.array([runs[first + i][run][1] for i in items])[:, None]
    owned = (tiles >= lo) & (tiles < hi)  # so also inside 0..Tk
    clipped = np.clip(tiles, 0, max(tk - 1, 0))
    rows_q = first + items[:, None]
    return (clipped, owned, sched.visit[rows_q, clipped] & owned,
            sched.full[rows_q, clipped] & owned)


def _grow(sched, t: int, runs, counts, bm: int, bn: int):
    """The longest run of query tiles from ``t`` with as many runs whose windows serve
    them within ``SLACK`` and whose edge masks stay within ``MASK_BUDGET``:
    ``([(start, step, width)] per run, end tile)``."""
    windows = [(lo, 0, hi - lo) for lo, hi in runs[t]]
    work, u, tq = int(counts[t]), t + 1, len(counts)
    while u < tq and counts[u] and u - t < MAX_ITEMS and len(runs[u]) == len(windows):
        idx = np.arange(u - t + 1)
        grown, cost, edges = [], 0, 0
        for r, (_, step, _) in enumerate(windows):
            lo = np.array([runs[i][r][0] for i in range(t, u + 1)])
            hi = np.array([runs[i][r][1] for i in range(t, u + 1)])
            best = None
            for s in ({step} if u - t > 1 else {0, max(0, int(lo[1] - lo[0]))}):
                a = int((lo - s * idx).min())
                w = int((hi - s * idx).max()) - a
                _, _, visit, full = _columns(sched, t, u - t + 1, r, runs, a, s, w)
                edge = visit.any(0) & ~full.all(0)
                c = _window_cost(visit, full, edge, s)
                if best is None or c < best[0]:
                    best = (c, (a, s, w), int(edge.sum()))
            cost += best[0]
            edges += best[2]
            grown.append(best[1])
        if cost > SLACK * (work + counts[u]) or (u - t + 1) * edges * bm * bn > MASK_BUDGET:
            break
        windows, work, u = grown, work + int(counts[u]), u + 1
    return windows, u


def _window_cost(visit, full, edge, step: int) -> int:
    """Tiles the kernel computes for a window: every item on each used column, except
    that with ``step == 0`` an edge whose visits are growing prefixes (a causal
    diagonal) is expected to run in the kernel's causal mode, at about its visits."""
    used = visit.any(0)
    cost = visit.shape[0] * int(used.sum())
    if step == 0 and edge.any():
        part = visit[:, edge]
        ends = part.sum(1)
        prefix = (part == (np.arange(part.shape[1]) < ends[:, None])).all()
        if prefix and (np.diff(ends) >= 0).all():
            cost -= int((~part).sum())
    return cost


def _window(pattern, groups, sched, first, count, run, runs, start, step, width, bm, bn,
            totals, row) -> Window:
    clipped, owned, visit, full = _columns(sched, first, count, run, runs, start, step, width)
    body, skip = full.all(0), ~visit.any(0)
    edge = ~body & ~skip
    spans = _runs(body, skip)
    if not edge.any():
        return Window(start, step, width, tuple(
            Piece(r0, r1 - r0, None, None) for r0, r1, kind in spans if kind == "body"))
    cols = np.nonzero(edge)[0]
    allowed = _allowed(pattern, groups, sched, first, count, clipped[:, cols], owned[:, cols],
                       bm, bn, totals, row).view(count, bm, len(cols), bn)
    if bool((allowed == allowed[:1]).all()):  # the same from every item: one shared mask
        used = np.nonzero(~skip)[0]
        c0, c1 = int(used[0]), int(used[-1]) + 1
        shared = torch.from_numpy(np.repeat(body[c0:c1], bn))[None, None].repeat(1, bm, 1)
        shared = shared.view(1, bm, c1 - c0, bn)
        shared[:, :, cols - c0] = allowed[:1]
        shared = shared.view(1, bm, -1)
        return Window(start, step, width, (Piece(c0, c1 - c0, shared, _valid(shared)),))
    pieces = []
    position = {int(c): n for n, c in enumerate(cols)}
    for r0, r1, kind in spans:
        if kind == "body":
            pieces.append(Piece(r0, r1 - r0, None, None))
        elif kind == "edge":
            part = allowed[:, :, position[r0]:position[r0] + r1 - r0].reshape(count, bm, -1)
            if step == 0 and _is_causal(part.reshape(count * bm, -1)):
                pieces.append(Piece(r0, r1 - r0, None, None, causal=True))
                continue
            if bool((part == part[:1]).all()):
                part = part[:1]
            pieces.append(Piece(r0, r1 - r0, part.contiguous(), _valid(part)))
    return Window(start, step, width, tuple(pieces))


def _runs(body, skip):
    """Maximal runs of columns of one kind: (first, end, "body" | "edge" | "skip")."""
    kinds = np.where(body, 0, np.where(skip, 2, 1))
    names = ("body", "edge", "skip")
    out, c = [], 0
    while c < len(kinds):
        e = c
        while e < len(kinds) and kinds[e] == kinds[c]:
            e += 1
        out.append((c, e, names[kinds[c]]))
        c = e
    return out


def _allowed(pattern, groups, sched, first, count, tiles, owned, bm, bn, totals, row):
    """Bool [nq, BM, C*BN]: the pattern's pairs on these kv tiles (none on tiles the
    window does not own: outside 0..Tk or another run's)."""
    tiles_q = np.arange(first, first + count)
    kv_idx = torch.from_numpy(np.ascontiguousarray(tiles))
    is_full = torch.zeros(kv_idx.shape, dtype=torch.bool)
    ok = tile_mask(pattern, sched.geometry, groups, tiles_q, kv_idx, is_full, bm, bn,
                   sched.geometry.kv_len, totals)
    if ok.dim() == 5:  # document ids with a batch dimension
        ok = ok[row if ok.shape[0] > 1 else 0]
    ok = ok & torch.from_numpy(owned)[:, None, :, None]
    return ok.reshape(count, bm, -1)


def _is_causal(allowed: torch.Tensor) -> bool:
    """Whether a [rows, cols] mask is exactly ``j <= i`` (the kernel's causal mode)."""
    rows, cols = allowed.shape
    return bool((allowed == torch.ones(rows, cols, dtype=torch.bool).tril()).all())


def _valid(allowed: torch.Tensor) -> torch.Tensor | None:
    valid = allowed.any(-1)
    return None if bool(valid.all()) else valid
