"""The fused CPU executor: a plan's programs run through PyTorch's FlashAttention for CPUs.

Each piece of a program (``cpu_program``) is one call of
``_scaled_dot_product_flash_attention_for_cpu`` on strided views of padded Q, K and V:
no gathered copies of K/V, no score matrix in memory, no mask on full tiles, masks made
once per plan. The kernel is blocked and vectorised, accumulates 16-bit inputs in fp32
and returns the log-sum-exp. Pieces of a batch are merged by log-sum-exp. A call's
units (a slice of heads, one batch) run on ``cpu_threads``' worker pool.

The backward calls ``_scaled_dot_product_flash_attention_for_cpu_backward`` per piece
with the merged output and log-sum-exp: the probabilities it recomputes are then the
final ones and its ``rowsum(dO * O)`` is the whole row's, so every piece's dQ, dK and
dV parts are exact and simply add up (dK/dV by tile, with ``index_add_``).

Scope: masks without score modifiers, q/k/v in float32, float64, bfloat16 or float16
(``dispatch`` runs the gather executor, ``torch_exec``, otherwise).
"""

from __future__ import annotations

from functools import partial

import torch

from .cpu_program import Batch, GroupProgram, programs
from .cpu_threads import run_units

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def supports(scored: bool, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this executor runs the call (else the gather executor does); ``scored``:
    some head of the pattern applies a score modifier."""
    return (not scored and q.device.type == "cpu" and q.dtype in DTYPES
            and q.shape[-1] == v.shape[-1] and q.shape[-1] > 0)


def _groups(plan, call_kernels, q, k):
    """Per kernel and dilation group: (selector of its query heads, of the kv head of
    each, the kv heads as a list, rows, cols, [(batch row, program)]). Selectors are
    slices where they can be, so that selecting is a view rather than a copy."""
    hq, hkv = q.shape[1], k.shape[1]
    for index, (kernel, call_pattern, schedules) in enumerate(
            zip(plan.kernels, call_kernels, plan.schedules)):
        heads = list(range(hq)) if kernel.heads is None else list(kernel.heads)
        kv_heads = [h // (hq // hkv) for h in heads]
        q_sel = slice(None) if heads == list(range(hq)) else heads
        kv_sel = slice(None) if kv_heads == list(range(hkv)) else kv_heads
        for group, sched in enumerate(schedules):
            geo = sched.geometry
            if geo.q_len == 0 or geo.kv_len == 0:
                continue
            rows = slice(geo.q_start, None, kernel.groups)
            cols = slice(geo.kv_start, None, kernel.groups)
            yield q_sel, kv_sel, kv_heads, rows, cols, programs(plan, index, group, kernel,
                                                                call_pattern, sched)


def _batch_rows(row):
    return slice(None) if row is None else slice(row, row + 1)


def run_forward(plan, call_kernels, q, k, v, out, lse, scale: float) -> None:
    """Fill ``out`` and ``lse`` (every row: empty ones get 0 and -inf)."""
    out.zero_()
    lse.fill_(float("-inf"))
    if q.shape[2] == 0:
        return
    for heads, kv_sel, _, rows, cols, progs in _groups(plan, call_kernels, q, k):
        for row, prog in progs:
            b = _batch_rows(row)
            o, l_ = _forward(prog, plan, q[b][:, heads, rows], k[b][:, kv_sel, cols],
                             v[b][:, kv_sel, cols], scale)
            out[b, heads, rows] = o.to(out.dtype)
            lse[b, heads, rows] = l_


class _Padded:
    """One group's tensors as ``[B*H, tiles*block, D]``, zero-padded to whole tiles (and,
    for K/V, by the program's front/back tiles), with strided views of a batch's items."""

    def __init__(self, prog: GroupProgram, bm: int, bn: int, q, k, extra: int = 0):
        self.prog, self.bm, self.bn = prog, bm, bn
        self.b, self.h, self.q_len, width = q.shape
        self.d = width + extra  # extra zero columns (the backward's lse-gradient column)
        self.kv_len = k.shape[2]
        self.bh = self.b * self.h
        self.q_rows = prog.q_tiles * bm
        self.kv_rows = (prog.front + prog.kv_tiles + prog.back) * bn

    def pad_q(self, x, fill=0.0):
        """``[B, H, L(, D)]`` -> ``[BH, q_rows(, d)]``, filled past the end with ``fill``
        (a view of ``x`` itself when it is contiguous and needs no padding)."""
        if self.q_rows == self.q_len and (x.dim() == 3 or x.shape[3] == self.d) and x.is_contiguous():
            return x.view(self.bh, self.q_len, *x.shape[3:])
        shape = (self.bh, self.q_rows) + ((self.d,) if x.dim() == 4 else ())
        out = torch.full(shape, fill, dtype=x.dtype) if fill else torch.zeros(shape, dtype=x.dtype)
        target = out[:, :self.q_len, :x.shape[3]] if x.dim() == 4 else out[:, :self.q_len]
        target.copy_(x.reshape(target.shape))
        return out

    def pad_kv(self, x):
        if (self.kv_rows == self.kv_len and self.prog.front == 0 and x.shape[3] == self.d
                and x.is_contiguous()):
            return x.view(self.bh, self.kv_len, self.d)
        out = torch.zeros(self.bh, self.kv_rows, self.d, dtype=x.dtype)
        first = self.prog.front * self.bn
        out[:, first:first + self.kv_len, :x.shape[3]] = x.reshape(self.bh, self.kv_len, x.shape[3])
        return out

    def q_view(self, x, batch: Batch):
        """The batch's query rows of a padded ``[BH, rows, D]`` (or ``[BH, rows]``) tensor
        in its call shape, ``[items, BH, rows per item(, D)]``."""
        items = batch.items
        rows = batch.count * self.bm // items
        if x.dim() == 2:
            return x.as_strided((items, self.bh, rows), (rows, self.q_rows, 1),
                                x.storage_offset() + batch.first * self.bm)
        d = self.d
        return x.as_strided((items, self.bh, rows, d), (rows * d, self.q_rows * d, d, 1),
                            x.storage_offset() + batch.first * self.bm * d)

    def kv_view(self, x, batch: Batch, window, piece):
        bn, d = self.bn, self.d
        first = (self.prog.front + window.start + piece.col) * bn * d
        return x.as_strided((batch.items, self.bh, piece.width * bn, d),
                            (window.step * bn * d, self.kv_rows * d, d, 1), x.storage_offset() + first)

    def kv_tiles(self, batch: Batch, window, piece) -> torch.Tensor:
        """Padded kv tile index of each (item, column) of a piece, item-major."""
        items = torch.arange(batch.items)[:, None] * window.step
        return (self.prog.front + window.start + piece.col + items
                + torch.arange(piece.width)).flatten()

    def unpad(self, x):
        return x[:, :self.q_len].reshape(self.b, self.h, self.q_len, *x.shape[2:])


def _pieces(batch: Batch):
    """(window, piece) of every kernel call of a batch."""
    return [(window, piece) for window in batch.windows for piece in window.pieces]


def _head_slices(bh: int) -> list[slice]:
    """Units of heads (of the B*H rows) the threads share: about eight per call."""
    size = max(1, bh // 8)
    return [slice(h, min(h + size, bh)) for h in range(0, bh, size)]


def _forward(prog: GroupProgram, plan, q, k, v, scale: float):
    pad = _Padded(prog, plan.block_m, plan.block_n, q, k)
    qp, kp, vp = pad.pad_q(q), pad.pad_kv(k), pad.pad_kv(v)
    merged = q.dtype if q.dtype == torch.float64 else torch.float32
    outp = torch.zeros(pad.bh, pad.q_rows, pad.d, dtype=merged)
    lsep = torch.full((pad.bh, pad.q_rows), float("-inf"), dtype=merged)

    def unit(batch: Batch, hs: slice):
        parts = []
        for window, piece in _pieces(batch):
            o, l_ = FLASH(pad.q_view(qp, batch)[:, hs], pad.kv_view(kp, batch, window, piece)[:, hs],
                          pad.kv_view(vp, batch, window, piece)[:, hs], is_causal=piece.causal,
                          attn_mask=piece.mask(q.dtype, batch), scale=scale)
            valid = piece.valid_rows(batch)
            if valid is not None:  # rows with no allowed key here: no weight
                l_ = l_.masked_fill(~valid[:, None, :], float("-inf"))
            parts.append((o, l_))
        o, l_ = _merge(parts, merged)
        pad.q_view(outp, batch)[:, hs].copy_(o)
        pad.q_view(lsep, batch)[:, hs].copy_(l_)

    run_units(partial(unit, batch, hs) for batch in prog.batches for hs in _head_slices(pad.bh))
    return pad.unpad(outp), pad.unpad(lsep).float()


def _merge(parts, dtype):
    """Log-sum-exp merge of pieces' (out [nq, BH, BM, D], lse [nq, BH, BM])."""
    if len(parts) == 1:
        o, l_ = parts[0]
        return o.to(dtype), l_.to(dtype)
    lses = torch.stack([l_.to(dtype) for _, l_ in parts])
    top = lses.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)
    total = weights.sum(0)
    out = sum(o.to(dtype) * w[..., None] for (o, _), w in zip(parts, weights))
    out = out / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    return out, torch.where(total > 0, top + torch.log(total), torch.full_like(total, float("-inf")))


def run_backward(plan, call_kernels, q, k, v, out, lse, grad_out, grad_lse, scale: float):
    """(dq, dk, dv, {}) in the dtypes of q, k, v; ``grad_lse`` may be None.

    A gradient through ``lse`` adds ``P_ij * g_i`` to each score's gradient. The fused
    kernel has no input for it, so it gets one more head-dim column: ``v`` gains a
    column of ones and ``dO`` the column ``g``, which adds ``g_i`` to every
    ``dP_ij = dO_i . v_j``, while ``out`` gains a zero column, leaving the row term
    ``rowsum(dO * O)`` as it was; q and k gain zeros, leaving the scores unchanged."""
    if grad_lse is not None and not bool(grad_lse.any()):
        grad_lse = None
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=compute)
    dk = torch.zeros(k.shape, dtype=compute)
    dv = torch.zeros(v.shape, dtype=compute)
    if q.shape[2] and k.shape[2]:
        for heads, kv_sel, kv_heads, rows, cols, progs in _groups(plan, call_kernels, q, k):
            for row, prog in progs:
                b = _batch_rows(row)
                g = None if grad_lse is None else grad_lse[b][:, heads, rows]
                grads = _backward(prog, plan, q[b][:, heads, rows], k[b][:, kv_sel, cols],
                                  v[b][:, kv_sel, cols], out[b][:, heads, rows],
                                  lse[b][:, heads, rows], grad_out[b][:, heads, rows], g, scale)
                dq[b, heads, rows] += grads[0]
                index = torch.tensor(kv_heads)
                # views of dk/dv; GQA: index_add_ sums the query heads of a kv head
                dk[b][:, :, cols].index_add_(1, index, grads[1])
                dv[b][:, :, cols].index_add_(1, index, grads[2])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), {}


def _backward(prog: GroupProgram, plan, q, k, v, out, lse, grad_out, grad_lse, scale: float):
    width = q.shape[3]
    pad = _Padded(prog, plan.block_m, plan.block_n, q, k, extra=int(grad_lse is not None))
    qp, kp, vp = pad.pad_q(q), pad.pad_kv(k), pad.pad_kv(v)
    op, dop = pad.pad_q(out.to(q.dtype)), pad.pad_q(grad_out.to(q.dtype))
    if grad_lse is not None:  # the lse-gradient column (see run_backward)
        vp[:, :, width] = 1
        dop[:, :pad.q_len, width] = torch.where(torch.isfinite(lse), grad_lse, 0).reshape(
            pad.bh, pad.q_len).to(q.dtype)
    # an empty row's lse is -inf; +inf makes its recomputed probabilities 0, not NaN
    lsep = pad.pad_q(torch.where(torch.isfinite(lse), lse, float("inf")).float(), float("inf"))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dqp = torch.zeros(pad.bh, pad.q_rows, pad.d, dtype=compute)
    dkp = torch.zeros(pad.bh, pad.kv_rows // pad.bn, pad.bn, pad.d, dtype=compute)
    dvp = torch.zeros_like(dkp)

    def unit(hs: slice):  # one slice of heads, every batch in order: deterministic sums
        for batch in prog.batches:
            qv, ov, dov, lv = (pad.q_view(x, batch)[:, hs] for x in (qp, op, dop, lsep))
            for window, piece in _pieces(batch):
                dq_, dk_, dv_ = FLASH_BACKWARD(
                    dov, qv, pad.kv_view(kp, batch, window, piece)[:, hs],
                    pad.kv_view(vp, batch, window, piece)[:, hs], ov, lv, 0.0, piece.causal,
                    attn_mask=piece.mask(q.dtype, batch), scale=scale)
                pad.q_view(dqp, batch)[:, hs].add_(dq_)
                tiles = pad.kv_tiles(batch, window, piece)
                heads = dq_.shape[1]
                for acc, grad in ((dkp[hs], dk_), (dvp[hs], dv_)):
                    acc.index_add_(1, tiles, grad.view(batch.items, heads, piece.width, pad.bn, pad.d)
                                   .transpose(0, 1).reshape(heads, -1, pad.bn, pad.d).to(compute))

    run_units(partial(unit, hs) for hs in _head_slices(pad.bh))
    first = prog.front * pad.bn

    def unpad_kv(x):
        x = x.view(pad.bh, -1, pad.d)[:, first:first + pad.kv_len, :width]
        return x.reshape(pad.b, pad.h, pad.kv_len, width)

    return pad.unpad(dqp[..., :width]), unpad_kv(dkp), unpad_kv(dvp)
