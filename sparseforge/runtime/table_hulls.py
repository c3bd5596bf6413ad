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
from .tensor_memo import TensorMemo

#: per-tile ranges by table (identity and version), lengths, tiles, side and device
_hulls = TensorMemo(limit=32)


def table_hulls(call_pattern, q_len: int, kv_len: int, block_rows: int, block_cols: int,
                by_keys: bool, device) -> torch.Tensor:
    """int32 ``[B or 1, tiles, 2]``: per tile of ``block_rows`` query rows (``by_keys``:
    of key rows), the first and one past the last tile of ``block_cols`` keys (queries)
    holding a true pair of every conjunct table; an empty tile row gets (tiles, 0)."""
    tables = table_conjuncts(call_pattern)

    def build():
        mask = table_mask(tables[0], q_len, kv_len)
        for node in tables[1:]:
            mask = mask & table_mask(node, q_len, kv_len)
        return _tile_hulls(mask.to(device), block_rows, block_cols, by_keys)

    return _hulls.get([n.table(q_len, kv_len) for n in tables],
                      (q_len, kv_len, block_rows, block_cols, by_keys, str(device)), build)


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
