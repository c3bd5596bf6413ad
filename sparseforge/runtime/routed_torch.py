"""Attention under a routed pattern with torch ops: route (the torch reference), then
attend. Block-routed patterns gather the key tiles each row chunk reaches
(``routed_gather``: memory and work linear in the sequence); the rest attend query rows
in chunks against every key with the routed mask.

The exact, differentiable path for what the routed forward kernel does not run
(training, ``vertical_slash``, the torch backend; ``runtime.dispatch._run_routed``). On
the row-chunk path the mask is evaluated per chunk of rows, but the compute is dense and
a gradient keeps every chunk's probabilities. On CUDA the top-k and coverage rules route with the generated
pre-kernels (docs/routing.md).
"""

from __future__ import annotations

import torch

from ..ir.canonicalize import canonicalize
from ..ir.nodes import walk
from ..ir.routing import DynamicPattern
from ..routing.rules import route
from ..semantics import modified_scores, pair_mask
from .prekernels import route_with_prekernels
from .routed_gather import gathered_routed_attention

#: query rows attended at once: bounds the [B, H, rows, Lkv] score block
ROW_CHUNK = 256


def routed_attention(q, k, v, pattern, scale: float, prekernels: str | None = None,
                     selection=None):
    """(out ``[B, Hq, Lq, D]`` in q's dtype, lse ``[B, Hq, Lq]`` fp32) of a routed pattern;
    GQA by head groups. Rows with no allowed key give 0 and lse -inf. ``prekernels``
    (``"compiled"`` on CUDA, ``"interpret"`` in tests): route top-k rules with the
    generated pre-kernels instead of the torch reference. ``selection``: the pattern's
    one routing node's decision, given (nothing is routed here)."""
    canonical = canonicalize(pattern)
    b, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    if selection is not None:
        node, = dict.fromkeys(n for n in walk(canonical) if isinstance(n, DynamicPattern))
        routing = {node: selection}
    else:
        with torch.no_grad():
            routing = (route(canonical, q.detach(), k.detach(), scale) if prekernels is None
                       else route_with_prekernels(canonical, q.detach(), k.detach(), scale,
                                                  interpret=prekernels == "interpret"))
    gathered = gathered_routed_attention(q, k, v, canonical, routing, scale)
    if gathered is not None:  # block routing: only the reachable key tiles, memory O(L)
        return gathered
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = hq // hkv
    kk = k.to(compute).repeat_interleave(group, dim=1)
    vv = v.to(compute).repeat_interleave(group, dim=1)
    j = torch.arange(kv_len, device=q.device)[None, :]
    outs, lses = [], []
    for r0 in range(0, q_len, ROW_CHUNK):
        rows = torch.arange(r0, min(q_len, r0 + ROW_CHUNK), device=q.device)
        mask = pair_mask(canonical, rows[:, None], j, q_len, kv_len, routing)
        while mask.dim() < 4:
            mask = mask[None]
        s = q[:, :, rows].to(compute) @ kk.transpose(-1, -2) * scale
        p = rows[:, None] + (kv_len - q_len)
        s = modified_scores(canonical, s, torch.arange(hq), p, j)
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        probs = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(probs @ vv)
        lses.append(lse)
    out = torch.cat(outs, 2) if outs else q.new_zeros(b, hq, 0, v.shape[-1], dtype=compute)
    lse = torch.cat(lses, 2) if lses else q.new_zeros(b, hq, 0, dtype=compute)
    return out.to(q.dtype), lse.float()
