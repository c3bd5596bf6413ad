"""Per-tile ranges from run-time data: which tiles a kernel walks for ``mask_table`` and
``documents`` conjuncts.

Mask tables and document ids are data, so the plan's closed-form segments visit every
tile the rest of the pattern allows: ``documents(ids) & causal()`` alone would walk the
whole causal triangle. For each such node that every allowed pair must satisfy (a
conjunct: ``ir.affine.data_conjuncts``), the kernels clamp each segment to the tiles
between the first and the last tile that hold a pair of that node in their tile row.
That is exact (the predicate still reads the data per pair), and it skips the empty
tiles before and after: for packed documents, everything outside a tile row's own
documents; for a speculative-decoding tree or a sparse graph mask, the tiles no true
pair reaches.

Both are computed with torch ops on the data's device, with fixed-size results and no
read back to the host:

* a table: the tile occupancy of the dense table (all conjunct tables intersected first);
* documents: keys sorted stably by id, so the keys of one id are a run whose first and
  last entries are that id's first and last key; each row finds its id's run with
  ``searchsorted`` (O(L log L), no dense mask, so 128k-token packs cost nothing).

Several conjuncts intersect their ranges. Gaps inside a tile row (a pair in tile 2 and
in tile 9, none between) are still walked: the range is a hull, not a list. The runtime
keeps the result per data tensor (``runtime/hull_memo.py``); the planner applies it to
its tile counts so ``explain()`` reports the tiles a call really walks.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ir.affine import data_conjuncts
from ..ir.nodes import Documents, MaskTable
from ..semantics import document_ids, table_mask


def data_tensors(pattern, q_len: int, kv_len: int) -> list[torch.Tensor]:
    """The tensors the ranges of ``pattern`` derive from (the key of their cache)."""
    out = []
    for node in data_conjuncts(pattern):
        if isinstance(node, MaskTable):
            out.append(node.table(q_len, kv_len))
        else:
            out += [node.ids] + ([] if node.kv_ids is None else [node.kv_ids])
    return out


def tile_hulls(pattern, q_len: int, kv_len: int, block_rows: int, block_cols: int,
               by_keys: bool, device) -> torch.Tensor:
    """int32 ``[B or 1, tiles, 4]``: per tile of ``block_rows`` query rows (``by_keys``:
    of key rows), ``[lo, hi)``, the first and one past the last tile of ``block_cols``
    keys (queries) holding a pair allowed by every data conjunct, and ``[full_lo,
    full_hi)``, tiles where every data conjunct allows every pair (empty for tables; for
    documents, where the tile row holds one document and the tile lies in that
    document's contiguous run of columns). An empty tile row gets ``(tiles, 0, 0, 0)``."""
    nodes = data_conjuncts(pattern)
    tables = [n for n in nodes if isinstance(n, MaskTable)]
    parts = []
    if tables:
        mask = table_mask(tables[0], q_len, kv_len)
        for node in tables[1:]:
            mask = mask & table_mask(node, q_len, kv_len)
        parts.append(_table_hulls(mask.to(device), block_rows, block_cols, by_keys))
    for node in nodes:
        if isinstance(node, Documents):
            ids_q, ids_k = (t.to(device) for t in document_ids(node, q_len, kv_len))
            rows, cols = (ids_k, ids_q) if by_keys else (ids_q, ids_k)
            parts.append(_document_hulls(rows, cols, block_rows, block_cols))
    hull = parts[0]
    for other in parts[1:]:  # intersect: the larger starts, the smaller ends
        hull = torch.stack([torch.maximum(hull[..., 0], other[..., 0]),
                            torch.minimum(hull[..., 1], other[..., 1]),
                            torch.maximum(hull[..., 2], other[..., 2]),
                            torch.minimum(hull[..., 3], other[..., 3])], -1)
    return hull.to(torch.int32).contiguous()


def _table_hulls(mask: torch.Tensor, block_rows: int, block_cols: int, by_keys: bool):
    if by_keys:
        mask = mask.transpose(1, 2)
    b, rows, cols = mask.shape
    tr, tc = max(1, -(-rows // block_rows)), max(1, -(-cols // block_cols))
    padded = torch.zeros(b, tr * block_rows, tc * block_cols, dtype=torch.bool, device=mask.device)
    padded[:, :rows, :cols] = mask
    occupied = padded.view(b, tr, block_rows, tc, block_cols).any(4).any(2)  # [B, Tr, Tc]
    index = torch.arange(tc, device=mask.device, dtype=torch.int32)
    lo = torch.where(occupied, index, tc).amin(-1)
    hi = torch.where(occupied, index + 1, 0).amax(-1)
    none = torch.zeros_like(lo)  # a table makes no tile full (its predicate is always read)
    return torch.stack([lo, hi, none, none], -1).to(torch.int32)


def _document_hulls(row_ids: torch.Tensor, col_ids: torch.Tensor, block_rows: int,
                    block_cols: int) -> torch.Tensor:
    """Per tile of rows, the hull of the column tiles holding a column with one of the
    tile's row ids, and the full range. ``row_ids`` ``[B|1, R]``, ``col_ids`` ``[B|1, C]``."""
    b = max(row_ids.shape[0], col_ids.shape[0])
    row_ids = row_ids.expand(b, -1).contiguous()
    col_ids = col_ids.expand(b, -1).contiguous()
    rows, cols = row_ids.shape[1], col_ids.shape[1]
    tr, tc = max(1, -(-rows // block_rows)), max(1, -(-cols // block_cols))
    if cols == 0 or rows == 0:
        empty = torch.tensor([tc, 0, 0, 0], dtype=torch.int32, device=row_ids.device)
        return empty.expand(b, tr, 4)
    sorted_ids, order = torch.sort(col_ids, dim=1, stable=True)  # one id's columns: a run
    first = torch.searchsorted(sorted_ids, row_ids, side="left")
    last = torch.searchsorted(sorted_ids, row_ids, side="right") - 1
    found = last >= first
    first_col = torch.gather(order, 1, first.clamp(max=cols - 1))  # stable: the run's smallest
    last_col = torch.gather(order, 1, last.clamp(min=0))  # and its largest column
    pad = tr * block_rows - rows

    def per_tile(x, fill, reduce):
        x = torch.nn.functional.pad(x, (0, pad), value=fill).view(b, tr, block_rows)
        return x.amin(-1) if reduce == "min" else x.amax(-1)

    lo = per_tile(torch.where(found, first_col // block_cols, tc), tc, "min")
    hi = per_tile(torch.where(found, last_col // block_cols + 1, 0), 0, "max")
    # full: every row of the tile has the same id, whose columns are one contiguous run
    contiguous = found & (last_col - first_col == last - first)
    same = per_tile(row_ids, torch.iinfo(row_ids.dtype).max, "min") == per_tile(
        row_ids, torch.iinfo(row_ids.dtype).min, "max")
    uniform = same & per_tile(contiguous.to(torch.int8), 1, "min").bool()
    first_col_of = per_tile(first_col, 0, "max")  # one id: the same value on every row
    last_col_of = per_tile(last_col, 0, "max")
    flo = torch.where(uniform, -(-first_col_of // block_cols), 0)
    fhi = torch.where(uniform, (last_col_of + 1) // block_cols, 0)
    return torch.stack([lo, hi, flo, fhi], -1).to(torch.int32)


def narrow_to_hulls(pattern, visit: np.ndarray, full: np.ndarray, q_len: int, kv_len: int,
                    block_m: int, block_n: int) -> tuple[np.ndarray, np.ndarray]:
    """A plan's ``visit``/``full`` tile matrices ``[Tq, Tk]`` (of the pattern without its
    data conjuncts) clamped to the ranges of those conjuncts (the first sequence of
    per-batch data), for the plan's statistics (its price reads no data)."""
    hull = tile_hulls(pattern, q_len, kv_len, block_m, block_n, False, "cpu")[0].numpy()
    rows = visit.shape[0]
    cols = np.arange(visit.shape[1])[None, :]
    inside = (cols >= hull[:rows, 0:1]) & (cols < hull[:rows, 1:2])
    full_inside = (cols >= hull[:rows, 2:3]) & (cols < hull[:rows, 3:4])
    return visit & inside, full & inside & full_inside
