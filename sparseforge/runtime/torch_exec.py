"""The gather executor: a plan's tile schedule with torch ops, for what the fused CPU
executor (``cpu_flash``) does not run: patterns with score modifiers (softcap, ALiBi,
``rel_bias``, which it applies to the gathered scores).

It consumes the same closed-form segments as the kernel (evaluated once per plan, see
``Plan.schedules``), so it is a second, independent consumer of the plan. Query tiles
are grouped by how many kv tiles they visit; a batch of such tiles gathers all its kv
tiles (block gather) and runs one batched matmul and one softmax over them, so memory
per batch grows with the visit count (one query tile's full row at most). The token
predicate is evaluated only on partial tiles; full tiles take no mask.

``run_backward`` is the FlashAttention backward over the same schedule: it recomputes
the probabilities of each visited tile from the saved ``lse`` (nothing of size
Lq x Lkv is kept between forward and backward) and accumulates dK/dV per kv tile.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ir.scores import (
    PairBias,
    learned_tensors,
    pair_bias_tensor,
    rel_bias_table,
    rel_index,
    score_spec,
    score_terms,
)
from ..planner.plan import KernelPlan, Plan
from ..planner.schedule import GroupSchedule
from ..semantics import (
    TorchOps,
    biased_scores,
    modified_scores,
    pair_bias_positions,
    pair_mask,
    score_positions,
    softcap_value,
)

# Score elements materialised per batch of query tiles (at least one tile per batch).
SCORE_BUDGET = 1 << 24


def run_forward(plan: Plan, call_kernels, q, k, v, out, lse, scale: float) -> None:
    _, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    if lq == 0:
        return
    compute = torch.float32 if q.dtype != torch.float64 else torch.float64
    for kernel, call_pattern, schedules in zip(plan.kernels, call_kernels, plan.schedules):
        heads = list(range(hq)) if kernel.heads is None else list(kernel.heads)
        for sched in schedules:
            geo = sched.geometry
            if geo.q_len == 0:
                continue
            rows = slice(geo.q_start, None, kernel.groups)
            cols = slice(geo.kv_start, None, kernel.groups)
            qg = q[:, heads, rows].to(compute)
            kg = k[:, :, cols].to(compute)
            vg = v[:, :, cols].to(compute)
            o, l_ = _run_group(plan, kernel, call_pattern, sched, qg, kg, vg, heads, hq // hkv,
                               scale, (lq, lkv))
            out[:, heads, rows] = o.to(out.dtype)
            lse[:, heads, rows] = l_


def _run_group(plan: Plan, kernel: KernelPlan, pattern, sched: GroupSchedule, q, k, v, heads,
               group, scale, totals):
    """Attention of one dilation group; q: [B, Hsel, Lg, D], k: [B, Hkv, Lkg, D], v: [B, Hkv,
    Lkg, Dv]."""
    bm, bn = plan.block_m, plan.block_n
    b, hs, lq, d = q.shape
    lk = k.shape[2]
    geo, visit, full = sched.geometry, sched.visit, sched.full
    tq, tk = visit.shape
    kv_heads = torch.tensor([h // group for h in heads], device=q.device)
    # pad to whole tiles: [B, Hsel, Tq, BM, D] and [B, Hsel, Tk, BN, D]
    qt = torch.nn.functional.pad(q, (0, 0, 0, tq * bm - lq)).view(b, hs, tq, bm, d)
    kt, vt = (_kv_tiles(x, kv_heads, tk, bn) for x in (k, v))
    dv = v.shape[-1]
    out = q.new_zeros(b, hs, tq, bm, dv)
    lse = q.new_full((b, hs, tq, bm), float("-inf"))
    counts = visit.sum(1)
    order = np.argsort(counts, kind="stable")
    start = 0
    while start < tq:
        count = int(counts[order[start]])
        stop = start
        while stop < tq and counts[order[stop]] == count:
            stop += 1
        tiles_q = order[start:stop]
        if count > 0:
            per_batch = max(1, SCORE_BUDGET // max(1, b * hs * bm * bn * count))
            for s in range(0, len(tiles_q), per_batch):
                sel = tiles_q[s:s + per_batch]
                o, l_ = _attend(pattern, geo, kernel.groups, plan, qt[:, :, sel], kt, vt,
                                visit[sel], full[sel], sel, lk, scale, totals, heads)
                out[:, :, sel] = o
                lse[:, :, sel] = l_
        start = stop
    return out.view(b, hs, tq * bm, dv)[:, :, :lq], lse.view(b, hs, tq * bm)[:, :, :lq]


def _attend(pattern, geo, groups, plan, q, kt, vt, visit, full, tiles_q, lk, scale, totals, heads):
    """All visited tiles of a batch of query tiles with equal visit counts."""
    bm, bn = plan.block_m, plan.block_n
    nq, count = visit.shape[0], int(visit[0].sum())
    kv_idx = torch.from_numpy(np.nonzero(visit)[1].reshape(nq, count))
    is_full = torch.from_numpy(np.take_along_axis(full, kv_idx.numpy(), axis=1))
    kg = kt[:, :, kv_idx]  # [B, H, nq, C, BN, D]
    vg = vt[:, :, kv_idx]
    s = torch.matmul(q, kg.flatten(3, 4).transpose(-1, -2)) * scale  # [B, H, nq, BM, C*BN]
    if score_spec(pattern).any:
        p, j = _tile_positions(geo, groups, tiles_q, kv_idx, bm, bn, totals)
        s = modified_scores(pattern, s, torch.tensor(heads), p.to(s.device), j.to(s.device))
    allowed = tile_mask(pattern, geo, groups, tiles_q, kv_idx, is_full, bm, bn, lk, totals).to(s.device)
    s = s.masked_fill(~allowed.view(allowed.shape[0], 1, nq, bm, count * bn)
                      if allowed.dim() == 5 else ~allowed.view(nq, bm, count * bn), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l_ = p.sum(-1, keepdim=True)
    o = torch.matmul(p, vg.flatten(3, 4)) / torch.where(l_ == 0, torch.ones_like(l_), l_)
    lse = torch.where(l_ == 0, torch.full_like(l_, float("-inf")), m + torch.log(l_))
    return o, lse.squeeze(-1)


def run_backward(plan: Plan, call_kernels, q, k, v, out, lse, grad_out, grad_lse, scale: float):
    """(dq, dk, dv, table grads) of ``out``/``lse`` with respect to q, k, v (same dtypes
    as q, k, v) and each rel_bias table (a dict id(table) -> gradient).

    ``grad_lse`` may be None. Rows with lse = -inf (no allowed key) have no gradient.
    """
    _, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    compute = torch.float32 if q.dtype != torch.float64 else torch.float64
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute, device=v.device)
    tables = {id(t): t for head in call_kernels for t in learned_tensors(head)}
    dtables = {key: torch.zeros(t.shape, dtype=compute, device=q.device) for key, t in tables.items()}
    if lq == 0 or lkv == 0:
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                {key: g.to(tables[key].dtype) for key, g in dtables.items()})
    # D_i = rowsum(dO * O): the softmax-backward term shared by every tile of a row
    delta = (grad_out.to(compute) * out.to(compute)).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(compute), 0)
    for kernel, call_pattern, schedules in zip(plan.kernels, call_kernels, plan.schedules):
        heads = list(range(hq)) if kernel.heads is None else list(kernel.heads)
        for sched in schedules:
            geo = sched.geometry
            if geo.q_len == 0 or geo.kv_len == 0:
                continue
            rows = slice(geo.q_start, None, kernel.groups)
            cols = slice(geo.kv_start, None, kernel.groups)
            pair = pair_bias_tensor(call_pattern)
            grads = _group_backward(
                plan, kernel, call_pattern, sched, q[:, heads, rows].to(compute),
                k[:, :, cols].to(compute), v[:, :, cols].to(compute),
                grad_out[:, heads, rows].to(compute), lse[:, heads, rows].to(compute),
                delta[:, heads, rows], heads, hq // hkv, hkv, scale, (lq, lkv),
                None if pair is None else dtables[id(pair)])
            dq[:, heads, rows] += grads[0]
            dk[:, :, cols] += grads[1]
            dv[:, :, cols] += grads[2]
            if grads[3] is not None:
                dtable = dtables[id(rel_bias_table(call_pattern))]
                dtable[heads] += grads[3].view(len(heads), *dtable.shape[1:])
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            {key: g.to(tables[key].dtype) for key, g in dtables.items()})


def _group_backward(plan, kernel, pattern, sched, q, k, v, do, lse, delta, heads, group, hkv,
                    scale, totals, dpair=None):
    """dq, dk, dv and the rel_bias table's gradient of one dilation group; a pair_bias's
    gradient (dS per pair) is added into ``dpair`` (shaped as the bias) in place."""
    bm, bn = plan.block_m, plan.block_n
    b, hs, lq, d = q.shape
    lk, d_v = k.shape[2], v.shape[-1]
    geo, visit, full = sched.geometry, sched.visit, sched.full
    tq, tk = visit.shape
    kv_heads = torch.tensor([h // group for h in heads], device=q.device)

    def tiles_q(x, fill=0.0):  # [B, Hs, Lg, ...] -> [B, Hs, Tq, BM, ...]
        pad = [0, 0] * (x.dim() - 3) + [0, tq * bm - lq]
        return torch.nn.functional.pad(x, pad, value=fill).view(b, hs, tq, bm, *x.shape[3:])

    qt, dot, lset, deltat = tiles_q(q), tiles_q(do), tiles_q(lse, float("-inf")), tiles_q(delta)
    kt, vt = (_kv_tiles(x, kv_heads, tk, bn) for x in (k, v))
    dqt = torch.zeros_like(qt)
    dkt = torch.zeros_like(kt)
    dvt = torch.zeros_like(vt)
    score = score_spec(pattern)
    cap = softcap_value(pattern)
    head_index = torch.tensor(heads)
    dtable = (torch.zeros(hs, 2 * score.rel_radius + 1, dtype=q.dtype, device=q.device)
              if score.rel_bias else None)
    counts = visit.sum(1)
    for count in np.unique(counts):
        if count == 0:
            continue
        same = np.nonzero(counts == count)[0]
        per_batch = max(1, SCORE_BUDGET // max(1, b * hs * bm * bn * int(count)))
        for s0 in range(0, len(same), per_batch):
            sel = same[s0:s0 + per_batch]
            nq = len(sel)
            kv_idx = torch.from_numpy(np.nonzero(visit[sel])[1].reshape(nq, int(count)))
            is_full = torch.from_numpy(np.take_along_axis(full[sel], kv_idx.numpy(), axis=1))
            kg = kt[:, :, kv_idx].flatten(3, 4)  # [B, Hs, nq, C*BN, D]
            vg = vt[:, :, kv_idx].flatten(3, 4)
            qs, dos = qt[:, :, sel], dot[:, :, sel]
            s = torch.matmul(qs, kg.transpose(-1, -2)) * scale  # [B, Hs, nq, BM, C*BN]
            if score.any:
                p_pos, j_pos = (x.to(q.device) for x in
                                _tile_positions(geo, kernel.groups, sel, kv_idx, bm, bn, totals))
                s = biased_scores(pattern, s, head_index, p_pos, j_pos)
                if cap is not None:
                    t = torch.tanh(s / cap)
                    s = cap * t
            allowed = tile_mask(pattern, geo, kernel.groups, sel, kv_idx, is_full, bm, bn, lk,
                                 totals).to(q.device)
            allowed = (allowed.view(allowed.shape[0], 1, nq, bm, -1) if allowed.dim() == 5
                       else allowed.view(nq, bm, -1))
            row_lse = lset[:, :, sel]
            finite = torch.isfinite(row_lse)[..., None]
            p = torch.exp(s - torch.where(finite, row_lse[..., None], 0.0))
            p = torch.where(allowed & finite, p, 0.0)
            dp = torch.matmul(dos, vg.transpose(-1, -2))
            ds = p * (dp - deltat[:, :, sel][..., None])
            if cap is not None:
                ds = ds * (1 - t * t)  # through the cap
            if dpair is not None:
                _add_pair_grad(score_terms(pattern)[PairBias], dpair, ds, heads, p_pos, j_pos)
            if dtable is not None:  # each pair's dS to its (clipped) table entry
                idx = rel_index(score, *score_positions(pattern, p_pos, j_pos), TorchOps).flatten()
                dtable.index_add_(1, idx, ds.sum(0).flatten(1))
            dqt[:, :, sel] = torch.matmul(ds, kg) * scale
            flat = kv_idx.flatten().to(q.device)
            dkt.index_add_(2, flat, (torch.matmul(ds.transpose(-1, -2), qs) * scale)
                           .reshape(b, hs, nq * int(count), bn, d))
            dvt.index_add_(2, flat, torch.matmul(p.transpose(-1, -2), dos)
                           .reshape(b, hs, nq * int(count), bn, d_v))
    dk = torch.zeros(b, hkv, tk * bn, d, dtype=q.dtype, device=q.device)
    dv = torch.zeros(b, hkv, tk * bn, d_v, dtype=q.dtype, device=q.device)
    dk.index_add_(1, kv_heads, dkt.view(b, hs, tk * bn, d))  # GQA: sum over the query heads
    dv.index_add_(1, kv_heads, dvt.view(b, hs, tk * bn, d_v))
    return dqt.view(b, hs, tq * bm, d)[:, :, :lq], dk[:, :, :lk], dv[:, :, :lk], dtable


def _add_pair_grad(pair, dpair, ds, heads, p, j) -> None:
    """Add dS ``[B, Hs, *pairs]`` to the pair bias's gradient at each pair's entry, summed
    over the dims the bias broadcasts (batch, heads)."""
    flat, _ = pair_bias_positions(pair, p, j)
    plane = dpair.reshape(pair.bias4.shape).flatten(2)  # a view: [B|1, H|1, Lq * Lkv]
    g = ds.flatten(2)
    if plane.shape[0] == 1:
        g = g.sum(0, keepdim=True)
    if plane.shape[1] == 1:
        plane[:, 0].index_add_(1, flat, g.sum(1).to(plane.dtype))
        return
    for n, h in enumerate(heads):
        plane[:, h].index_add_(1, flat, g[:, n].to(plane.dtype))


def _tile_positions(geo, groups, tiles_q, kv_idx, bm, bn, totals):
    """Query positions ``p`` [nq, BM, 1] and keys ``j`` [nq, 1, C*BN] of a batch of query
    tiles and their gathered kv tiles, in original coordinates."""
    q_len_total, kv_len_total = totals
    rows = torch.from_numpy(np.asarray(tiles_q))[:, None] * bm + torch.arange(bm)
    cols = (kv_idx[:, :, None] * bn + torch.arange(bn)).flatten(1)
    p = geo.q_start + rows * groups + (kv_len_total - q_len_total)
    j = geo.kv_start + cols * groups
    return p[:, :, None], j[:, None, :]


def _kv_tiles(x, kv_heads, tiles: int, block_n: int):
    """[B, Hkv, Lk, D] -> [B, Hsel, Tk, BN, D]: padded to whole tiles, the kv head of each
    selected query head gathered."""
    b, _, length, d = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, tiles * block_n - length))
    return padded[:, kv_heads].view(b, len(kv_heads), tiles, block_n, d)


def tile_mask(pattern, geo, groups, tiles_q, kv_idx, is_full, bm, bn, lk, totals):
    """Bool [(B,) nq, BM, C, BN]: full tiles all true, partial ones from the predicate.

    ``totals`` are the original (not group-local) lengths the predicate is defined on.
    """
    nq, count = kv_idx.shape
    q_len_total, kv_len_total = totals
    allowed = torch.ones(nq, bm, count, bn, dtype=torch.bool)
    part = (~is_full).nonzero()
    if len(part):
        qi, ci = part[:, 0], part[:, 1]
        t_rows = torch.from_numpy(np.asarray(tiles_q))[qi][:, None] * bm + torch.arange(bm)
        t_cols = kv_idx[qi, ci][:, None] * bn + torch.arange(bn)
        i = geo.q_start + t_rows * groups
        j = geo.kv_start + t_cols * groups
        ok = pair_mask(pattern, i[:, :, None], j[:, None, :], q_len_total, kv_len_total)
        ok = ok & (t_cols < lk)[:, None, :]
        if ok.dim() == 4:  # batched documents
            allowed = allowed.expand(ok.shape[0], -1, -1, -1, -1).clone()
            allowed[:, qi, :, ci] = ok.permute(1, 0, 2, 3)  # advanced dims come first
        else:
            allowed[qi, :, ci] = ok
    return allowed
