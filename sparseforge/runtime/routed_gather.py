"""Block-routed attention with torch ops in memory and work linear in the sequence.

``routed_torch.routed_attention`` attends every row chunk against every key: exact, but
a training step keeps each chunk's ``[B, H, rows, Lkv]`` probabilities for the backward
(O(Lq * Lkv) memory) and does the work of dense attention. A block-routed pattern (MoBA,
NSA's selection branch: one ``topk_blocks``, ``topk_chunks``, ``threshold_blocks`` or
``hierarchical`` node beside a static part) reaches few keys per row, so here the pairs
are split in two disjoint parts, each attended on its own keys only, and merged by
log-sum-exp:

* **static tiles**: per chunk of ``CHUNK_ROWS`` query rows, the key tiles (``KEY_TILE``
  keys) of the static part's closed-form segments (the part allowed whatever is
  selected, ``ir.split.static_part``). The chunk attends to those keys gathered, with the
  pattern's exact mask (the selection included) on them;
* **selected buckets**: per (batch, head, selected key bucket), the query rows that
  selected it (the transposed selection), against that bucket's keys outside the row's
  static tiles, with the pattern's mask with the routing node read as selected.

Every allowed pair is in exactly one part (a pattern has no negation, so it allows
nothing outside its static part and its selection). With a gradient wanted, each chunk
and each bucket runs under ``torch.utils.checkpoint``: scores are recomputed in the
backward, so what stays alive is the inputs and one partial (lse, out) per row and
selected bucket. Memory is O(Lq * (k + 1) * Dv) and the work O(Lq * (static keys +
k * bucket)). This is the torch path (CPU, and training on GPUs until the routed
backward kernels land): it reads the selection's size to the host to group rows by
bucket.

Patterns it does not cover return None and run the row-chunk path: document ids or
mask tables, score modifiers, DMA's key bias (``topk_keys``), line or cluster routing,
two routing nodes, per-head patterns. Routing decisions are not differentiated (as in
MoBA and NSA).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..ir.nodes import Documents, Full, MaskTable, walk
from ..ir.routing import TopkKeys
from ..ir.scores import score_spec
from ..ir.split import replace_routing, static_part
from ..planner.ranges import tile_segments
from ..planner.schedule import visit_matrices
from ..routing.selection import BlockSelection, ascending_indices
from ..semantics import pair_mask

#: query rows attended at once over their static tiles
CHUNK_ROWS = 128
#: keys per static tile
KEY_TILE = 64
#: gather when the dense path's fp32 probabilities would exceed ``DENSE_BYTES``, or when
#: they exceed ``GATHER_MIN_BYTES`` and gathering computes at most ``GATHER_FRACTION`` of
#: the dense pairs (short or nearly dense problems run faster on the row-chunk path,
#: whose memory is then small anyway). On 1 CPU thread, H=4, D=64, top-4 of 64- and
#: 128-key blocks: gathering ran the forward 2x faster from L=1280 (26 MB) and the
#: forward+backward no slower; at L=1024 (16 MB) the row chunks trained faster
GATHER_FRACTION = 0.5
GATHER_MIN_BYTES = 24 << 20
DENSE_BYTES = 1 << 30


def gathered_routed_attention(q, k, v, canonical, routing: dict, scale: float):
    """(out ``[B, Hq, Lq, Dv]`` in q's dtype, lse ``[B, Hq, Lq]`` fp32), or None where the
    pattern is not block-routed (see the module docstring)."""
    if not _covered(canonical, routing) or 0 in (q.shape[2], k.shape[2]):
        return None
    (node, sel), = routing.items()
    q_len, kv_len = q.shape[2], k.shape[2]
    static, _ = visit_matrices(tile_segments(static_part(canonical)), q_len, kv_len,
                               CHUNK_ROWS, KEY_TILE)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    run = _Run(q, k, v, canonical, scale, compute, q_len, kv_len)
    per_row = _per_row_selection(run, sel)
    if not _worth_gathering(run, static, per_row, sel):
        return None
    static = torch.as_tensor(static, device=q.device)  # [chunks, tiles]
    out_s, lse_s = _static_tiles(run, static, node, sel)
    rows, lse_r, out_r = _selected_buckets(run, static, replace_routing(canonical, Full()), sel,
                                           per_row)
    out, lse = _merge(out_s, lse_s, rows, lse_r, out_r)
    return out.to(q.dtype), lse.float()


def _covered(canonical, routing: dict) -> bool:
    nodes = list(walk(canonical))
    return (len(routing) == 1 and isinstance(next(iter(routing.values())), BlockSelection)
            and not any(isinstance(n, (Documents, MaskTable, TopkKeys)) for n in nodes)
            and not score_spec(canonical).any)


class _Run:
    """One call's inputs and sizes, shared by both parts."""

    def __init__(self, q, k, v, pattern, scale, compute, q_len, kv_len):
        self.q, self.k, self.v, self.pattern, self.scale = q, k, v, pattern, scale
        self.compute, self.q_len, self.kv_len = compute, q_len, kv_len
        self.b, self.hq = q.shape[:2]
        self.group = self.hq // k.shape[1]
        self.wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))

    def call(self, fn, *pieces):
        """``fn(*pieces)``, recomputed in the backward when a gradient is wanted. The
        pieces are this chunk's or bucket's own rows and keys, cut from q, k and v by one
        gather each for all of them (a gather or slice per piece would give each piece's
        backward a gradient the size of the whole input)."""
        if self.wants_grad:
            return checkpoint(fn, *pieces, use_reentrant=False)
        return fn(*pieces)


def _softmax_parts(s: torch.Tensor, allowed: torch.Tensor, vals: torch.Tensor):
    """(out, lse) of scores ``s`` ``[..., n]`` over the ``allowed`` keys; no key: 0, -inf."""
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return probs @ vals, lse


def _static_tiles(run: _Run, static: torch.Tensor, node, sel: BlockSelection):
    """Per chunk of rows, attention over its static key tiles: ``[B, Hq, Lq, Dv]`` and
    ``[B, Hq, Lq]``."""
    b, hq, device = run.b, run.hq, run.q.device
    width = int(static.sum(-1).max())
    if width == 0:  # no static part: every row's keys come from its selection
        out = torch.zeros(b, hq, run.q_len, run.v.shape[-1], dtype=run.compute, device=device)
        return out, torch.full((b, hq, run.q_len), float("-inf"), dtype=run.compute,
                               device=device)
    tiles = ascending_indices(static, width).long()  # [chunks, W]
    heads_sel = sel.selected[:, sel.heads.to(sel.selected.device)]  # [B, Hq, Cq, Ck]
    keys = (tiles[:, :, None] * KEY_TILE + torch.arange(KEY_TILE, device=device)).flatten(1)
    valid = (keys >= 0) & (keys < run.kv_len)  # [chunks, W * KEY_TILE]
    keys = torch.where(valid, keys, 0)
    k_pieces, v_pieces = (t.index_select(2, keys.flatten()).split(keys.shape[1], dim=2)
                          for t in (run.k, run.v))
    outs, lses = [], []
    for c, q_piece in enumerate(run.q.split(CHUNK_ROWS, dim=2)):
        rows = torch.arange(c * CHUNK_ROWS, c * CHUNK_ROWS + q_piece.shape[2], device=device)

        def chunk(q, k, v, rows=rows, keys=keys[c], valid=valid[c]):
            kg, vg = (t.to(run.compute).repeat_interleave(run.group, 1) for t in (k, v))
            s = q.to(run.compute) @ kg.transpose(-1, -2) * run.scale
            routed = _SelectedOnPairs(sel, heads_sel, rows + (run.kv_len - run.q_len), keys)
            allowed = pair_mask(run.pattern, rows[:, None], keys[None, :], run.q_len,
                                run.kv_len, {node: routed}) & valid
            return _softmax_parts(s, allowed, vg)

        out, lse = run.call(chunk, q_piece, k_pieces[c], v_pieces[c])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _per_row_selection(run: _Run, sel: BlockSelection) -> torch.Tensor:
    """Bool ``[B, Hq, Lq, Ck]``: the key buckets each query row selected."""
    heads_sel = sel.selected[:, sel.heads.to(sel.selected.device)]  # [B, Hq, Cq, Ck]
    cq, ck = heads_sel.shape[-2:]
    positions = torch.arange(run.q_len, device=run.q.device) + (run.kv_len - run.q_len)
    qb = _buckets(positions[None], sel.q_starts).expand(run.b, -1)  # [B, Lq]
    real = ((qb >= 0) & (qb < cq))[:, None, :, None]
    return torch.gather(heads_sel, 2, qb.clamp(0, cq - 1)[:, None, :, None]
                        .expand(-1, run.hq, -1, ck)) & real


def _worth_gathering(run: _Run, static, per_row: torch.Tensor, sel: BlockSelection) -> bool:
    """Pairs the two parts compute (static tiles per chunk, selected buckets per row)
    against the dense pairs (one host read: the selection's size)."""
    dense = run.b * run.hq * run.q_len * run.kv_len
    if dense * 4 > DENSE_BYTES:
        return True
    if dense * 4 < GATHER_MIN_BYTES:
        return False
    rows = [min(CHUNK_ROWS, run.q_len - r0) for r0 in range(0, run.q_len, CHUNK_ROWS)]
    static_pairs = float((static.sum(-1) * rows).sum()) * KEY_TILE * run.b * run.hq
    starts = sel.k_starts.to(per_row.device).expand(run.b, -1)
    sizes = (starts[:, 1:] - starts[:, :-1]).to(torch.float32)  # [B, Ck]
    selected_pairs = float((per_row.sum(2).to(torch.float32) * sizes[:, None]).sum())
    return static_pairs + selected_pairs <= GATHER_FRACTION * dense


def _selected_buckets(run: _Run, static: torch.Tensor, as_selected, sel: BlockSelection,
                      per_row: torch.Tensor):
    """Per (batch, head, selected bucket), the rows that selected it against the bucket's
    keys outside their static tiles: (flat row ``(b * Hq + h) * Lq + i`` ``[N]``, lse
    ``[N]``, out ``[N, Dv]``), one entry per row and selected bucket."""
    device, hq = run.q.device, run.hq
    picks = per_row.permute(0, 1, 3, 2).nonzero()  # (b, h, bucket, row), rows grouped
    starts = sel.k_starts.to(device).expand(run.b, -1).tolist()
    groups, counts = torch.unique_consecutive(picks[:, :3], dim=0, return_counts=True)
    work = []  # (flat rows, rows, keys, kv rows of the flattened k) per non-empty bucket
    pieces = picks[:, 3].split(counts.tolist()) if len(picks) else ()
    for (bi, h, c), rows in zip(groups.tolist(), pieces):
        k0, k1 = starts[bi][c], min(starts[bi][c + 1], run.kv_len)
        if k1 > k0:
            keys = torch.arange(k0, k1, device=device)
            kv_rows = (bi * run.k.shape[1] + h // run.group) * run.kv_len + keys
            work.append(((bi * hq + h) * run.q_len + rows, rows, keys, kv_rows))
    if not work:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.to(run.compute), torch.zeros(0, run.v.shape[-1], dtype=run.compute,
                                                         device=device)
    flat_rows = torch.cat([w[0] for w in work])
    q_pieces = run.q.reshape(-1, run.q.shape[-1]).index_select(0, flat_rows).split(
        [len(w[0]) for w in work])
    kv_index = torch.cat([w[3] for w in work])
    k_pieces, v_pieces = (t.reshape(-1, t.shape[-1]).index_select(0, kv_index).split(
        [len(w[2]) for w in work]) for t in (run.k, run.v))
    lses, outs = [], []
    for (_, rows, keys, _), q_piece, k_piece, v_piece in zip(work, q_pieces, k_pieces, v_pieces):
        in_static = static[torch.div(rows, CHUNK_ROWS, rounding_mode="floor")][
            :, torch.div(keys, KEY_TILE, rounding_mode="floor")]  # [rows, keys]

        def bucket(q, k, v, rows=rows, keys=keys, in_static=in_static):
            s = q.to(run.compute) @ k.to(run.compute).T * run.scale
            allowed = pair_mask(as_selected, rows[:, None], keys[None, :], run.q_len,
                                run.kv_len) & ~in_static
            return _softmax_parts(s, allowed, v.to(run.compute))

        out, lse = run.call(bucket, q_piece, k_piece, v_piece)
        lses.append(lse)
        outs.append(out)
    return flat_rows, torch.cat(lses), torch.cat(outs)


def _merge(out_s, lse_s, rows, lse_r, out_r):
    """The static part's (out, lse) per row merged with the selected buckets' partials
    (several per row) by log-sum-exp. The running maximum only keeps exp in range (it
    is not differentiated: the result does not depend on it)."""
    b, hq, q_len, dv = out_s.shape
    flat_lse = lse_s.reshape(-1)
    m = flat_lse.detach().clone()
    m = m.scatter_reduce(0, rows, lse_r.detach(), reduce="amax", include_self=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    w_s = torch.exp(flat_lse - m)
    w_r = torch.exp(lse_r - m[rows])
    norm = w_s.index_add(0, rows, w_r)
    acc = (w_s[:, None] * out_s.reshape(-1, dv)).index_add(0, rows, w_r[:, None] * out_r)
    empty = norm == 0
    out = acc / torch.where(empty, 1.0, norm)[:, None]
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, norm)))
    return out.view(b, hq, q_len, dv), lse.view(b, hq, q_len)


def _buckets(positions, starts) -> torch.Tensor:
    """The bucket of each position ``[B|1, M]`` given bucket starts ``[B|1, C + 1]``:
    -1 before the first, C at or past the end (``[B or 1, M]``)."""
    starts = starts.to(positions.device).contiguous()
    if starts.shape[0] == 1:
        idx = torch.searchsorted(starts[0], positions.contiguous(), right=True) - 1
    else:
        positions = positions.expand(starts.shape[0], -1).contiguous()
        idx = torch.searchsorted(starts, positions, right=True) - 1
    return torch.where(positions >= starts[:, -1:], starts.shape[-1] - 1, idx)


class _SelectedOnPairs:
    """A selection (``heads_sel``: per query head ``[B, Hq, Cq, Ck]``) on one chunk's pairs
    (rows at ``positions`` x ``keys``), in the shape ``semantics.pair_mask`` gives routing
    nodes there: ``[B, Hq, rows, keys]``."""

    def __init__(self, sel: BlockSelection, heads_sel, positions, keys):
        self.sel, self.heads_sel, self.positions, self.keys = sel, heads_sel, positions, keys

    def pair_mask(self, p, j) -> torch.Tensor:
        sel, heads_sel = self.sel, self.heads_sel  # [B, Hq, Cq, Ck]
        b, hq, cq, ck = heads_sel.shape
        qb = _buckets(self.positions[None], sel.q_starts).expand(b, -1)  # [B, rows]
        kb = _buckets(self.keys[None], sel.k_starts).expand(b, -1)  # [B, keys]
        rows_sel = torch.gather(heads_sel, 2, qb.clamp(0, cq - 1)[:, None, :, None]
                                .expand(-1, hq, -1, ck))  # [B, Hq, rows, Ck]
        picked = torch.gather(rows_sel, 3, kb.clamp(0, ck - 1)[:, None, None, :]
                              .expand(-1, hq, rows_sel.shape[2], -1))  # [B, Hq, rows, keys]
        real = ((qb >= 0) & (qb < cq))[:, None, :, None] & ((kb >= 0) & (kb < ck))[:, None, None, :]
        return picked & real
