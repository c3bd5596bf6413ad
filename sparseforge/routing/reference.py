"""The torch reference of every routing rule: the oracle the generated pre-kernels'
indices are checked against, and the routing the CPU path runs.

Written literally (DESIGN section 3): pool, score, select. Routing is evaluated in
float32 whatever the inputs' dtype, as the pre-kernels do, so both pick the same blocks;
ties go to the lower index (a stable descending sort). ``route`` finds every dynamic node
of a head pattern, its candidates (the buckets its static siblings allow at least one
pair in) and returns node -> selection for ``semantics.pair_mask``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..ir.nodes import Intersection, Pattern, PerHead, walk
from ..ir.routing import (
    Clusters,
    DynamicPattern,
    Hierarchical,
    ThresholdBlocks,
    TopkBlocks,
    TopkChunks,
    TopkKeys,
    VerticalSlash,
)
from .selection import BlockSelection, ClusterSelection, LineSelection, bucket_of
from .shape_cache import ShapeCache

#: rows of the static mask evaluated at once when reducing it to bucket candidates
_ROW_CHUNK = 1024
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


def pool(x: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, how: str = "mean",
         sqrt_len: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled vectors ``[B, H, C, D]`` (fp32) of the tokens of ``x`` ``[B, H, L, D]`` at
    ``positions`` ``[L]`` per bucket, and the bucket sizes ``[B or 1, C]``. Buckets without
    a token pool to 0. ``sqrt_len`` scales each by sqrt(its size) (DHSA)."""
    b, h, _, d = x.shape
    c = starts.shape[-1] - 1
    idx = bucket_of(positions, starts.to(x.device))  # [B|1, L]
    idx = torch.where((idx >= 0) & (idx < c), idx, c)  # outside: a dummy bucket c
    idx = idx.expand(b, -1)
    ones = torch.ones_like(idx, dtype=torch.float32)
    sizes = torch.zeros(b, c + 1, device=x.device).scatter_add_(1, idx, ones)
    out = torch.zeros(b, h, c + 1, d, device=x.device)
    src = x.float()
    index = idx[:, None, :, None].expand(b, h, -1, d)
    if how == "mean":
        out.scatter_add_(2, index, src)
        out = out / sizes.clamp(min=1)[:, None, :, None]
    else:
        out = out.scatter_reduce(2, index, src, "amax", include_self=False)
    if sqrt_len:
        out = out * sizes.sqrt()[:, None, :, None]
    return out[:, :, :c], sizes[:, :c]


@lru_cache(maxsize=256)
def head_map(share: str, q_heads: int, kv_heads: int, device: str = "cpu") -> torch.Tensor:
    """Routing head of each query head: itself, its GQA group, or 0 (built once per device:
    a warm call copies nothing to the GPU)."""
    h = torch.arange(q_heads, device=device)
    return {"head": h, "group": h // (q_heads // kv_heads), "all": torch.zeros_like(h)}[share]


def bucket_scores(qbar: torch.Tensor, kbar: torch.Tensor, share: str) -> torch.Tensor:
    """``[B, Hr, Cq, Ck]``: the dot product of pooled q and pooled k of its kv head,
    summed over the query heads sharing a decision."""
    hq, hkv = qbar.shape[1], kbar.shape[1]
    k_of_q = kbar[:, torch.arange(hq, device=qbar.device) // (hq // hkv)]
    s = qbar @ k_of_q.transpose(-1, -2)  # [B, Hq, Cq, Ck]
    routing = head_map(share, hq, hkv, str(qbar.device))
    hr = {"head": hq, "group": hkv, "all": 1}[share]
    return torch.zeros(s.shape[0], hr, *s.shape[2:], device=s.device).index_add_(1, routing, s)


def select_topk(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Bool like ``scores``: the k best candidates per row, ties to the lower index."""
    keyed = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return (rank < k) & candidates


def select_coverage(scores: torch.Tensor, candidates: torch.Tensor, coverage: float,
                    scale: float) -> torch.Tensor:
    """Bool like ``scores``: the fewest candidates (best first, ties to the lower index)
    whose softmax over the candidates' scaled scores sums to >= ``coverage``."""
    keyed = (scores * scale).masked_fill(~candidates, float("-inf"))
    probs = torch.softmax(keyed, -1).nan_to_num(0.0)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the better ones
    keep_sorted = before < coverage
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep & candidates


# ------------------------------------------------------------------ candidates and route


def static_siblings(head: Pattern, node: DynamicPattern) -> list[Pattern]:
    """The other operands of the intersection holding ``node`` directly (none: every
    bucket is a candidate)."""
    for parent in walk(head):
        if isinstance(parent, Intersection) and any(p is node or p == node for p in parent.parts):
            others = [p for p in parent.parts if not (p is node or p == node)]
            dynamic = [p for p in others if any(isinstance(n, DynamicPattern) for n in walk(p))]
            if dynamic:
                raise ValueError(f"{node!r} & {dynamic[0]!r}: two routing nodes in one "
                                 "intersection are not supported; route once per pattern part")
            return others
    return []


def _static_mask_rows(siblings, rows: torch.Tensor, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[B or 1, len(rows), Lkv]``: the siblings' intersection on those rows."""
    from ..semantics import pair_mask

    j = torch.arange(kv_len, device=device)[None, :]
    out = torch.ones(1, len(rows), kv_len, dtype=torch.bool, device=device)
    for s in siblings:
        m = pair_mask(s, rows[:, None], j, q_len, kv_len)
        out = out & (m if m.dim() == 3 else m[None])
    return out & (rows[:, None] >= 0)[None]


def bucket_candidates(siblings, q_starts, k_starts, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[B or 1, Cq, Ck]``: buckets pairs where the siblings allow at least one pair."""
    cq, ck = q_starts.shape[-1] - 1, k_starts.shape[-1] - 1
    shift = kv_len - q_len
    unit_keys = ck == kv_len  # one key per bucket (topk_keys): the key one-hot is the identity
    kb = bucket_of(torch.arange(kv_len, device=device), k_starts.to(device))  # [B|1, Lkv]
    k_onehot = None if unit_keys else torch.nn.functional.one_hot(kb.clamp(0, ck - 1), ck).float()
    out = None
    for r0 in range(0, q_len, _ROW_CHUNK):
        rows = torch.arange(r0, min(q_len, r0 + _ROW_CHUNK), device=device)
        allowed = _static_mask_rows(siblings, rows, q_len, kv_len, device).float()  # [B|1, R, Lkv]
        qb = bucket_of(rows + shift, q_starts.to(device)).clamp(0, cq - 1)  # [B|1, R]
        q_onehot = torch.nn.functional.one_hot(qb, cq).float().transpose(-1, -2)  # [B|1, Cq, R]
        part = (q_onehot @ allowed if unit_keys else q_onehot @ allowed @ k_onehot) > 0
        out = part if out is None else out | part
    if out is None:
        out = torch.zeros(1, cq, ck, dtype=torch.bool, device=device)
    return out


_candidates = ShapeCache(256)


def _shape_only(siblings) -> bool:
    """Whether the static part's mask depends on the shapes only (no document ids)."""
    from ..ir.nodes import Documents

    return not any(isinstance(n, Documents) for s in siblings for n in walk(s))


def node_candidates(node, siblings, q_starts, k_starts, q_len: int, kv_len: int,
                    device) -> torch.Tensor:
    """``bucket_candidates`` of a routing node, cached when they depend on the shapes only
    (fixed blocks, no document ids): a warm call does no mask evaluation at all."""
    key = ((tuple(repr(s) for s in siblings), node.q_block, node.block, q_len, kv_len,
            str(device)) if isinstance(node, _BLOCK_NODES) and _shape_only(siblings) else None)
    return _candidates.get(key, lambda: bucket_candidates(siblings, q_starts, k_starts, q_len,
                                                          kv_len, device))


def _buckets(node, q_len: int, kv_len: int, device):
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


def cluster_affinity(node: Clusters, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, H, L, C]``: each unit-normalised token of ``x`` ``[B, H, L, D]`` dotted
    with the centroids of its head's kv head (``[Hkv or 1, C, D]``)."""
    d = x.shape[-1]
    cent = node.centroids.to(device=x.device, dtype=torch.float32)
    if cent.shape[-1] != d:
        raise ValueError(f"clusters(centroids=[{'x'.join(map(str, node.centroids.shape))}]): "
                         f"expected head dim {d}")
    return torch.nn.functional.normalize(x.float(), dim=-1) @ cent.transpose(-1, -2)[None]


def route_clusters(node: Clusters, q: torch.Tensor, k: torch.Tensor) -> ClusterSelection:
    """Membership of every query and key: the nearest centroid (ties to the lower one),
    or with ``balanced=w`` each centroid's ``w`` nearest tokens (ties to the lower
    position)."""
    hq, hkv = q.shape[1], k.shape[1]
    cent_heads = node.centroids.shape[0]
    if cent_heads not in (1, hkv):
        raise ValueError(f"clusters(centroids=[{'x'.join(map(str, node.centroids.shape))}]): "
                         f"expected {hkv} (kv heads) or 1 centroid sets")
    cent_q = node.centroids.repeat_interleave(hq // hkv, 0) if cent_heads > 1 else node.centroids

    def members(x, centroids):
        a = cluster_affinity(Clusters(centroids, node.balanced), x)  # [B, H, L, C]
        if node.balanced is None:
            best = a.argmax(-1, keepdim=True)  # the first maximum: ties to the lower centroid
            return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, best, True)
        w = min(node.balanced, a.shape[2])
        order = torch.sort(a, dim=2, descending=True, stable=True).indices[:, :, :w]
        return torch.zeros_like(a, dtype=torch.bool).scatter_(2, order, True)

    return ClusterSelection(members(q, cent_q), members(k, node.centroids), k.shape[2] - q.shape[2])


def _block_max_scores(q, k, rep, q_starts, q_block: int, kv_len: int) -> torch.Tensor:
    """fp32 ``[B, Hq, Cq, N]``: for each query bucket, the max over its queries of the
    dot product with each of its ``N`` representative keys ``rep`` ``[B, Hq, Cq, N]``."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    cq = rep.shape[2]
    p = torch.arange(lq, device=q.device) + (kv_len - lq)
    bucket = bucket_of(p, q_starts.to(q.device)).clamp(0, cq - 1)[0]  # [Lq] (blocks: unbatched)
    slot = bucket * q_block + (p - q_starts[0, bucket].to(q.device))
    rows = torch.zeros(b, hq, cq * q_block, d, device=q.device)
    rows[:, :, slot] = q.float()
    real = torch.zeros(cq * q_block, dtype=torch.bool, device=q.device)
    real[slot] = True
    kk = k.float()[:, torch.arange(hq, device=q.device) // (hq // hkv)]  # [B, Hq, Lkv, D]
    keys = torch.gather(kk, 2, rep.flatten(2)[..., None].expand(-1, -1, -1, d))
    keys = keys.view(b, hq, cq, rep.shape[-1], d)
    s = rows.view(b, hq, cq, q_block, d) @ keys.transpose(-1, -2)  # [B, Hq, Cq, qb, N]
    s = s.masked_fill(~real.view(cq, q_block)[None, None, :, :, None], float("-inf"))
    return s.amax(3)


def hierarchical_select(node: Hierarchical, q, k, q_starts, k_starts, cand) -> torch.Tensor:
    """Bool ``[B, Hq, Cq, Ck]``: HiP's tree search per query bucket (see ``Hierarchical``),
    over the hull of its candidate blocks; a child holding no candidate never wins."""
    b, hq = q.shape[:2]
    kv_len = k.shape[2]
    cq, ck = cand.shape[-2], cand.shape[-1]
    device = q.device
    cand = cand.expand(b, cq, ck)
    blocks = torch.arange(ck, device=device)
    has = cand.any(-1)
    lo0 = torch.where(cand, blocks, ck).amin(-1)  # [B, Cq]
    hi0 = torch.where(cand, blocks + 1, 0).amax(-1)
    lo0, hi0 = torch.where(has, lo0, 0), torch.where(has, hi0, 0)
    cum = torch.zeros(b, cq, ck + 1, dtype=torch.int32, device=device)
    cum[..., 1:] = cand.to(torch.int32).cumsum(-1)
    cum_heads = cum[:, None].expand(b, hq, cq, ck + 1)
    edges = lo0[..., None] + ((hi0 - lo0)[..., None] * torch.arange(node.k + 1, device=device)) // node.k
    lo = edges[..., :-1][:, None].expand(b, hq, cq, node.k).clone()  # [B, Hq, Cq, k] branches
    hi = edges[..., 1:][:, None].expand(b, hq, cq, node.k).clone()
    starts = k_starts[0].to(device)
    for _ in range(max(1, (ck - 1).bit_length())):
        # children in position order: halves of a wider branch; a one-block branch keeps
        # itself (and an empty second child)
        split = torch.where(hi - lo > 1, lo + (hi - lo + 1) // 2, hi)
        c_lo = torch.stack([lo, split], -1).flatten(-2)
        c_hi = torch.stack([split, hi], -1).flatten(-2)
        first_key = starts[c_lo.clamp(max=ck - 1)]
        last_key = starts[c_hi.clamp(max=ck)].clamp(max=kv_len) - 1
        rep = ((first_key + last_key) // 2).clamp(0, kv_len - 1)
        score = _block_max_scores(q, k, rep, q_starts, node.q_block, kv_len)
        inside = (torch.gather(cum_heads, 3, c_hi.clamp(max=ck))
                  - torch.gather(cum_heads, 3, c_lo.clamp(max=ck))) > 0
        score = torch.where(inside & (c_hi > c_lo), score, float("-inf"))
        keep = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :node.k]
        keep = keep.sort(-1).values  # back to position order
        alive = torch.gather(score, -1, keep) > float("-inf")
        lo = torch.where(alive, torch.gather(c_lo, -1, keep), 0)
        hi = torch.where(alive, torch.gather(c_hi, -1, keep), 0)
    selected = torch.zeros(b, hq, cq, ck + 1, dtype=torch.bool, device=device)
    selected.scatter_(-1, torch.where(hi - lo == 1, lo, ck), True)
    return selected[..., :ck] & cand[:, None]


def route_node(node: DynamicPattern, siblings, q: torch.Tensor, k: torch.Tensor, scale: float):
    """The selection of one dynamic node for this call's q ``[B, Hq, Lq, D]`` and k
    ``[B, Hkv, Lkv, D]``."""
    _, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    device = q.device
    if isinstance(node, VerticalSlash):
        return _vertical_slash(node, siblings, q, k, scale)
    if isinstance(node, Clusters):
        return route_clusters(node, q, k)
    q_starts, k_starts = _buckets(node, q_len, kv_len, device)
    if isinstance(node, Hierarchical):
        cand = node_candidates(node, siblings, q_starts, k_starts, q_len, kv_len, device)
        selected = hierarchical_select(node, q, k, q_starts, k_starts, cand)
        return BlockSelection(selected, q_starts, k_starts, head_map("head", hq, hkv, str(device)))
    if isinstance(node, TopkKeys):
        cand = node_candidates(node, siblings, q_starts, k_starts, q_len, kv_len, device)
        scores = key_bias(node, hq, kv_len, device)[:, :, None, :]  # [B|1, Hq, 1, Lkv]
        cq = q_starts.shape[-1] - 1
        scores = scores.expand(max(scores.shape[0], cand.shape[0], q.shape[0]), hq, cq, kv_len)
        selected = select_topk(scores, cand[:, None].expand_as(scores), node.k)
        return BlockSelection(selected, q_starts, k_starts, head_map("head", hq, hkv, str(device)))
    sqrt_len = isinstance(node, TopkChunks) or getattr(node, "scale_by_sqrt_len", False)
    how = getattr(node, "pool", "mean")
    positions_q = torch.arange(q_len, device=device) + (kv_len - q_len)
    qbar, _ = pool(q, positions_q, q_starts, how, sqrt_len)
    kbar, _ = pool(k, torch.arange(kv_len, device=device), k_starts, how, sqrt_len)
    scores = bucket_scores(qbar, kbar, node.share)
    cand = node_candidates(node, siblings, q_starts, k_starts, q_len, kv_len, device)[:, None]
    cand = cand.expand(scores.shape[0], scores.shape[1], -1, -1)
    if isinstance(node, ThresholdBlocks):
        selected = select_coverage(scores, cand, node.coverage, scale)
    else:
        selected = select_topk(scores, cand, node.k)
    return BlockSelection(selected, q_starts, k_starts, head_map(node.share, hq, hkv, str(device)))


def _diagonal_index(p: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index ``p - j + Lkv - 1`` of each (row, key) pair's diagonal, clamped; whether the
    diagonal exists): offsets beyond ``-(Lkv - 1)`` only occur for rows before the first
    key (Lq > Lkv) and are never selected."""
    off = p[:, None] - torch.arange(kv_len, device=p.device)[None, :] + kv_len - 1
    inside = off >= 0
    return off.clamp(min=0), inside


def line_masses(node: VerticalSlash, siblings, q, k, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(column masses ``[B, Hq, Lkv]``, diagonal masses ``[B, Hq, 2 Lkv - 1]``): the softmax
    of the last ``last_q`` queries over their allowed keys (fp32), summed per key and per
    diagonal ``p - j``."""
    b, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    device = q.device
    last = torch.arange(max(0, q_len - node.last_q), q_len, device=device)
    allowed = _static_mask_rows(siblings, last, q_len, kv_len, device)  # [B|1, R, Lkv]
    kk = k[:, torch.arange(hq, device=device) // (hq // hkv)].float()
    s = (q[:, :, last].float() @ kk.transpose(-1, -2)) * scale
    probs = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    off, inside = _diagonal_index(last + (kv_len - q_len), kv_len)  # [R, Lkv]
    slash = torch.zeros(b, hq, 2 * kv_len - 1, device=device)
    slash.index_add_(2, off.flatten(), (probs * inside).flatten(2))
    return probs.sum(2), slash


_line_candidates = ShapeCache(64)


def line_candidates(siblings, q_len: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns ``[B or 1, Lkv]``, diagonals ``[B or 1, 2 Lkv - 1]``) where the static part
    allows a pair on some row; cached per shape unless document ids make them data."""
    key = ((tuple(repr(s) for s in siblings), q_len, kv_len, str(device))
           if _shape_only(siblings) else None)
    return _line_candidates.get(key, lambda: _line_candidates_of(siblings, q_len, kv_len, device))


def _line_candidates_of(siblings, q_len: int, kv_len: int, device):
    col_cand = torch.zeros(1, kv_len, dtype=torch.bool, device=device)
    diag_cand = torch.zeros(1, 2 * kv_len - 1, dtype=torch.bool, device=device)
    for r0 in range(0, q_len, _ROW_CHUNK):
        rows = torch.arange(r0, min(q_len, r0 + _ROW_CHUNK), device=device)
        m = _static_mask_rows(siblings, rows, q_len, kv_len, device)
        col_cand = col_cand | m.any(1)
        o, inside = _diagonal_index(rows + (kv_len - q_len), kv_len)
        hits = torch.zeros(m.shape[0], 2 * kv_len - 1, dtype=torch.int32, device=device)
        hits.index_add_(1, o.flatten(), (m & inside).flatten(1).to(torch.int32))  # no sync
        diag_cand = diag_cand | (hits > 0)
    return col_cand, diag_cand


def _vertical_slash(node: VerticalSlash, siblings, q, k, scale) -> LineSelection:
    vertical, slash = line_masses(node, siblings, q, k, scale)
    col_cand, diag_cand = line_candidates(siblings, q.shape[2], k.shape[2], q.device)
    columns = select_topk(vertical, col_cand[:, None].expand_as(vertical), node.n_vertical)
    diagonals = select_topk(slash, diag_cand[:, None].expand_as(slash), node.n_slash)
    return LineSelection(columns, diagonals)


def route(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float,
          prekernels: str | None = None) -> dict:
    """node -> selection for every dynamic node of a (canonical, single-head) pattern.

    ``prekernels``: ``"compiled"`` or ``"interpret"`` routes with the generated
    pre-kernels (``routing/kernels.py``, ``routing/lines.py``; ``vertical_slash`` beside
    document ids uses the torch reference); ``None`` routes with the torch reference."""
    if isinstance(pattern, PerHead):
        raise ValueError("per_head with routing nodes is not supported yet: route one pattern "
                         "for all heads (share='head' decides per head)")
    out = {}
    for node in walk(pattern):
        if isinstance(node, DynamicPattern) and node not in out:
            siblings = static_siblings(pattern, node)
            if prekernels and isinstance(node, Hierarchical):
                from .hip import route_hip

                indices, q_starts, k_starts, heads = route_hip(
                    node, siblings, q, k, interpret=prekernels == "interpret")
                out[node] = BlockSelection.from_fixed_k(indices, q_starts, k_starts, heads)
                continue
            if prekernels and isinstance(node, VerticalSlash):
                from .lines import lines_supported, route_lines

                if lines_supported(siblings):
                    out[node] = route_lines(node, siblings, q, k, scale,
                                            interpret=prekernels == "interpret")[0]
                    continue
            if prekernels and isinstance(node, (TopkBlocks, TopkChunks, ThresholdBlocks)):
                from .kernels import route_prekernels

                indices, _, call, heads = route_prekernels(node, siblings, q, k, scale,
                                                           interpret=prekernels == "interpret")
                out[node] = BlockSelection.from_fixed_k(indices, call.q_starts, call.k_starts,
                                                        heads)
            else:
                out[node] = route_node(node, siblings, q, k, scale)
    return out
