"""Per-tile ranges of mask tables and document ids, kept per data tensor.

The ranges (``planner/data_hulls.py``) cost O(Lq * Lkv) for a table and O(L log L) for
document ids; a warm call must neither recompute them nor read anything back to the
host, so they are kept by the tensors' identity and version (an in-place edit is seen),
the lengths, the tile sizes, the side and the device.
"""

from __future__ import annotations

import torch

from ..planner.data_hulls import data_tensors, tile_hulls
from .tensor_memo import TensorMemo

_hulls = TensorMemo(limit=32)


def cached_tile_hulls(call_pattern, q_len: int, kv_len: int, block_rows: int, block_cols: int,
                      by_keys: bool, device) -> torch.Tensor:
    """``planner.data_hulls.tile_hulls``, computed once per data tensor and tiles."""
    return _hulls.get(data_tensors(call_pattern, q_len, kv_len),
                      (q_len, kv_len, block_rows, block_cols, by_keys, str(device)),
                      lambda: tile_hulls(call_pattern, q_len, kv_len, block_rows, block_cols,
                                         by_keys, device))
