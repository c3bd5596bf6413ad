"""The semantics table of docs/semantics.md, written literally with torch integer ops.

``pair_mask`` is the one definition of "which pairs interact" on the torch side: the
oracle (``dense_mask``) evaluates it on the full grid, and the CPU execution path
evaluates it on gathered tiles. Keep it a transcription of the table, not an
optimisation.
"""

from __future__ import annotations

import torch

from .ir.affine import Affine, TopLeft
from .ir.neighborhood import Neighborhood, NeighborhoodPart, neighborhood_keep
from .ir.nodes import (
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
    walk,
)
from .ir.ops import TorchOps
from .ir.routing import DynamicPattern, TopkKeys
from .ir.scores import (
    Alibi,
    PairBias,
    RelBias,
    Softcap,
    rel_index,
    score_spec,
    score_terms,
    strip_scores,
)


def pair_mask(pattern: Pattern, i: torch.Tensor, j: torch.Tensor, q_len: int,
              kv_len: int, routing: dict | None = None) -> torch.Tensor:
    """Bool tensor: may query row ``i`` attend key ``j`` (broadcast shapes).

    A batched ``documents`` pattern adds a leading batch dimension.
    """
    p = i + (kv_len - q_len)
    return _eval(pattern, i, p, j, q_len, kv_len, routing)


def _eval(pat: Pattern, i, p, j, q_len, kv_len, routing=None) -> torch.Tensor:
    if isinstance(pat, (Full, ScoreModifier)):  # modifiers change scores, not the mask
        return ~_no_pairs(p, j)
    if isinstance(pat, Empty):
        return _no_pairs(p, j)
    if isinstance(pat, Causal):
        return j <= p
    if isinstance(pat, Window):
        off = j - p
        d = pat.dilation
        return (torch.remainder(off, d) == 0) & (off >= -pat.left * d) & (off <= pat.right * d)
    if isinstance(pat, Sinks):
        return (j < pat.n) | _no_pairs(p, j)
    if isinstance(pat, GlobalQueries):
        return (p < pat.n) | _no_pairs(p, j)
    if isinstance(pat, Chunks):
        return torch.div(p, pat.size, rounding_mode="floor") == torch.div(
            j, pat.size, rounding_mode="floor")
    if isinstance(pat, Documents):
        return _documents(pat, i, p, j, q_len, kv_len)
    if isinstance(pat, MaskTable):
        table = table_mask(pat, q_len, kv_len).to(i.device)
        return table[:, i.clamp(0, q_len - 1), j.clamp(0, kv_len - 1)]  # [B, *pairs]
    if isinstance(pat, Affine):
        return (pat.q * p + pat.kv * j + pat.const >= 0) | _no_pairs(p, j)
    if isinstance(pat, TopLeft):  # the query's position is its row
        return _eval(pat.pattern, i, i, j, q_len, kv_len, routing)
    if isinstance(pat, (Neighborhood, NeighborhoodPart)):
        return neighborhood_keep(pat, p, j, TorchOps)
    if isinstance(pat, DynamicPattern):
        if routing is None or pat not in routing:
            raise ValueError(f"{pat!r} is decided from q and k at run time: pass content=(q, k) "
                             "to dense_mask (sf.attention and sf.reference_attention route "
                             "themselves)")
        return routing[pat].pair_mask(p, j)  # [B, Hq, *pairs]
    if hasattr(pat, "pair_mask"):  # planner-internal nodes (a token layout) define their own
        return pat.pair_mask(i, j, pair_mask)
    if isinstance(pat, (Union, Intersection)):
        out = _eval(pat.parts[0], i, p, j, q_len, kv_len, routing)
        for part in pat.parts[1:]:
            a, b = _aligned(out, _eval(part, i, p, j, q_len, kv_len, routing), p, j)
            out = a | b if isinstance(pat, Union) else a & b
        return out
    if isinstance(pat, PerHead):
        raise ValueError("per_head: evaluate one head's pattern at a time (see dense_mask)")
    raise TypeError(f"pattern node {type(pat).__name__} has no semantics")


def _aligned(a: torch.Tensor, b: torch.Tensor, p, j):
    """A batched ``[B, *pairs]`` mask beside a routed ``[B, Hq, *pairs]`` one gains the head
    dimension (unbatched masks broadcast as they are)."""
    pairs = len(torch.broadcast_shapes(p.shape, j.shape))
    if a.dim() == pairs + 1 and b.dim() == pairs + 2:
        a = a.unsqueeze(1)
    elif b.dim() == pairs + 1 and a.dim() == pairs + 2:
        b = b.unsqueeze(1)
    return a, b


def _no_pairs(p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """All-false mask with the broadcast shape of the pair grid."""
    return torch.zeros(torch.broadcast_shapes(p.shape, j.shape), dtype=torch.bool, device=p.device)


def document_ids(pat: Documents, q_len: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query and per-key document ids, ``[B or 1, Lq]`` and ``[B or 1, Lkv]`` (int64)."""
    if pat.kv_ids is None:
        ids = pat.ids if pat.ids.dim() == 2 else pat.ids[None]
        if ids.shape[-1] != kv_len:
            raise ValueError(f"documents(ids): ids has length {ids.shape[-1]}, "
                             f"expected kv_len={kv_len}")
        if q_len > kv_len:
            raise ValueError(f"documents(ids): q_len={q_len} > kv_len={kv_len}; pass query ids "
                             "and kv_ids separately")
        ids = ids.long()
        return ids[:, kv_len - q_len:], ids
    qi = pat.ids if pat.ids.dim() == 2 else pat.ids[None]
    ki = pat.kv_ids if pat.kv_ids.dim() == 2 else pat.kv_ids[None]
    if qi.shape[-1] != q_len:
        raise ValueError(f"documents(ids): ids has length {qi.shape[-1]}, expected q_len={q_len}")
    if ki.shape[-1] != kv_len:
        raise ValueError(f"documents(kv_ids): kv_ids has length {ki.shape[-1]}, "
                         f"expected kv_len={kv_len}")
    return qi.long(), ki.long()


def table_mask(pat: MaskTable, q_len: int, kv_len: int) -> torch.Tensor:
    """The mask of a ``mask_table`` as ``[B or 1, Lq, Lkv]``, its lengths checked."""
    table = pat.table(q_len, kv_len)
    mask = table if table.dim() == 3 else table[None]
    if tuple(mask.shape[-2:]) != (q_len, kv_len):
        raise ValueError(f"mask_table(mask): shape {tuple(table.shape)}, expected "
                         f"[.., q_len, kv_len] = [.., {q_len}, {kv_len}]")
    return mask


def _documents(pat: Documents, i, p, j, q_len, kv_len) -> torch.Tensor:
    ids_q, ids_k = document_ids(pat, q_len, kv_len)
    ids_q, ids_k = ids_q.to(i.device), ids_k.to(j.device)
    iq = ids_q[:, i.clamp(0, q_len - 1)]  # [B, *i.shape]; out-of-range rows are masked later
    ik = ids_k[:, j.clamp(0, kv_len - 1)]
    return iq == ik


def score_positions(pattern: Pattern, p, j):
    """The positions score modifiers read: original ones, where ``p``/``j`` are a tiled
    layout's run positions (the planner's ``Tiled`` mask maps them back)."""
    original = getattr(strip_scores(pattern), "original_positions", None)
    return (p, j) if original is None else original(p, j, TorchOps)


def biased_scores(pattern: Pattern, s: torch.Tensor, heads: torch.Tensor, p: torch.Tensor,
                  j: torch.Tensor) -> torch.Tensor:
    """``s`` plus the additive modifiers of a head pattern (alibi, rel_bias, pair_bias),
    literally.

    ``s``: [..., H, *pairs] scaled scores, where ``pairs`` is the broadcast shape of the
    query positions ``p`` and keys ``j``; ``heads``: the query head of each of the H rows
    (indexes slopes and table).
    """
    terms = score_terms(pattern)
    heads = heads.to(s.device)
    p, j = score_positions(pattern, p, j)
    off = (j - p).to(s.device)
    view = (len(heads),) + (1,) * off.dim()
    if Alibi in terms:
        slopes = terms[Alibi].slopes.to(device=s.device, dtype=s.dtype)
        s = s + slopes[heads].view(view) * (off + terms[Alibi].offset).to(s.dtype)
    if RelBias in terms:
        table = terms[RelBias].table.to(device=s.device, dtype=s.dtype)
        idx = rel_index(score_spec(pattern), p, j, TorchOps).to(s.device)
        s = s + table.flatten(1)[heads][:, idx]
    if PairBias in terms:
        s = s + pair_bias_scores(terms[PairBias], s, heads, p, j)
    for node in {n for n in walk(pattern) if isinstance(n, TopkKeys)}:  # DMA's per-key bias
        bias = node.bias.to(device=s.device, dtype=s.dtype)
        bias = (bias if bias.dim() == 3 else bias[None])[:, heads]  # [B|1, H, Lkv]
        pairs = off.shape
        jj = j.to(s.device).expand(pairs).reshape(-1)
        s = s + bias[..., jj].view(*bias.shape[:2], *pairs)
    return s


def pair_bias_positions(pair: PairBias, p: torch.Tensor, j: torch.Tensor):
    """(flat index into a ``[Lq * Lkv]`` bias plane, broadcast pairs shape) of query
    positions ``p`` and keys ``j``: the row is ``i = p - (Lkv - Lq)``. Positions past the
    ends (padding, always masked) read the nearest entry."""
    lq, lk = pair.bias4.shape[-2:]
    i = (p - (lk - lq)).clamp(0, max(lq - 1, 0))
    jj = j.clamp(0, max(lk - 1, 0))
    pairs = torch.broadcast_shapes(i.shape, jj.shape)
    return (i * lk + jj).expand(pairs).reshape(-1), pairs


def pair_bias_scores(pair: PairBias, s: torch.Tensor, heads: torch.Tensor, p, j) -> torch.Tensor:
    """``bias[b, h, i, j]`` for scores ``s`` ``[B, H, *pairs]`` (differentiable in the bias)."""
    bias = pair.bias4.to(device=s.device, dtype=s.dtype)
    if bias.shape[1] > 1:
        bias = bias[:, heads]
    flat, pairs = pair_bias_positions(pair, p.to(s.device), j.to(s.device))
    return bias.flatten(2)[..., flat].view(*bias.shape[:2], *pairs)


def softcap_value(pattern: Pattern) -> float | None:
    """The cap of a head pattern's ``softcap`` modifier, None without one."""
    cap = score_terms(pattern).get(Softcap)
    return None if cap is None else cap.cap


def modified_scores(pattern: Pattern, s: torch.Tensor, heads: torch.Tensor, p: torch.Tensor,
                    j: torch.Tensor) -> torch.Tensor:
    """Every modifier of a head pattern applied to scaled scores ``s`` (see
    ``biased_scores``), in the specified order (docs/semantics.md): alibi, rel_bias, then softcap."""
    s = biased_scores(pattern, s, heads, p, j)
    cap = softcap_value(pattern)
    return s if cap is None else cap * torch.tanh(s / cap)
