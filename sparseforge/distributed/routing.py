"""Routing across ranks for the pooled rules (``topk_blocks``, ``topk_chunks``,
``threshold_blocks``): only the pooled summaries travel, never the keys a rank does not
select.

Each rank pools its own queries and keys per bucket (sums, or maxima, and token counts:
a bucket may straddle ranks). One all-reduce makes the key summaries the whole
sequence's (``[C, D]`` per head: L / block x D); a rank scores only its own query
buckets, so of the query summaries only the buckets that straddle ranks are reduced
(a few per boundary between ranks' runs; none travel when every bucket lies in one
rank). Every rank then scores and selects its own query buckets exactly as one process
would (``routing.rules.select_pooled``), leaving the others' buckets unscored. The key
blocks its queries selected join the layout's static needs, and each rank asks the
owners for them (an all-to-all of the block ids) before the key/value exchange. The
routing is not differentiated (as in MoBA and NSA).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..ir.nodes import Pattern, PerHead, walk
from ..ir.routing import DynamicPattern, ThresholdBlocks, TopkBlocks, TopkChunks
from ..ir.split import static_siblings
from ..routing.geometry import node_buckets
from ..routing.rules import pooled_with_sqrt_len, select_pooled
from ..routing.selection import BlockSelection, bucket_of
from .exchange import counters

#: the rules whose selection follows from pooled summaries alone
POOLED_RULES = (TopkBlocks, TopkChunks, ThresholdBlocks)


def pooled_node(canonical: Pattern):
    """The routing node of a pattern context parallelism can route across ranks, None
    for a static pattern; a ValueError for any other routed pattern."""
    nodes = list(dict.fromkeys(n for n in walk(canonical) if isinstance(n, DynamicPattern)))
    if not nodes:
        return None
    if (len(nodes) > 1 or not isinstance(nodes[0], POOLED_RULES)
            or any(isinstance(n, PerHead) for n in walk(canonical))):
        raise ValueError(f"{canonical!r}: sparseforge.distributed routes one topk_blocks, "
                         "topk_chunks or threshold_blocks node across ranks (no per-head "
                         "patterns); other routed patterns are not supported yet")
    return nodes[0]


def _local_pool(x: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, how: str):
    """This rank's part of ``routing.rules.pool``: per bucket the sum (or max) of its
    tokens ``x`` at ``positions``, and their count, before any division."""
    b, h, _, d = x.shape
    c = starts.shape[-1] - 1
    idx = bucket_of(positions, starts.to(x.device))
    idx = torch.where((idx >= 0) & (idx < c), idx, c).expand(b, -1)
    sizes = torch.zeros(b, c + 1, device=x.device).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float32))
    index = idx[:, None, :, None].expand(b, h, -1, d)
    out = torch.zeros(b, h, c + 1, d, device=x.device)
    if how == "mean":
        out.scatter_add_(2, index, x.float())
    else:
        out = out.scatter_reduce(2, index, x.float(), "amax", include_self=False)
        out = out.masked_fill((sizes == 0)[:, None, :, None], float("-inf"))  # not held here
    return out[:, :, :c].contiguous(), sizes[:, :c].contiguous()  # (collectives need dense)


#: ``shared_buckets`` per (layout, bucket starts), with the layout held (its id stays
#: unique while kept)
_SHARED: dict = {}
SHARED_KEPT = 64


def shared_buckets(layout, starts: torch.Tensor) -> torch.Tensor:
    """The buckets (of ``starts``) holding tokens of two or more of ``layout``'s ranks in
    some batch row: the only ones whose pooled sums need another rank's part. The same
    on every rank (from the layout alone); kept, since every step asks again."""
    key = (id(layout), tuple(starts.shape), tuple(starts.flatten().tolist()))
    hit = _SHARED.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1]
    c = starts.shape[-1] - 1
    holders = torch.zeros(c, dtype=torch.long)
    for rank in range(layout.world_size):
        idx = bucket_of(layout.positions(rank).to(starts.device), starts).flatten()
        holders[idx[(idx >= 0) & (idx < c)].unique().cpu()] += 1
    if len(_SHARED) >= SHARED_KEPT:
        _SHARED.clear()
    _SHARED[key] = (layout, torch.nonzero(holders > 1).flatten())
    return _SHARED[key][1]


def _global_pool(x, positions, starts, how: str, sqrt_len: bool, group,
                 only=None) -> torch.Tensor:
    """The whole sequence's pooled vectors ``[B, H, C, D]``, as one process pools them;
    with ``only`` (bucket indices, the same on every rank), only those buckets are
    reduced across ranks and the others keep this rank's own part."""
    out, sizes = _local_pool(x, positions, starts, how)
    op = dist.ReduceOp.SUM if how == "mean" else dist.ReduceOp.MAX
    if only is None:
        dist.all_reduce(sizes, group=group)
        dist.all_reduce(out, op=op, group=group)
        counters.routing += out.numel() * out.element_size() + sizes.numel() * sizes.element_size()
    elif len(only):
        only = only.to(x.device)
        part_out, part_sizes = out[:, :, only].contiguous(), sizes[:, only].contiguous()
        dist.all_reduce(part_sizes, group=group)
        dist.all_reduce(part_out, op=op, group=group)
        out[:, :, only], sizes[:, only] = part_out, part_sizes
        counters.routing += (part_out.numel() * part_out.element_size()
                             + part_sizes.numel() * part_sizes.element_size())
    if how == "mean":
        out = out / sizes.clamp(min=1)[:, None, :, None]
    else:
        out = out.masked_fill((sizes == 0)[:, None, :, None], 0.0)
    return out * sizes.sqrt()[:, None, :, None] if sqrt_len else out


def route_across(node, canonical: Pattern, q: torch.Tensor, k: torch.Tensor, layout,
                 rank: int, scale: float, group) -> BlockSelection:
    """The selection one process would make on the whole sequence for the query buckets
    of this rank's tokens (``q``, ``k`` at ``layout.positions(rank)``; other buckets
    select nothing), from its tokens and the others' pooled summaries."""
    seq_len = layout.seq_len
    q_starts, k_starts = node_buckets(node, seq_len, seq_len, q.device)
    how, sqrt_len = getattr(node, "pool", "mean"), pooled_with_sqrt_len(node)
    positions = layout.positions(rank).to(q.device)
    qbar = _global_pool(q, positions, q_starts, how, sqrt_len, group,
                        only=shared_buckets(layout, q_starts))
    kbar = _global_pool(k, positions, k_starts, how, sqrt_len, group)
    mine = bucket_of(positions, q_starts).clamp(0, q_starts.shape[-1] - 2).unique()
    return select_pooled(node, static_siblings(canonical, node), qbar, kbar, q_starts, k_starts,
                         seq_len, seq_len, scale, rows=mine)


def selected_blocks(selection: BlockSelection, positions: torch.Tensor, seq_len: int,
                    block: int) -> set[int]:
    """The layout blocks holding a key of a bucket some query at ``positions`` selected
    (any head, any batch row)."""
    device = selection.selected.device
    ck = selection.selected.shape[-1]
    qb = bucket_of(positions.to(device), selection.q_starts.to(device))  # [B|1, L_local]
    qb = torch.unique(qb.clamp(0, selection.selected.shape[-2] - 1))
    chosen = selection.selected[:, :, qb].flatten(0, 2).any(0)  # [Ck]
    kb = bucket_of(torch.arange(seq_len, device=device), selection.k_starts.to(device))
    held = chosen[kb.clamp(0, ck - 1)] & (kb >= 0) & (kb < ck)  # [B|1, L]
    held = held.any(0)
    blocks = math.ceil(seq_len / block)
    held = torch.nn.functional.pad(held, (0, blocks * block - seq_len)).view(blocks, block).any(1)
    return set(torch.nonzero(held).flatten().tolist())


def ask_owners(receive: list[tuple[int, ...]], group) -> list[tuple[int, ...]]:
    """Tell each rank which of its blocks this rank will receive (``receive[s]``: from
    rank s) and learn what each rank wants from this one: two small all-to-alls."""
    world = len(receive)
    counts = torch.tensor([len(r) for r in receive], dtype=torch.int64)
    wanted = torch.empty_like(counts)
    dist.all_to_all_single(wanted, counts, group=group)
    ids = torch.tensor([b for r in receive for b in r], dtype=torch.int64)
    asked = torch.empty(int(wanted.sum()), dtype=torch.int64)
    dist.all_to_all_single(asked, ids, wanted.tolist(), counts.tolist(), group=group)
    counters.routing += 8 * (world + len(ids))
    out, at = [], 0
    for n in wanted.tolist():
        out.append(tuple(asked[at:at + n].tolist()))
        at += n
    return out
