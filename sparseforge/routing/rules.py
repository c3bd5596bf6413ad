"""The routing rules with torch ops: pool, score, select (block rules), HiP's tree
search, nearest-centroid clusters and MInference's lines.

The production torch implementation: the CPU path routes with it, and on a GPU the
generated pre-kernels (``runtime.prekernels``) compute the same selections (the tests
check them against each other and both against the literal loops of
``sparseforge.oracle``). Routing is evaluated in float32 whatever the inputs' dtype, as
the pre-kernels do, so both pick the same blocks; ties go to the lower index (a stable
descending sort). ``route`` finds every dynamic node of a head pattern and its
candidates (the buckets its static siblings allow at least one pair in) and returns
node -> selection for ``semantics.pair_mask``. The rules themselves are specified in
docs/semantics.md.
"""

from __future__ import annotations

import torch

from ..ir.nodes import Pattern, PerHead, walk
from ..ir.routing import (
    Clusters,
    DynamicPattern,
    Hierarchical,
    ThresholdBlocks,
    TopkChunks,
    TopkKeys,
    VerticalSlash,
)
from ..ir.split import static_siblings
from .geometry import (
    diagonal_index,
    head_map,
    key_bias,
    line_candidates,
    node_buckets,
    node_candidates,
    static_mask_rows,
)
from .selection import BlockSelection, ClusterSelection, LineSelection, bucket_of


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
    q_starts, k_starts = node_buckets(node, q_len, kv_len, device)
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
    sqrt_len = pooled_with_sqrt_len(node)
    how = getattr(node, "pool", "mean")
    positions_q = torch.arange(q_len, device=device) + (kv_len - q_len)
    qbar, _ = pool(q, positions_q, q_starts, how, sqrt_len)
    kbar, _ = pool(k, torch.arange(kv_len, device=device), k_starts, how, sqrt_len)
    return select_pooled(node, siblings, qbar, kbar, q_starts, k_starts, q_len, kv_len, scale)


def pooled_with_sqrt_len(node) -> bool:
    """Whether a pooled rule scales each bucket's vector by sqrt(its size) (DHSA)."""
    return isinstance(node, TopkChunks) or getattr(node, "scale_by_sqrt_len", False)


def select_pooled(node, siblings, qbar: torch.Tensor, kbar: torch.Tensor, q_starts, k_starts,
                  q_len: int, kv_len: int, scale: float,
                  rows: torch.Tensor | None = None) -> BlockSelection:
    """The selection of a pooled rule (``topk_blocks``, ``topk_chunks``,
    ``threshold_blocks``) from the pooled queries ``[B, Hq, Cq, D]`` and keys ``[B, Hkv,
    Ck, D]``: scored, restricted to the candidates its static siblings allow, selected.
    Context parallelism calls it with the pooled vectors summed across ranks, and
    ``rows``: the query buckets it serves, the only ones scored (the others select
    nothing)."""
    hq, hkv, device = qbar.shape[1], kbar.shape[1], qbar.device
    scores = bucket_scores(qbar if rows is None else qbar[:, :, rows], kbar, node.share)
    cand = node_candidates(node, siblings, q_starts, k_starts, q_len, kv_len, device)[:, None]
    cand = cand.expand(scores.shape[0], scores.shape[1], -1, -1)
    if rows is not None:
        cand = cand[:, :, rows]
    if isinstance(node, ThresholdBlocks):
        selected = select_coverage(scores, cand, node.coverage, scale)
    else:
        selected = select_topk(scores, cand, node.k)
    if rows is not None:
        served = selected.new_zeros((*selected.shape[:2], qbar.shape[2], selected.shape[-1]))
        served[:, :, rows] = selected
        selected = served
    return BlockSelection(selected, q_starts, k_starts, head_map(node.share, hq, hkv, str(device)))


def line_masses(node: VerticalSlash, siblings, q, k, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(column masses ``[B, Hq, Lkv]``, diagonal masses ``[B, Hq, 2 Lkv - 1]``): the softmax
    of the last ``last_q`` queries over their allowed keys (fp32), summed per key and per
    diagonal ``p - j``."""
    b, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    device = q.device
    last = torch.arange(max(0, q_len - node.last_q), q_len, device=device)
    allowed = static_mask_rows(siblings, last, q_len, kv_len, device)  # [B|1, R, Lkv]
    kk = k[:, torch.arange(hq, device=device) // (hq // hkv)].float()
    s = (q[:, :, last].float() @ kk.transpose(-1, -2)) * scale
    probs = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    off, inside = diagonal_index(last + (kv_len - q_len), kv_len)  # [R, Lkv]
    slash = torch.zeros(b, hq, 2 * kv_len - 1, device=device)
    slash.index_add_(2, off.flatten(), (probs * inside).flatten(2))
    return probs.sum(2), slash


def _vertical_slash(node: VerticalSlash, siblings, q, k, scale) -> LineSelection:
    vertical, slash = line_masses(node, siblings, q, k, scale)
    col_cand, diag_cand = line_candidates(siblings, q.shape[2], k.shape[2], q.device)
    columns = select_topk(vertical, col_cand[:, None].expand_as(vertical), node.n_vertical)
    diagonals = select_topk(slash, diag_cand[:, None].expand_as(slash), node.n_slash)
    return LineSelection(columns, diagonals)


def route(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict:
    """node -> selection for every dynamic node of a (canonical, single-head) pattern,
    routed with torch ops (``runtime.prekernels.route_with_prekernels`` is the same with
    the generated pre-kernels)."""
    if isinstance(pattern, PerHead):
        raise ValueError("per_head with routing nodes is not supported yet: route one pattern "
                         "for all heads (share='head' decides per head)")
    out = {}
    for node in walk(pattern):
        if isinstance(node, DynamicPattern) and node not in out:
            out[node] = route_node(node, static_siblings(pattern, node), q, k, scale)
    return out
