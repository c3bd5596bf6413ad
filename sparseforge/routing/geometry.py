"""Bucket geometry of the routing rules: where the buckets start, which heads share a
decision, and which bucket pairs (or lines) the static part beside a routing node allows
at all (its candidates).

Everything depends on the shapes only, except chunk boundaries and document ids, and is
cached per shape and device where it can be, so a warm routed call evaluates no mask.
Production routing (``routing.rules``, the pre-kernel launches in ``runtime``) reads its
buckets from here; the oracle (``sparseforge.oracle``) derives its own.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..ir.nodes import Documents, MaskTable, walk
from ..ir.routing import Hierarchical, ThresholdBlocks, TopkBlocks, TopkChunks, TopkKeys
from ..semantics import pair_mask
from .selection import bucket_of
from .shape_cache import ShapeCache

#: rows of the static mask evaluated at once when reducing it to bucket candidates
ROW_CHUNK = 1024


_BLOCK_NODES = (TopkBlocks, ThresholdBlocks, TopkKeys, Hierarchical)


def block_starts(length: int, block: int, first: int = 0, device=None) -> torch.Tensor:
    """Starts of the ``block``-aligned buckets covering positions [first, length), the
    last entry = length: ``[1, C + 1]``."""
    lo = math.floor(first / block) * block
    starts = torch.arange(lo, max(length, lo + 1), block, device=device)
    starts = torch.cat([starts.clamp(min=first), torch.tensor([length], device=device)])
    return starts[None]


def chunk_starts(node: TopkChunks, kv_len: int, device=None) -> torch.Tensor:
    """The chunk boundaries ``[B or 1, C + 1]``, checked: from 0 to Lkv, increasing."""
    b = node.boundaries.to(device=device, dtype=torch.int64)
    b = b if b.dim() == 2 else b[None]
    _require((b[:, 0] == 0).all() & (b[:, -1] == kv_len).all(),
             f"topk_chunks(boundaries=...): expected the first boundary 0 and the last "
             f"kv_len={kv_len}")
    _require((b[:, 1:] > b[:, :-1]).all(), "topk_chunks(boundaries=...): boundaries must be "
             "strictly increasing (every chunk holds at least one token)")
    return b


def _require(ok: torch.Tensor, message: str) -> None:
    """A ValueError on the host; on a GPU a device-side assert instead, so that routing
    never waits for the device (and stays capturable in a CUDA graph)."""
    if ok.is_cuda:
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


@lru_cache(maxsize=256)
def head_map(share: str, q_heads: int, kv_heads: int, device: str = "cpu") -> torch.Tensor:
    """Routing head of each query head: itself, its GQA group, or 0 (built once per device:
    a warm call copies nothing to the GPU)."""
    h = torch.arange(q_heads, device=device)
    return {"head": h, "group": h // (q_heads // kv_heads), "all": torch.zeros_like(h)}[share]


def static_mask_rows(siblings, rows: torch.Tensor, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[B or 1, len(rows), Lkv]``: the siblings' intersection on those rows."""
    j = torch.arange(kv_len, device=device)[None, :]
    out = torch.ones(1, len(rows), kv_len, dtype=torch.bool, device=device)
    for s in siblings:
        m = pair_mask(s, rows[:, None], j, q_len, kv_len)
        out = out & (m if m.dim() == 3 else m[None])
    return out & (rows[:, None] >= 0)[None]


def bucket_candidates(siblings, q_starts, k_starts, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[B or 1, Cq, Ck]``: buckets pairs where the siblings allow at least one pair.

    Per chunk of rows: the allowed keys counted per key bucket (a prefix sum read at the
    bucket starts), then added into each row's query bucket, so memory stays
    O(rows x Lkv) whatever the bucket sizes (one-token query buckets included)."""
    cq, ck = q_starts.shape[-1] - 1, k_starts.shape[-1] - 1
    shift = kv_len - q_len
    k_starts = k_starts.to(device)
    out = torch.zeros(k_starts.shape[0], cq, ck, device=device)
    for r0 in range(0, q_len, ROW_CHUNK):
        rows = torch.arange(r0, min(q_len, r0 + ROW_CHUNK), device=device)
        allowed = static_mask_rows(siblings, rows, q_len, kv_len, device)  # [B|1, R, Lkv]
        qb = bucket_of(rows + shift, q_starts.to(device)).clamp(0, cq - 1)  # [B|1, R]
        b = max(allowed.shape[0], qb.shape[0], k_starts.shape[0], out.shape[0])
        counts = torch.nn.functional.pad(allowed.to(torch.int32).cumsum(-1), (1, 0))
        counts = counts.expand(b, -1, -1)  # [B, R, Lkv + 1]: allowed keys before each key
        at_starts = torch.gather(counts, 2, k_starts.expand(b, -1)[:, None, :]
                                 .expand(-1, len(rows), -1))  # [B, R, Ck + 1]
        per_bucket = (at_starts[..., 1:] - at_starts[..., :-1] > 0).float()  # [B, R, Ck]
        out = out.expand(b, -1, -1).clone() if out.shape[0] < b else out
        out.scatter_add_(1, qb.expand(b, -1)[..., None].expand(-1, -1, ck), per_bucket)
    return out > 0


_candidates = ShapeCache(256)


def shape_only(siblings) -> bool:
    """Whether the static part's mask depends on the shapes only (no document ids or
    mask tables)."""
    return not any(isinstance(n, (Documents, MaskTable)) for s in siblings for n in walk(s))


def node_candidates(node, siblings, q_starts, k_starts, q_len: int, kv_len: int,
                    device) -> torch.Tensor:
    """``bucket_candidates`` of a routing node, cached when they depend on the shapes only
    (fixed blocks, no document ids): a warm call does no mask evaluation at all."""
    key = ((tuple(repr(s) for s in siblings), node.q_block, node.block, q_len, kv_len,
            str(device)) if isinstance(node, _BLOCK_NODES) and shape_only(siblings) else None)
    return _candidates.get(key, lambda: bucket_candidates(siblings, q_starts, k_starts, q_len,
                                                          kv_len, device))


def node_buckets(node, q_len: int, kv_len: int, device):
    if isinstance(node, TopkChunks):
        starts = chunk_starts(node, kv_len, device)
        return starts, starts
    return _block_buckets(node.q_block, node.block, q_len, kv_len, str(device))


@lru_cache(maxsize=256)
def _block_buckets(q_block: int, block: int, q_len: int, kv_len: int, device: str):
    """Query and key bucket starts of fixed blocks: built once per shape and device."""
    return (block_starts(kv_len, q_block, kv_len - q_len, device),
            block_starts(kv_len, block, 0, device))


def key_bias(node: TopkKeys, q_heads: int, kv_len: int, device) -> torch.Tensor:
    """The node's bias as fp32 ``[B or 1, Hq, Lkv]``, checked against the call."""
    b = node.bias.to(device=device, dtype=torch.float32)
    b = b if b.dim() == 3 else b[None]
    if b.shape[1:] != (q_heads, kv_len):
        raise ValueError(f"topk_keys(bias=[{'x'.join(map(str, node.bias.shape))}]): expected "
                         f"[Hq={q_heads}, Lkv={kv_len}] or [B, {q_heads}, {kv_len}] for this call")
    return b


def diagonal_index(p: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index ``p - j + Lkv - 1`` of each (row, key) pair's diagonal, clamped; whether the
    diagonal exists): offsets beyond ``-(Lkv - 1)`` only occur for rows before the first
    key (Lq > Lkv) and are never selected."""
    off = p[:, None] - torch.arange(kv_len, device=p.device)[None, :] + kv_len - 1
    inside = off >= 0
    return off.clamp(min=0), inside


_line_candidates = ShapeCache(64)


def line_candidates(siblings, q_len: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns ``[B or 1, Lkv]``, diagonals ``[B or 1, 2 Lkv - 1]``) where the static part
    allows a pair on some row; cached per shape unless document ids make them data."""
    key = ((tuple(repr(s) for s in siblings), q_len, kv_len, str(device))
           if shape_only(siblings) else None)
    return _line_candidates.get(key, lambda: _line_candidates_of(siblings, q_len, kv_len, device))


def _line_candidates_of(siblings, q_len: int, kv_len: int, device):
    col_cand = torch.zeros(1, kv_len, dtype=torch.bool, device=device)
    diag_cand = torch.zeros(1, 2 * kv_len - 1, dtype=torch.bool, device=device)
    for r0 in range(0, q_len, ROW_CHUNK):
        rows = torch.arange(r0, min(q_len, r0 + ROW_CHUNK), device=device)
        m = static_mask_rows(siblings, rows, q_len, kv_len, device)
        col_cand = col_cand | m.any(1)
        o, inside = diagonal_index(rows + (kv_len - q_len), kv_len)
        hits = torch.zeros(m.shape[0], 2 * kv_len - 1, dtype=torch.int32, device=device)
        hits.index_add_(1, o.flatten(), (m & inside).flatten(1).to(torch.int32))  # no sync
        diag_cand = diag_cand | (hits > 0)
    return col_cand, diag_cand

