"""Which pairs interact, written literally from docs/semantics.md.

Every rule is evaluated on the whole grid of query rows ``i`` and keys ``j`` with plain
torch integer ops, from the node's fields and nothing else of sparseforge: no
canonicalisation, no shared helper with the production semantics (``sparseforge.
semantics``), the planner or the kernels' printer. A mask is a bool tensor
``[B or 1, H or 1, Lq, Lkv]``; the batch and head dimensions appear only where a node
needs them (batched document ids, routing decided per head, ``per_head``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..ir.affine import Affine, TopLeft
from ..ir.neighborhood import Neighborhood, NeighborhoodPart
from ..ir.nodes import (
    Causal,
    Chunks,
    Documents,
    Empty,
    Full,
    GlobalQueries,
    Intersection,
    MaskTable,
    Pattern,
    PerHead,
    ScoreModifier,
    Sinks,
    Union,
    Window,
)
from ..ir.routing import DynamicPattern
from .grid import Grid, as4d, floor_div
from .routing import routed_mask


def mask_of(pattern: Pattern, grid: Grid) -> torch.Tensor:
    """Bool ``[B or 1, H or 1, Lq, Lkv]``: the pairs ``pattern`` allows."""
    if isinstance(pattern, PerHead):
        heads = [mask_of(h, grid) for h in pattern.patterns]
        b = max(m.shape[0] for m in heads)
        return torch.cat([m.expand(b, 1, -1, -1) if m.shape[1] == 1 else m for m in heads], 1)
    if isinstance(pattern, Union):
        out = mask_of(pattern.parts[0], grid)
        for part in pattern.parts[1:]:
            out = out | mask_of(part, grid)
        return out
    if isinstance(pattern, Intersection):
        parts = operands(pattern)
        out = None
        for part in parts:
            if isinstance(part, DynamicPattern):
                m = routed_mask(part, static_siblings([p for p in parts if p is not part], grid),
                                grid)
            else:
                m = mask_of(part, grid)
            out = m if out is None else out & m
        return out
    if isinstance(pattern, TopLeft):  # queries aligned to the first key: p is the row
        return mask_of(pattern.pattern, dataclasses.replace(grid, top_left=True))
    if isinstance(pattern, DynamicPattern):  # routed alone: every bucket is a candidate
        return routed_mask(pattern, static_siblings([], grid), grid)
    return as4d(static_rule(pattern, grid))


def static_siblings(siblings: list[Pattern], grid: Grid) -> torch.Tensor:
    """Bool ``[B or 1, Lq, Lkv]``: the pairs a routing node's static siblings (the other
    operands of its intersection) all allow; its candidates come from these."""
    static = torch.ones(1, 1, grid.q_len, grid.kv_len, dtype=torch.bool, device=grid.device)
    for s in siblings:
        static = static & mask_of(s, grid)
    return static.any(1)  # static parts are head-independent


def operands(pattern: Intersection) -> list[Pattern]:
    """The operands of an intersection, nested intersections flattened (``&`` is
    associative: a routing node's static siblings are all the other operands)."""
    out = []
    for part in pattern.parts:
        out += operands(part) if isinstance(part, Intersection) else [part]
    return out


def static_rule(pat: Pattern, g: Grid) -> torch.Tensor:
    """The position-only primitives, one line of the semantics table each."""
    p, j = g.p, g.j
    if isinstance(pat, (Full, ScoreModifier)):  # modifiers change scores, not the mask
        return torch.ones(g.q_len, g.kv_len, dtype=torch.bool, device=g.device)
    if isinstance(pat, Empty):
        return torch.zeros(g.q_len, g.kv_len, dtype=torch.bool, device=g.device)
    if isinstance(pat, Causal):
        return j <= p
    if isinstance(pat, Window):
        off = j - p
        d = pat.dilation
        return (off % d == 0) & (-pat.left <= floor_div(off, d)) & (floor_div(off, d) <= pat.right)
    if isinstance(pat, Sinks):
        return (j < pat.n).expand(g.q_len, g.kv_len)
    if isinstance(pat, GlobalQueries):
        return (p < pat.n).expand(g.q_len, g.kv_len)
    if isinstance(pat, Chunks):
        return floor_div(p, pat.size) == floor_div(j, pat.size)
    if isinstance(pat, Documents):
        return documents_rule(pat, g)
    if isinstance(pat, MaskTable):  # mask[i, j], per batch row when batched
        table = pat.table(g.q_len, g.kv_len)  # a fallback mask_mod: evaluated on the grid
        m = table if table.dim() == 3 else table[None]
        if tuple(m.shape[-2:]) != (g.q_len, g.kv_len):
            raise ValueError(f"mask_table(mask): shape {tuple(table.shape)} for "
                             f"q_len={g.q_len}, kv_len={g.kv_len}")
        return m.to(g.device)
    if isinstance(pat, Affine):
        return (pat.q * p + pat.kv * j + pat.const >= 0).expand(g.q_len, g.kv_len)
    if isinstance(pat, Neighborhood):
        return neighborhood_rule(pat, p, j)
    if isinstance(pat, NeighborhoodPart):  # a part of the grid: positions moved onto it
        return neighborhood_rule(pat.grid, p + pat.q_offset, j + pat.kv_offset)
    raise TypeError(f"the oracle has no rule for {type(pat).__name__}")


def documents_rule(pat: Documents, g: Grid) -> torch.Tensor:
    """``ids_q[i] == ids_k[j]``: with one tensor, the query takes the id at its absolute
    position; ``[B, Lq, Lkv]`` for batched ids."""
    ids = pat.ids if pat.ids.dim() == 2 else pat.ids[None]
    if pat.kv_ids is None:
        if ids.shape[-1] != g.kv_len or g.q_len > g.kv_len:
            raise ValueError(f"documents(ids): ids of length {ids.shape[-1]} for q_len={g.q_len}, "
                             f"kv_len={g.kv_len}")
        ids_k = ids
        ids_q = ids[:, g.kv_len - g.q_len:]
    else:
        ids_q = ids
        ids_k = pat.kv_ids if pat.kv_ids.dim() == 2 else pat.kv_ids[None]
        if ids_q.shape[-1] != g.q_len or ids_k.shape[-1] != g.kv_len:
            raise ValueError("documents(ids, kv_ids): lengths must be q_len and kv_len")
    ids_q, ids_k = ids_q.to(g.device).long(), ids_k.to(g.device).long()
    return ids_q[:, :, None] == ids_k[:, None, :]


def coordinates(flat: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major coordinates of flat positions; past the grid, dimension 0 keeps counting."""
    out = []
    for d in range(len(shape)):
        inner = 1
        for e in shape[d + 1:]:
            inner *= e
        x = floor_div(flat, inner)
        out.append(x if d == 0 else x % shape[d])
    return out


def neighborhood_rule(pat: Neighborhood, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """NATTEN's rule, per dimension inside dilation groups, both tokens on the grid."""
    size = 1
    for e in pat.shape:
        size *= e
    keep = (p >= 0) & (p < size) & (j < size)
    xq_all, xk_all = coordinates(p, pat.shape), coordinates(j, pat.shape)
    for d, n in enumerate(pat.shape):
        k, dil, s = pat.kernel[d], pat.dilation[d], pat.stride[d]
        xq, xk = xq_all[d], xk_all[d]
        same_group = (xq % dil) == (xk % dil)
        qi, kj = floor_div(xq, dil), floor_div(xk, dil)
        g = xq % dil
        n_g = n // dil + (g < n % dil).long()  # tokens of this group
        if pat.causal[d]:
            leader = torch.minimum(floor_div(qi, s) * s + s - 1, n_g - 1)
            ok = (kj <= qi) & (leader - kj < k)
        else:
            left, right = k // 2, k // 2 + k % 2 - 1
            leader = torch.minimum(floor_div(qi, s) * s + s // 2, n_g - 1)
            centre = torch.clamp(leader, min=left)
            centre = torch.minimum(centre, n_g - 1 - right)
            ok = (kj - centre >= -left) & (kj - centre <= right)
        keep = keep & same_group & ok
    return keep
