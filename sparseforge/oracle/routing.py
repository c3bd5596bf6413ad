"""The routing rules as literal loops: per batch, routing head and query bucket, pool,
score, pick (docs/semantics.md, "Routing"). Slow and plain on purpose: they share no
code with ``sparseforge.routing`` or the generated pre-kernels they judge.

Routing is decided in float32 whatever the inputs' dtype (as the semantics say), ties go
to the lower index, and a routing node intersected with static parts picks among the
buckets those parts allow at least one pair in (its candidates).
"""

from __future__ import annotations

import math

import torch

from ..ir.routing import (
    Clusters,
    DynamicPattern,
    Hierarchical,
    ThresholdBlocks,
    TopkChunks,
    TopkKeys,
    VerticalSlash,
)
from .grid import Grid


def routed_mask(node: DynamicPattern, static: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Bool ``[B, Hq, Lq, Lkv]``: the pairs ``node`` selects, its candidates being where
    ``static`` ``[B or 1, Lq, Lkv]`` (what its static siblings allow) has a pair; the
    intersection with the siblings themselves is the caller's."""
    if grid.content is None:
        raise ValueError(f"{node!r} is decided from q and k at run time: pass content=(q, k) "
                         "to dense_mask")
    q, k, scale = grid.content
    q, k = q.detach(), k.detach()  # routing decisions carry no gradient
    if isinstance(node, VerticalSlash):
        return _vertical_slash(node, static, q.float(), k.float(), scale, grid)
    if isinstance(node, Clusters):
        return _clusters(node, q.float(), k.float(), grid)
    if isinstance(node, TopkKeys):
        return _topk_keys(node, static, q, grid)
    return _block_rule(node, static, q.float(), k.float(), scale, grid)


def routing_members(share: str, hq: int, hkv: int) -> list[list[int]]:
    """The query heads of each routing head: one each, a GQA group each, or all in one."""
    group = hq // hkv
    if share == "head":
        return [[h] for h in range(hq)]
    if share == "group":
        return [list(range(g * group, (g + 1) * group)) for g in range(hkv)]
    return [list(range(hq))]


def ranked(scores: dict[int, float]) -> list[int]:
    """Candidates best first, ties to the lower index."""
    return sorted(scores, key=lambda c: (-scores[c], c))


def _buckets(node, grid: Grid, batch: int) -> tuple[list[list[int]], list[list[int]]]:
    """(query rows of each query bucket, keys of each key bucket) for batch ``batch``."""
    p = (torch.arange(grid.q_len) + grid.kv_len - grid.q_len).tolist()
    if isinstance(node, TopkChunks):
        bounds = node.boundaries if node.boundaries.dim() == 2 else node.boundaries[None]
        b = bounds[min(batch, bounds.shape[0] - 1)].tolist()
        keys = [list(range(b[c], b[c + 1])) for c in range(len(b) - 1)]
        rows = [[i for i in range(grid.q_len) if b[c] <= p[i] < b[c + 1]] for c in range(len(b) - 1)]
        return rows, keys
    qb = node.query_block or node.block
    first = math.floor(p[0] / qb) if p else 0
    last = math.floor((grid.kv_len - 1) / qb)
    rows = [[i for i in range(grid.q_len) if math.floor(p[i] / qb) == c]
            for c in range(first, last + 1)]
    keys = [list(range(s, min(s + node.block, grid.kv_len))) for s in range(0, grid.kv_len, node.block)]
    return rows, keys


def _candidates(static_b: torch.Tensor, rows: list[int], keys_of: list[list[int]]) -> list[int]:
    """Key buckets where the static part allows some (row, key) pair."""
    if not rows:
        return []
    seen = static_b[rows].any(0)
    return [c for c, keys in enumerate(keys_of) if keys and bool(seen[keys].any())]


def _pooled(x: torch.Tensor, tokens: list[int], how: str, sqrt_len: bool) -> torch.Tensor:
    v = x[tokens].mean(0) if how == "mean" else x[tokens].amax(0)
    return v * math.sqrt(len(tokens)) if sqrt_len else v


def _block_rule(node, static, q, k, scale: float, grid: Grid) -> torch.Tensor:
    """topk_blocks, topk_chunks, threshold_blocks and hierarchical."""
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.zeros(b, hq, grid.q_len, grid.kv_len, dtype=torch.bool, device=q.device)
    how = getattr(node, "pool", "mean")
    sqrt_len = isinstance(node, TopkChunks) or getattr(node, "scale_by_sqrt_len", False)
    for bi in range(b):
        rows_of, keys_of = _buckets(node, grid, bi)
        static_b = static[min(bi, static.shape[0] - 1)]
        # every key bucket's pooled vector, per kv head: [Hkv, Ck, D]
        kbar = torch.stack([torch.stack([_pooled(k[bi, g], keys, how, sqrt_len) if keys
                                         else k.new_zeros(k.shape[-1]) for keys in keys_of])
                            for g in range(hkv)])
        for heads in routing_members(node.share, hq, hkv):
            for rows in rows_of:
                cands = _candidates(static_b, rows, keys_of)
                if not cands:
                    continue
                if isinstance(node, Hierarchical):
                    chosen = hip_search(node, q[bi, heads[0]], k[bi, heads[0] // group], rows,
                                        cands, grid.kv_len)
                else:  # a bucket pair's score: summed over the heads sharing the decision
                    dots = sum(kbar[h // group] @ _pooled(q[bi, h], rows, how, sqrt_len)
                               for h in heads).tolist()
                    scores = {c: dots[c] for c in cands}
                    chosen = (_coverage(scores, node.coverage, scale)
                              if isinstance(node, ThresholdBlocks) else ranked(scores)[:node.k])
                keys = [j for c in chosen for j in keys_of[c]]
                for h in heads:
                    out[bi, h, torch.tensor(rows)[:, None], torch.tensor(keys)[None, :]] = True
    return out


def _coverage(scores: dict[int, float], coverage: float, scale: float) -> list[int]:
    """The fewest candidates, best first, whose softmax over the scaled scores reaches
    ``coverage``."""
    top = max(scores.values())
    z = {c: math.exp((s - top) * scale) for c, s in scores.items()}
    total = sum(z.values())
    kept, mass = [], 0.0
    for c in ranked(scores):
        if mass >= coverage:
            break
        kept.append(c)
        mass += z[c] / total
    return kept


def hip_search(node: Hierarchical, qh, kh, rows: list[int], cands: list[int], kv_len: int) -> list[int]:
    """HiP's tree search for one query block and head: ``k`` equal branches over the
    candidates' span, split each in two, score each child by its middle key (the max over
    the block's queries), keep the best ``k``, until every branch is one block."""
    top, block = node.k, node.block
    lo0, hi0 = cands[0], cands[-1] + 1
    edges = [lo0 + (hi0 - lo0) * n // top for n in range(top + 1)]
    branches = [(edges[n], edges[n + 1]) for n in range(top) if edges[n + 1] > edges[n]]
    while any(e - s > 1 for s, e in branches):
        children = []
        for s, e in branches:
            if e - s > 1:
                m = s + (e - s + 1) // 2
                children += [(s, m), (m, e)]
            else:
                children.append((s, e))
        scored = []
        for s, e in children:
            if not any(s <= x < e for x in cands):
                continue
            middle = (s * block + min(e * block, kv_len) - 1) // 2
            score = max(float(qh[r] @ kh[middle]) for r in rows)
            scored.append((-score, s, e))
        branches = sorted((s, e) for _, s, e in sorted(scored)[:top])
    return [s for s, _ in branches if s in cands]


def _topk_keys(node: TopkKeys, static, q, grid: Grid) -> torch.Tensor:
    """DMA: per query head and query block (aligned on positions), the ``k`` allowed keys
    with the largest bias."""
    b, hq = q.shape[:2]
    bias = node.bias if node.bias.dim() == 3 else node.bias[None]
    if bias.shape[1:] != (hq, grid.kv_len):
        raise ValueError(f"topk_keys(bias=...): expected [Hq={hq}, Lkv={grid.kv_len}]")
    out = torch.zeros(b, hq, grid.q_len, grid.kv_len, dtype=torch.bool, device=q.device)
    p = (torch.arange(grid.q_len) + grid.kv_len - grid.q_len).tolist()
    blocks: dict[int, list[int]] = {}
    for i in range(grid.q_len):
        blocks.setdefault(math.floor(p[i] / node.query_block), []).append(i)
    for bi in range(b):
        static_b = static[min(bi, static.shape[0] - 1)]
        for h in range(hq):
            weights = bias[min(bi, bias.shape[0] - 1), h].float().tolist()
            for rows in blocks.values():
                seen = static_b[rows].any(0).tolist()
                keys = ranked({j: weights[j] for j in range(grid.kv_len) if seen[j]})[:node.k]
                if keys:
                    out[bi, h, torch.tensor(rows)[:, None], torch.tensor(keys)[None, :]] = True
    return out


def _clusters(node: Clusters, q, k, grid: Grid) -> torch.Tensor:
    """Routing Transformer: unit-normalised tokens to their nearest centroid (or each
    centroid's ``balanced`` nearest tokens); a pair interacts iff they share a cluster."""
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    group = hq // hkv
    cent_all = node.centroids.float().to(q.device)
    out = torch.zeros(b, hq, grid.q_len, grid.kv_len, dtype=torch.bool, device=q.device)
    for bi in range(b):
        for h in range(hq):
            cent = cent_all[min(h // group, cent_all.shape[0] - 1)]
            aq = torch.nn.functional.normalize(q[bi, h], dim=-1) @ cent.T
            ak = torch.nn.functional.normalize(k[bi, h // group], dim=-1) @ cent.T
            nearest_q, nearest_k = aq.argmax(-1).tolist(), ak.argmax(-1).tolist()  # first max
            for c in range(cent.shape[0]):
                if node.balanced is None:
                    qs = [i for i, n in enumerate(nearest_q) if n == c]
                    ks = [j for j, n in enumerate(nearest_k) if n == c]
                else:
                    qs = ranked(dict(enumerate(aq[:, c].tolist())))[:node.balanced]
                    ks = ranked(dict(enumerate(ak[:, c].tolist())))[:node.balanced]
                if qs and ks:
                    out[bi, h, torch.tensor(qs)[:, None], torch.tensor(ks)[None, :]] = True
    return out


def _vertical_slash(node: VerticalSlash, static, q, k, scale: float, grid: Grid) -> torch.Tensor:
    """MInference: the softmax of the last ``last_q`` queries over their allowed keys,
    summed per key (columns) and per diagonal ``p - j``; keep the top ``n_vertical``
    columns and ``n_slash`` diagonals among those the static part allows on some row."""
    b, hq = q.shape[:2]
    group = hq // k.shape[1]
    lq, lkv = grid.q_len, grid.kv_len
    shift = lkv - lq
    last = list(range(max(0, lq - node.last_q), lq))
    out = torch.zeros(b, hq, lq, lkv, dtype=torch.bool, device=q.device)
    rows = torch.arange(lq, device=q.device)[:, None]
    offsets = rows + shift - torch.arange(lkv, device=q.device)[None, :]  # p - j per pair
    for bi in range(b):
        allowed = static[min(bi, static.shape[0] - 1)]
        col_ok = allowed.any(0).tolist()
        diag_ok = sorted(set(offsets[allowed].tolist()))
        for h in range(hq):
            s = (q[bi, h, last] @ k[bi, h // group].T) * scale
            s = s.masked_fill(~allowed[last], float("-inf"))
            probs = torch.softmax(s, -1).nan_to_num(0.0)
            columns = probs.sum(0).tolist()
            mass = torch.zeros(lq + lkv, dtype=probs.dtype, device=q.device)  # at offset + Lq
            mass.index_add_(0, (offsets[last] + lq).flatten(), probs.flatten())
            cols = ranked({j: columns[j] for j in range(lkv) if col_ok[j]})[:node.n_vertical]
            # diagonals ranked by mass, ties to the lower offset p - j
            diags = ranked({o: float(mass[o + lq]) for o in diag_ok})[:node.n_slash]
            if cols:
                out[bi, h, :, cols] = True
            for o in diags:
                out[bi, h] |= offsets == o
    return out
