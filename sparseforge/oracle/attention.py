"""The oracle's public face: ``dense_mask`` and ``reference_attention`` (dense, fp64).

Score modifiers are applied literally from docs/semantics.md, in their fixed order
(ALiBi, rel_bias, DMA's key bias, then softcap), on the scaled fp64 scores.
"""

from __future__ import annotations

import torch

from ..ir.neighborhood import Neighborhood, NeighborhoodPart
from ..ir.nodes import Documents, Intersection, MaskTable, Pattern, PerHead, walk
from ..ir.routing import TopkKeys, is_dynamic
from ..ir.scores import Alibi, PairBias, RelBias, Softcap
from ..validate import SUPPORTED_DTYPES, check_attention_inputs
from .grid import Grid, floor_div
from .masks import coordinates, mask_of


def dense_mask(pattern: Pattern, q_len: int, kv_len: int, *, batch: int | None = None,
               content=None, device=None) -> torch.Tensor:
    """Bool mask of allowed pairs.

    Shape ``[Lq, Lkv]`` for a head- and batch-independent pattern; ``[H, Lq, Lkv]`` for
    ``per_head``; ``[B, H or 1, Lq, Lkv]`` when a batched ``documents`` pattern (or
    ``batch``) makes it batch dependent. A pattern with routing nodes (``topk_blocks``
    and kin) is decided from the tensors: pass ``content=(q, k)`` or ``(q, k, scale)``
    (``[B, Hq, Lq, D]``, ``[B, Hkv, Lkv, D]``; scale defaults to D ** -0.5) and get
    ``[B, Hq, Lq, Lkv]``.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern={type(pattern).__name__}: expected a sparseforge pattern")
    for name, v in (("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"dense_mask({name}={v!r}): expected an int >= 0")
    routed = None
    if is_dynamic(pattern):
        routed = _content(pattern, content, q_len, kv_len)
        device = routed[0].device
    mask = mask_of(pattern, Grid(q_len, kv_len, device, routed))  # [B|1, H|1, Lq, Lkv]
    if routed is not None:
        q = routed[0]
        return mask.expand(q.shape[0], q.shape[1], q_len, kv_len)
    # document ids may differ per batch: a pattern holding them always answers per batch
    batched = (mask.shape[0] > 1 or batch is not None
               or any(isinstance(n, (Documents, MaskTable)) for n in walk(pattern)))
    if batched:
        return mask.expand(max(mask.shape[0], batch or 1), -1, -1, -1)
    return mask[0] if isinstance(pattern, PerHead) else mask[0, 0]


def _content(pattern: Pattern, content, q_len: int, kv_len: int):
    if content is None or len(content) not in (2, 3):
        raise ValueError(f"dense_mask({pattern!r}): a routed pattern needs content=(q, k) or "
                         "(q, k, scale)")
    q, k = content[0], content[1]
    if q.shape[2] != q_len or k.shape[2] != kv_len:
        raise ValueError(f"dense_mask(content=...): q and k have lengths {q.shape[2]} and "
                         f"{k.shape[2]}, expected q_len={q_len} and kv_len={kv_len}")
    scale = content[2] if len(content) == 3 and content[2] is not None else q.shape[-1] ** -0.5
    return q, k, scale


def modifiers(head: Pattern) -> list:
    """The score modifiers at a head pattern's top-level ``&`` (nested ``&`` flattened)."""
    if not isinstance(head, Intersection):
        return [head] if isinstance(head, (Alibi, RelBias, PairBias, Softcap)) else []
    out = []
    for part in head.parts:
        out += modifiers(part)
    return out


def modified_scores(head: Pattern, s: torch.Tensor, heads: list[int], q_len: int,
                    kv_len: int) -> torch.Tensor:
    """Scaled scores ``s`` ``[B, len(heads), Lq, Lkv]`` (fp64) after ``head``'s modifiers."""
    p = (torch.arange(q_len, device=s.device) + kv_len - q_len)[:, None]
    j = torch.arange(kv_len, device=s.device)[None, :]
    mods = modifiers(head)
    rows = torch.tensor(heads, device=s.device)
    for m in mods:
        if isinstance(m, Alibi):
            s = s + m.slopes.double().to(s.device)[rows][:, None, None] * (j - p + m.offset)
    for m in mods:
        if isinstance(m, RelBias):
            s = s + _rel_bias(m, head, rows, p, j)
    for m in mods:
        if isinstance(m, PairBias):  # bias[b, h, i, j] by query row i
            bias = m.bias.double().to(s.device)
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
            s = s + (bias[:, rows] if bias.shape[1] > 1 else bias)
    for node in {n for n in walk(head) if isinstance(n, TopkKeys)}:  # DMA: bias on every score
        bias = node.bias.double().to(s.device)
        bias = bias if bias.dim() == 3 else bias[None]
        s = s + bias[:, rows][:, :, None, :]
    for m in mods:
        if isinstance(m, Softcap):
            s = m.cap * torch.tanh(s / m.cap)
    return s


def _rel_bias(m: RelBias, head: Pattern, rows, p, j) -> torch.Tensor:
    """Token offsets ``table[h, clamp(j - p, -R, R) + R]``, or window offsets: per grid
    dimension the difference of the key's and query's coordinates inside their dilation
    group, clipped to the table's half-extent."""
    table = m.table.double().to(p.device)[rows]
    if table.dim() == 2:
        r = (table.shape[1] - 1) // 2
        return table[:, (j - p).clamp(-r, r) + r]
    grids = {(n.shape, n.dilation, 0, 0) for n in walk(head) if isinstance(n, Neighborhood)}
    grids |= {(n.grid.shape, n.grid.dilation, n.q_offset, n.kv_offset) for n in walk(head)
              if isinstance(n, NeighborhoodPart)}  # a part: its positions, on the grid
    if len(grids) != 1:
        raise ValueError(f"{m!r}: a window-offset table needs exactly one neighbourhood grid")
    (shape, dilation, q_offset, kv_offset), = grids
    xq, xk = coordinates(p + q_offset, shape), coordinates(j + kv_offset, shape)
    entry = [torch.clamp(floor_div(xk[d], dilation[d]) - floor_div(xq[d], dilation[d]),
                         -(e - 1) // 2, (e - 1) // 2) + (e - 1) // 2
             for d, e in enumerate(table.shape[1:])]
    return table[(slice(None), *entry)]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
                        scale: float | None = None, enable_gqa: bool = False,
                        return_lse: bool = False):
    """Dense float64 attention under ``dense_mask(pattern)``: the correctness oracle.

    Rows with no allowed key give output 0 and lse ``-inf``. Returns ``out`` in the
    dtype of ``q`` (and ``lse`` in float32 if ``return_lse``).
    """
    shape = check_attention_inputs(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa,
                                   dtypes=SUPPORTED_DTYPES + (torch.float64,))
    lq, lkv = shape.q_len, shape.kv_len
    routed = (q, k, shape.scale) if is_dynamic(pattern) else None
    mask = mask_of(pattern, Grid(lq, lkv, q.device, routed))  # [B|1, H|1, Lq, Lkv]
    group = shape.q_heads // shape.kv_heads
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * shape.scale
    heads = pattern.patterns if isinstance(pattern, PerHead) else [pattern] * shape.q_heads
    if isinstance(pattern, PerHead):
        s = torch.cat([modified_scores(h, s[:, n:n + 1], [n], lq, lkv)
                       for n, h in enumerate(heads)], dim=1)
    else:
        s = modified_scores(pattern, s, list(range(shape.q_heads)), lq, lkv)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs, vv).to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out
