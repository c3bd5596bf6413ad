"""``sf.merge``: combine attention results computed over different key sets.

Two operations that multi-branch sparse attention is built from (docs/semantics.md, "Combining results"):

* **Union** (``weights=None``): the softmax over the union of the branches' key sets,
  from each branch's output and log-sum-exp alone, exactly: ``out = sum_i exp(lse_i -
  lse) out_i`` with ``lse = logsumexp_i lse_i``. Exact for disjoint key sets (split-KV,
  FlashDecoding, a sparse branch plus a dense one over the other keys). For two
  *overlapping* sets pass the attention over their intersection as ``subtract``: its
  mass is removed once (inclusion-exclusion), so the result is the union again.
* **Gated mixing** (``weights`` given): ``out = sum_i w_i out_i``, each branch keeping its
  own softmax, with per-token (and per-head) gates, as NSA mixes its compressed,
  selected and window branches, and as MoH weights the heads a token is routed to.

Everything is torch ops on the inputs' device, differentiable, in fp32 at least.
"""

from __future__ import annotations

import torch


def _check(outputs, lses, weights) -> None:
    if not isinstance(outputs, (list, tuple)) or not outputs:
        raise TypeError("merge(outputs=...): expected a non-empty list of [B, H, L, D] tensors")
    if not isinstance(lses, (list, tuple)) or len(lses) != len(outputs):
        raise ValueError(f"merge(lses=...): expected a list of {len(outputs)} [B, H, L] tensors, "
                         "one per output")
    shape = outputs[0].shape if isinstance(outputs[0], torch.Tensor) else None
    for n, (o, lse) in enumerate(zip(outputs, lses)):
        if not isinstance(o, torch.Tensor) or o.dim() != 4 or o.shape != shape:
            raise ValueError(f"merge(outputs[{n}]): expected a [B, H, L, D] tensor shaped like "
                             f"outputs[0] {tuple(shape) if shape else ''}")
        if (not isinstance(lse, torch.Tensor) or lse.shape != o.shape[:3]
                or not lse.dtype.is_floating_point):
            raise ValueError(f"merge(lses[{n}]): expected a float tensor of shape "
                             f"{tuple(o.shape[:3])} (attention(..., return_lse=True)'s lse)")
    if weights is not None and (not isinstance(weights, (list, tuple))
                                or len(weights) != len(outputs)):
        raise ValueError(f"merge(weights=...): expected {len(outputs)} gates (floats or tensors "
                         "broadcastable to [B, H, L]), one per output")


def merge(outputs, lses, weights=None, *, subtract=None):
    """Combine attention results ``outputs`` (``[B, H, L, D]`` each) with their log-sum-exps
    ``lses`` (``[B, H, L]``, natural log, ``-inf`` for rows with no key).

    ``weights=None``: the attention over the union of the key sets, returned as ``(out,
    lse)``; exact for disjoint sets, and for two overlapping sets when ``subtract=(out,
    lse)`` is the attention over their intersection. Rows no branch saw give 0 and -inf.

    ``weights=[w_0, ...]``: gated mixing ``sum_i w_i * out_i`` (floats, or tensors
    broadcastable to ``[B, H, L]``: per-token gates as NSA's); returns ``(out, None)``:
    separately normalised branches have no common log-sum-exp.
    """
    _check(outputs, lses, weights)
    dtype = outputs[0].dtype
    compute = torch.promote_types(dtype, torch.float32)
    if weights is not None:
        if subtract is not None:
            raise ValueError("merge(weights=..., subtract=...): subtract belongs to the union "
                             "merge (weights=None)")
        def gate(w):  # a [B, H, L]-broadcastable gate scales whole output rows
            return w.to(compute)[..., None] if isinstance(w, torch.Tensor) and w.dim() else w

        return sum(gate(w) * o.to(compute) for w, o in zip(weights, outputs)).to(dtype), None
    signs = [1.0] * len(outputs)
    outputs, lses = list(outputs), list(lses)
    if subtract is not None:
        if not isinstance(subtract, (tuple, list)) or len(subtract) != 2:
            raise TypeError("merge(subtract=...): expected (out, lse) of the intersection")
        _check([outputs[0], subtract[0]], [lses[0], subtract[1]], None)
        outputs.append(subtract[0])
        lses.append(subtract[1])
        signs.append(-1.0)
    stacked = torch.stack([x.to(compute) for x in lses])  # [N, B, H, L]
    top = stacked.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sign = torch.tensor(signs, dtype=compute, device=top.device)[:, None, None, None]
    mass = sign * torch.exp(stacked - top)  # exp(-inf) = 0 for empty branches
    total = mass.sum(0)
    # with an intersection subtracted, the union's mass is still >= the largest branch's
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    out = sum(m[..., None] * o.to(compute) for m, o in zip(mass, outputs)) / safe[..., None]
    out = torch.where(seen[..., None], out, torch.zeros_like(out))
    lse = torch.where(seen, top + torch.log(safe), torch.full_like(top, float("-inf")))
    return out.to(dtype), lse.to(torch.float32)
