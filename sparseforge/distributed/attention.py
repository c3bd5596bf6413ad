"""Context-parallel attention: each rank attends its queries to its own keys while the
keys it needs from the others arrive, then to those, and merges the two by log-sum-exp.

A rank's queries and the keys it holds or received come in runs of consecutive
positions. Each (query run, key run) pair that the layout's reach connects is one call
of ``sf.attention`` with the pattern rewritten over the part (``parts.part_pattern``):
the ordinary plan and kernels (Triton on CUDA, the CPU executor on CPU), their backward
included. A routed pattern's part runs the routed kernels (the torch routed path on
CPU) with the whole sequence's selection cut to the part (``parts.part_selection``,
``dispatch.attention_with_selection``); a part where nothing is selected and the
static part allows nothing is not called. Patterns with no form on a part
(a token-offset table too wide once moved), and layouts scattered into more runs than
``MAX_PART_CALLS``, are evaluated on the tokens' original positions instead
(``attend_at``: ``semantics.pair_mask``, torch ops over row chunks), exact the same
way. Autograd carries the gradient through either and through the exchange, whose
backward returns dK/dV of the received rows to their owners.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from ..api import attention as single_attention
from ..ir.canonicalize import canonicalize
from ..ir.nodes import Empty, ScoreModifier, walk
from ..ir.routing import is_dynamic
from ..ir.split import static_part
from ..merging import merge
from ..planner.plan import head_groups
from ..runtime.dispatch import attention_with_selection
from ..semantics import modified_scores, pair_mask
from .exchange import counters, finish_exchange, start_exchange
from .layout import ShardLayout, self_attention_pattern
from .parts import part_pattern, part_selection
from .routing import ask_owners, pooled_node, route_across, selected_blocks

#: query rows per chunk of the torch attention (bounds its [rows, keys] temporaries)
ROW_CHUNK = 256
#: more (query run, key run) calls than this (a layout scattered into many runs): one
#: torch pass over original positions costs less than that many small kernel calls
MAX_PART_CALLS = 64
#: a routed rank fills gaps of up to this many blocks between the runs it received
#: (``filled_spans``)
GAP_BLOCKS = 4
#: (layout, pattern, blocks) entries ``part_calls`` keeps
PART_CALLS_KEPT = 256
_PART_CALLS: dict = {}


def attend_at(q, k, v, canonical, pos_q: torch.Tensor, pos_k: torch.Tensor, seq_len: int,
              scale: float, routing: dict | None = None, reach=None, block: int = 1):
    """(out, lse) of queries at positions ``pos_q`` against keys at ``pos_k`` (original
    positions in a sequence of ``seq_len``) under ``canonical`` (its routing node's
    selection in ``routing``); k/v heads are repeated for GQA. Rows with no allowed key
    give 0 and -inf. ``reach`` (``layout.Reach`` over blocks of ``block`` tokens): each
    chunk of rows scores only the keys its blocks may reach, not every key held."""
    b, hq, rows_total, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = hq // k.shape[1]
    kk = k.to(compute).repeat_interleave(group, dim=1)
    vv = v.to(compute).repeat_interleave(group, dim=1)
    j_all = pos_k.to(q.device)[None, :]
    if rows_total == 0 or k.shape[2] == 0:
        return (q.new_zeros((b, hq, rows_total, v.shape[-1])),
                q.new_full((b, hq, rows_total), float("-inf"), dtype=torch.float32))
    groups = head_groups(canonical)
    outs, lses = [], []
    for r0 in range(0, rows_total, ROW_CHUNK):
        rows = slice(r0, min(rows_total, r0 + ROW_CHUNK))
        p = pos_q[rows].to(q.device)[:, None]
        keys, values, j = kk, vv, j_all
        if reach is not None:  # only the keys these rows' blocks may reach
            near = torch.from_numpy(reach.needed(np.unique(pos_q[rows].numpy() // block)))
            cols = torch.nonzero(near[pos_k // block]).flatten().to(q.device)
            keys, values, j = kk.index_select(2, cols), vv.index_select(2, cols), j_all[:, cols]
        s = q[:, :, rows].to(compute) @ keys.transpose(-1, -2) * scale
        parts = []
        for head, heads in groups:  # per_head: each head group under its own pattern
            hs = torch.arange(hq) if heads is None else torch.tensor(heads)
            mask = pair_mask(head, p, j, seq_len, seq_len, routing)
            mask = mask if mask.dim() == 4 else (mask[:, None] if mask.dim() == 3 else mask[None, None])
            if heads is not None and mask.shape[1] > 1:
                mask = mask[:, hs]
            part = modified_scores(head, s if heads is None else s[:, hs], hs, p, j)
            parts.append(part.masked_fill(~mask, float("-inf")))
        if len(parts) == 1:
            masked = parts[0]
        else:  # back in head order
            order = torch.cat([torch.tensor(h) for _, h in groups]).argsort()
            masked = torch.cat(parts, 1)[:, order]
        chunk_lse = torch.logsumexp(masked, dim=-1)
        probs = torch.exp(masked - torch.where(torch.isinf(chunk_lse), 0.0, chunk_lse)[..., None])
        outs.append(probs @ values)
        lses.append(chunk_lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2).float()


def runs(layout: ShardLayout, blocks) -> list[tuple[int, int, np.ndarray]]:
    """``blocks`` (in tensor order) as runs of consecutive blocks: (first row in the
    tensor, rows, the run's blocks)."""
    out, row = [], 0
    for b in blocks:
        b = int(b)
        if out and out[-1][2][-1] == b - 1:
            first, count, members = out[-1]
            out[-1] = (first, count + layout.block_len(b), np.append(members, b))
        else:
            out.append((row, layout.block_len(b), np.array([b])))
        row += layout.block_len(b)
    return out


def part_calls(canonical, layout: ShardLayout, q_blocks, k_blocks) -> tuple | None:
    """The ``sf.attention`` calls attending the queries of ``q_blocks`` to the keys of
    ``k_blocks`` (both in tensor order): per run of queries, (its first row, its rows,
    ((key rows, the pattern over the part, (its first query and key positions), whether
    it is routed with an empty static part), ...) for each key run it reaches); None
    when some pair's pattern has no such form. Kept across calls (``_PART_CALLS``): the
    parts' data (document ids, table slices) then stays the same tensors, and the plan
    caches keyed by their identity hit on every later step; not kept when a modifier's
    tensor is trained (its moved copies are differentiated through, so each step builds
    its own)."""
    key = (id(layout), id(canonical), tuple(map(int, q_blocks)), tuple(map(int, k_blocks)))
    hit = _PART_CALLS.get(key)
    if hit is not None and hit[0] is layout and hit[1] is canonical:
        return hit[2]
    calls, routed = [], is_dynamic(canonical)
    for row, count, q_run in runs(layout, q_blocks):
        near, parts = layout.reach.needed(q_run), []
        for k_row, _, k_run in runs(layout, k_blocks):
            reached = np.flatnonzero(near[k_run])
            if not len(reached):
                continue
            first, last = k_run[reached[0]], k_run[reached[-1]]  # trimmed to the reached blocks
            k_first = k_row + sum(layout.block_len(b) for b in k_run[:reached[0]])
            k_count = sum(layout.block_len(b) for b in range(first, last + 1))
            q_start, k_start = int(q_run[0]) * layout.block, int(first) * layout.block
            part = part_pattern(canonical, q_start, k_start, count, k_count, layout.seq_len)
            if part is None:
                calls = None
                break
            # (a routed part whose static part is empty is skipped where nothing is selected)
            bare = routed and isinstance(canonicalize(static_part(part)), Empty)
            parts.append((slice(k_first, k_first + k_count), part, (q_start, k_start), bare))
        if calls is None:
            break
        calls.append((row, count, tuple(parts)))
    calls = None if calls is None else tuple(calls)
    if not _trained_tensors(canonical):
        if len(_PART_CALLS) >= PART_CALLS_KEPT:
            _PART_CALLS.clear()
        _PART_CALLS[key] = (layout, canonical, calls)
    return calls


def _trained_tensors(canonical) -> bool:
    """Whether some score modifier of ``canonical`` holds a tensor that requires grad."""
    return any(isinstance(node, ScoreModifier) and getattr(node, "tensor_name", "")
               and getattr(node, node.tensor_name).requires_grad for node in walk(canonical))


def attend_parts(q, k, v, calls, scale: float, enable_gqa: bool, selection=None,
                 seq_len: int = 0):
    """(out, lse) of the queries through ``sf.attention``, one call per part of ``calls``
    (``part_calls``), merged by log-sum-exp per run of queries. ``selection``: a routed
    pattern's decision on the whole sequence (of ``seq_len`` tokens), cut to each part."""
    outs, lses = [], []
    for row, count, parts in calls:
        rows = slice(row, row + count)
        done = []
        for keys, part, (q_start, k_start), bare in parts:
            qs, ks, vs = q[:, :, rows], k[:, :, keys], v[:, :, keys]
            if selection is None:
                done.append(single_attention(qs, ks, vs, part, scale=scale,
                                             enable_gqa=enable_gqa, return_lse=True))
                continue
            cut = part_selection(selection, q_start, k_start, count, ks.shape[2])
            if bare and not cut.selected.any():  # nothing this part could allow
                continue
            done.append(attention_with_selection(qs, ks, vs, part, cut, scale=scale,
                                                 enable_gqa=enable_gqa,
                                                 origin=(q_start, k_start, seq_len)))
        counters.part_calls += len(done)
        if not done:
            outs.append(q.new_zeros((*q.shape[:2], count, v.shape[-1])))
            lses.append(q.new_full((*q.shape[:2], count), float("-inf"), dtype=torch.float32))
            continue
        out, lse = merge([o for o, _ in done], [s for _, s in done]) if len(done) > 1 else done[0]
        outs.append(out)
        lses.append(lse.float())
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _attend(q, k, v, canonical, layout: ShardLayout, q_blocks, k_blocks, scale: float,
            enable_gqa: bool, routing):
    """The kernels on the parts where the pattern allows (``attend_parts``), else torch
    ops on original positions (``attend_at``)."""
    calls = part_calls(canonical, layout, q_blocks, k_blocks)
    if calls is not None and sum(len(parts) for _, _, parts in calls) <= MAX_PART_CALLS:
        selection = None if routing is None else next(iter(routing.values()))
        return attend_parts(q, k, v, calls, scale, enable_gqa, selection, layout.seq_len)
    counters.position_passes += 1
    return attend_at(q, k, v, canonical, layout.token_positions(q_blocks),
                     layout.token_positions(k_blocks), layout.seq_len, scale, routing,
                     layout.reach, layout.block)


def filled_spans(layout: ShardLayout, arrived, rank: int) -> tuple[list[int], torch.Tensor]:
    """A routed rank's received blocks (``arrived``, in the order they came) as spans:
    ascending, with gaps of at most ``GAP_BLOCKS`` blocks of other ranks between them
    filled. No query of this rank allows a key of a gap block (it is neither in the
    static needs nor selected), so zero rows there change nothing, and a selection
    scattered over many runs makes a few part calls instead of one per run. Returns the
    blocks in span order and, per token of them, its row in the received tensor (a gap
    token: the row one past the last, which the caller makes a zero row)."""
    first_row, row = {}, 0
    for b in arrived:
        first_row[b] = row
        row += layout.block_len(b)
    blocks: list[int] = []
    for b in sorted(arrived):
        gap = range(blocks[-1] + 1, b) if blocks else range(0)
        if len(gap) <= GAP_BLOCKS and all(layout.owner[g] != rank for g in gap):
            blocks.extend(gap)
        blocks.append(b)
    rows = [torch.arange(first_row[b], first_row[b] + layout.block_len(b)) if b in first_row
            else torch.full((layout.block_len(b),), row) for b in blocks]
    return blocks, torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def _local_rows(layout: ShardLayout, rank: int) -> dict[int, int]:
    """Block -> its first row in rank ``rank``'s local tensors."""
    offsets, row = {}, 0
    for b in layout.blocks_of(rank):
        offsets[int(b)] = row
        row += layout.block_len(int(b))
    return offsets


def _rows_of(layout: ShardLayout, blocks, offsets: dict[int, int]) -> torch.Tensor:
    parts = [torch.arange(offsets[b], offsets[b] + layout.block_len(b)) for b in blocks]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _check(q, k, v, layout: ShardLayout, rank: int, world: int, enable_gqa: bool):
    if not isinstance(layout, ShardLayout):
        raise TypeError(f"layout={type(layout).__name__}: expected a ShardLayout from "
                        "sparseforge.distributed.plan_shards")
    if world != layout.world_size:
        raise ValueError(f"layout: planned for world_size={layout.world_size}, the process group "
                         f"has {world} ranks")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a [B, H, L_local, D] tensor")
        if t.shape[2] != layout.local_len(rank):
            raise ValueError(f"{name}: rank {rank} holds {layout.local_len(rank)} tokens in this "
                             f"layout, got L_local={t.shape[2]} (use sparseforge.distributed.shard)")
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "matching batch, kv heads and q/k head dims")
    if k.dtype != v.dtype or q.dtype != k.dtype:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one dtype")
    if q.shape[1] != k.shape[1] and (not enable_gqa or q.shape[1] % k.shape[1]):
        raise ValueError(f"q has {q.shape[1]} heads, k {k.shape[1]}: pass enable_gqa=True with "
                         "Hq a multiple of Hkv")


def attention(q, k, v, pattern, layout: ShardLayout, *, scale: float | None = None,
              enable_gqa: bool = False, return_lse: bool = False, group=None):
    """This rank's attention output ``[B, Hq, L_local, Dv]`` (and lse) for its shard of
    the sequence (``shard``), exact and differentiable: the keys it needs from each other
    rank (``layout.needs``) are exchanged once (all-to-all-v, overlapped with the
    attention to its own keys), the two parts merged by log-sum-exp."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check(q, k, v, layout, rank, world, enable_gqa)
    canonical = self_attention_pattern(pattern)
    if layout.pattern is not None and self_attention_pattern(layout.pattern) != canonical:
        raise ValueError(f"pattern {pattern!r}: the layout was planned for {layout.pattern!r}; "
                         "plan_shards again for this pattern")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    offsets = _local_rows(layout, rank)
    pos = layout.positions(rank)
    receive = [layout.needs[rank][s] for s in range(world)]
    send_to = [layout.needs[d][rank] for d in range(world)]
    routing = None
    node = pooled_node(canonical)
    if node is not None:  # route on the whole sequence's pooled summaries, fetch what was chosen
        with torch.no_grad():
            selection = route_across(node, canonical, q.detach(), k.detach(), layout, rank,
                                     scale, group)
        routing = {node: selection}
        chosen = selected_blocks(selection, pos, layout.seq_len, layout.block)
        chosen &= layout.reachable[rank]
        receive = [tuple(sorted(set(receive[s]) | {b for b in chosen if layout.owner[b] == s}))
                   if s != rank else () for s in range(world)]
        send_to = ask_owners(receive, group)
    # this rank's rows each other rank needs, in rank order, K and V side by side
    dk = k.shape[-1]
    kv = torch.cat([k, v], -1).permute(2, 0, 1, 3)  # [L_local, B, Hkv, Dk + Dv]
    sends = [_rows_of(layout, send_to[d], offsets) for d in range(world)]
    in_splits = [len(s) for s in sends]
    out_splits = [sum(layout.block_len(b) for b in receive[s]) for s in range(world)]
    send = kv.index_select(0, torch.cat(sends).to(kv.device))
    buffer, pending = start_exchange(send, in_splits, out_splits, group)
    mine = layout.blocks_of(rank)
    local_out, local_lse = _attend(q, k, v, canonical, layout, mine, mine, scale, enable_gqa,
                                   routing)
    received, local_out, local_lse = finish_exchange(buffer, pending, local_out, local_lse)
    received = received.permute(1, 2, 0, 3)  # [B, Hkv, N, Dk + Dv]
    arrived = [b for s in range(world) for b in receive[s]]
    if routing is not None:  # few spans of selected blocks, not one part per run
        arrived, rows = filled_spans(layout, arrived, rank)
        received = torch.cat([received, received.new_zeros((*received.shape[:2], 1,
                                                            received.shape[-1]))], 2)
        received = received.index_select(2, rows.to(received.device))
    remote = _attend(q, received[..., :dk], received[..., dk:], canonical, layout, mine, arrived,
                     scale, enable_gqa, routing)
    out, lse = merge([local_out, remote[0]], [local_lse, remote[1]])
    return (out, lse) if return_lse else out


def shard(x: torch.Tensor, layout: ShardLayout, *, dim: int = 2, group=None) -> torch.Tensor:
    """This rank's part of ``x`` (the whole sequence along ``dim``, on every rank): its
    blocks' tokens, in the layout's local order."""
    rank = dist.get_rank(group)
    if x.shape[dim] != layout.seq_len:
        raise ValueError(f"x: expected the whole sequence ({layout.seq_len} tokens) along dim "
                         f"{dim}, got {x.shape[dim]}")
    return x.index_select(dim, layout.positions(rank).to(x.device))


def unshard(y: torch.Tensor, layout: ShardLayout, *, dim: int = 2, group=None) -> torch.Tensor:
    """The whole sequence in original order, on every rank, from each rank's part ``y``
    (an all-gather; not differentiable)."""
    world = dist.get_world_size(group)
    longest = max(layout.local_len(r) for r in range(world))
    y = y.detach().movedim(dim, 0)
    padded = y.new_zeros((longest, *y.shape[1:]))
    padded[:y.shape[0]] = y
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    full = y.new_empty((layout.seq_len, *y.shape[1:]))
    for r in range(world):
        full[layout.positions(r).to(y.device)] = parts[r][:layout.local_len(r)]
    return full.movedim(0, dim)
