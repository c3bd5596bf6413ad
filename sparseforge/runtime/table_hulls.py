"""Per-tile ranges from mask tables: which tiles a kernel walks for a ``mask_table``.

A ``mask_table`` is run-time data, so the plan's closed-form segments visit every tile
the rest of the pattern allows. For a table that every allowed pair must satisfy (a
conjunct: ``table_conjuncts``), the kernels clamp each segment to the tiles between the
first and the last tile that hold a true pair of the table in their tile row. That is
exact (the predicate still reads the table per pair), and it skips the empty tiles
before and after, which is where a speculative-decoding tree or a sparse graph mask
spends its time. The ranges are computed once per table (its identity, version and
the tile sizes), on the table's device with torch ops, so a warm call neither
recomputes them nor reads anything back to the host.

Gaps inside a tile row (a true pair in tile 2 and in tile 9, none between) are still
walked: the range is a hull, not a list.
"""

from __future__ import annotations

import torch

from ..ir.affine import table_conjuncts
from ..semantics import table_mask

#: (table ids, versions, lengths, tiles, side, device) -> (hulls, the tables held)
_hulls: dict = {}


def table_hulls(call_pattern, q_len: int, kv_len: int, block_rows: int, block_cols: int,
                by_keys: bool, device) -> torch.Tensor:
    """int32 ``[B or 1, tiles, 2]``: per tile of ``block_rows`` query rows (``by_keys``:
    of key rows), the first and one past the last tile of ``block_cols`` keys (queries)
    holding a true pair of every conjunct table; an empty tile row gets (tiles, 0)."""
    tables = table_conjuncts(call_pattern)
    masks = [n.table(q_len, kv_len) for n in tables]
    versions = tuple(None if m.is_inference() else m._version for m in masks)
    key = (tuple(map(id, masks)), versions, q_len, kv_len, block_rows, block_cols, by_keys,
           str(device))
    hit = _hulls.get(key) if None not in versions else None
    if hit is not None and all(a is b for a, b in zip(hit[1], masks)):
        return hit[0]
    mask = table_mask(tables[0], q_len, kv_len)
    for node in tables[1:]:
        mask = mask & table_mask(node, q_len, kv_len)
    hulls = _tile_hulls(mask.to(device), block_rows, block_cols, by_keys)
    if len(_hulls) > 32:
        _hulls.clear()
    _hulls[key] = (hulls, masks)  # holding the masks keeps their ids unique
    return hulls


def _tile_hulls(mask: torch.Tensor, block_rows: int, block_cols: int, by_keys: bool):
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
    return torch.stack([lo, hi], -1).to(torch.int32).contiguous()
