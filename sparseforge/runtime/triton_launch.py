"""Launch the generated forward kernels of a plan (GPU, or CPU tensors via the interpreter).

Warm calls never render or compile: the rendered source, the imported module and the
kernel are looked up in dictionaries keyed by the (frozen, hashable) plan. On a GPU the
launch goes through a held ``CompiledKernel`` (``gpu_launch``: prebuilt, cached or
compiled once), skipping Triton's argument binder; under the interpreter, or when a
call breaks the held kernel's alignment assumptions, through ``JITFunction``.
"""

from __future__ import annotations

import torch

from ..ir.nodes import MaskTable, document_terms
from ..ir.scores import Alibi, PairBias, RelBias, Softcap, pair_bias_tensor, rel_bias_table, score_terms
from ..planner.plan import Plan
from ..planner.routing_steps import has_routed_decode
from ..planner.schedule import group_geometry
from ..planner.tiles import DECODE_MAX_Q
from ..semantics import document_ids, table_mask
from . import gpu_launch, sources
from .hull_memo import cached_tile_hulls
from .tensor_memo import TensorMemo
from .tma import call_tma, ensure_allocator

LOG2E = 1.4426950408889634


def head_runs(heads: tuple[int, ...] | None, n_heads: int) -> list[tuple[int, int]]:
    """Contiguous (first head, count) runs of a kernel's heads."""
    if heads is None:
        return [(0, n_heads)]
    runs: list[list[int]] = []
    for h in heads:
        if runs and runs[-1][0] + runs[-1][1] == h:
            runs[-1][1] += 1
        else:
            runs.append([h, 1])
    return [tuple(r) for r in runs]


def _documents_args(call_kernel_pattern, q_len, kv_len, device):
    """Every documents term's ids packed ``[B or 1, terms, L]`` (int32) per side, in
    ``document_terms`` order, with their batch, term and token strides."""
    terms = [document_ids(d, q_len, kv_len) for d in document_terms(call_kernel_pattern)]
    args: list = []
    packed = []
    for side in (0, 1):
        ids = [t[side] for t in terms]
        batch = max(x.shape[0] for x in ids)
        stacked = torch.stack([x.expand(batch, -1) for x in ids], 1)
        packed.append(stacked.to(device=device, dtype=torch.int32).contiguous())
    for t in packed:
        args += [0 if t.shape[0] == 1 else t.stride(0), t.stride(1), t.stride(2)]
    return packed + args


#: packed mask tables: a warm call with the same, unedited tables neither copies nor
#: converts them again
_packed_tables = TensorMemo(limit=16)


def _tables_args(call_kernel_pattern, q_len, kv_len, device):
    """Every mask table bit-packed ``[B or 1, tables, Lq, ceil(Lkv / 64)]`` (int64 words,
    key j at bit j % 64 of word j // 64) with its batch, table, row and word strides."""
    nodes = document_terms(call_kernel_pattern, MaskTable)

    def build():
        tables = [table_mask(n, q_len, kv_len) for n in nodes]
        batch = max(t.shape[0] for t in tables)
        stacked = torch.stack([t.expand(batch, -1, -1) for t in tables], 1)
        return _bit_packed(stacked).to(device)

    t = _packed_tables.get([n.table(q_len, kv_len) for n in nodes], (q_len, kv_len, str(device)),
                           build)
    return [t, 0 if t.shape[0] == 1 else t.stride(0), t.stride(1), t.stride(2), t.stride(3)]


def _bit_packed(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., L]`` -> int64 ``[..., ceil(L / 64)]``: bytes of 8 keys each (bit k of a
    byte is its k-th key), read as little-endian 64-bit words. Temporaries stay byte-sized."""
    pad = (-bits.shape[-1]) % 64
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad))
    b = b.view(*b.shape[:-1], -1, 8) << torch.arange(8, dtype=torch.uint8, device=b.device)
    return b.sum(-1, dtype=torch.uint8).contiguous().view(torch.int64)


def _score_args(kernel, call_pattern, device) -> list:
    """The score modifiers' run-time values, in the kernels' parameter order: ALiBi
    slopes, the rel_bias table and its row stride, the soft cap in log2 units."""
    score = kernel.score
    if not score.any:
        return []
    terms = score_terms(call_pattern)
    args: list = []
    if score.alibi:
        args.append(terms[Alibi].slopes.detach().to(device=device, dtype=torch.float32).contiguous())
    if score.rel_bias:
        table = terms[RelBias].table.detach().to(device=device, dtype=torch.float32).flatten(1).contiguous()
        args += [table, table.stride(0)]
    if score.pair_bias:  # [B|1, H|1, Lq, Lkv]: a broadcast dim steps by 0
        bias = terms[PairBias].bias4.detach().to(device=device, dtype=torch.float32).contiguous()
        args += [bias, *(0 if n == 1 else st for n, st in zip(bias.shape[:2], bias.stride()[:2])),
                 bias.stride(2)]
    if score.softcap:
        args.append(terms[Softcap].cap * LOG2E)
    return args


def _pattern_args(kernel, call_pattern, q_len: int, kv_len: int, device, tiles) -> list:
    """The run-time values a kernel's pattern reads: document ids, mask tables and their
    per-tile ranges (``tiles``: rows and columns of a tile, and whether rows are keys),
    score modifiers."""
    docs = _documents_args(call_pattern, q_len, kv_len, device) if kernel.has_documents else []
    if kernel.has_tables:
        docs += _tables_args(call_pattern, q_len, kv_len, device)
    if kernel.narrowed_by_data:
        hulls = cached_tile_hulls(call_pattern, q_len, kv_len, *tiles, device)
        docs += [hulls, 0 if hulls.shape[0] == 1 else hulls.stride(0)]
    return docs + _score_args(kernel, call_pattern, device)


def kv_heads_spanned(first_head: int, n_heads: int, group: int) -> int:
    """How many kv heads query heads [first_head, first_head + n_heads) touch (GQA)."""
    return (first_head + n_heads - 1) // group - first_head // group + 1


def kernel_launches(plan: Plan, call_kernels, q, k, v, out, lse, scale: float, routed=None):
    """(kernel index, grid, run-time arguments) of every launch a call makes, in the
    kernel's parameter order (the constexprs that follow are the launcher's business).
    ``routed``: this call's ``RoutedTiles`` for a routed plan."""
    b, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    for index, kernel in enumerate(plan.kernels):
        extra = _pattern_args(kernel, call_kernels[index], lq, lkv, q.device,
                              (plan.block_m, plan.block_n, False))
        if routed is not None:
            extra += routed.kernel_args()
        g = kernel.groups
        tiles_per_group = max(1, max(-(-geo.q_len // plan.block_m)
                                     for geo in group_geometry(lq, lkv, g)))
        for first_head, n_heads in head_runs(kernel.heads, hq):
            args = [q, k, v, out, lse, *extra,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                    n_heads, first_head, hq // hkv, lq, lkv, tiles_per_group, scale * LOG2E]
            yield index, (g * tiles_per_group, b * n_heads, 1), args


def backward_launches(plan: Plan, call_kernels, q, k, v, do, dq, dk, dv, lse, delta, scale: float,
                      bias_parts=None, dpair=None, routed=None):
    """(kind, kernel index, grid, run-time arguments) of every backward launch, in the
    kernels' parameter order: all dQ launches, then all dK/dV launches. ``bias_parts``
    maps a kernel with a rel_bias table to its gradient buffer (``bias_grad_buffers``);
    ``dpair`` is the pair biases' gradient buffer [B, Hq, Lq, Lkv] (the dQ kernels write it);
    ``routed`` a routed plan's ``routed_tiles.RoutedBackward``."""
    b, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bm, bn = plan.backward_dq.block_m, plan.backward_dkdv.block_n
    own_v = [*v.stride(), *do.stride()] if plan.value_dim != plan.head_dim else []
    common = [*q.stride(), *k.stride(), *own_v, *lse.stride()]
    for kind in ("backward_dq", "backward_dkdv"):
        for index, kernel in enumerate(plan.kernels):
            cfg = getattr(plan, kind)
            hull_tiles = ((cfg.block_m, cfg.block_n, False) if kind == "backward_dq" else
                          (cfg.block_n, cfg.block_m, True))  # dK/dV: a key tile's query tiles
            extra = _pattern_args(kernel, call_kernels[index], lq, lkv, q.device, hull_tiles)
            geos = group_geometry(lq, lkv, kernel.groups)
            if kind == "backward_dq":
                tiles = max(1, max(-(-geo.q_len // bm) for geo in geos))
                tensors = [q, k, v, do, dq, lse, delta]
                if kernel.score.pair_bias:
                    extra = extra + [dpair, dpair.stride(0), dpair.stride(1)]
                if routed is not None:
                    extra = extra + routed.dq.kernel_args()
            else:
                tiles = max(1, max(-(-geo.kv_len // bn) for geo in geos))
                tensors = [q, k, v, do, dk, dv, lse, delta]
                if kernel.score.rel_grad:
                    part = bias_parts[index]
                    extra = extra + [part, *part.stride()[:3]]
                if routed is not None:
                    extra = extra + routed.dkdv_args()
            for first_head, n_heads in head_runs(kernel.heads, hq):
                programs = b * (n_heads if kind == "backward_dq"
                                else kv_heads_spanned(first_head, n_heads, group))
                args = [*tensors, *extra, *common, n_heads, first_head, group, lq, lkv, tiles,
                        scale, scale * LOG2E]
                yield kind, index, (kernel.groups * tiles, programs, 1), args


def bias_grad_buffers(plan: Plan, call_kernels, q, k) -> dict:
    """Per kernel with a rel_bias table: a zeroed fp32 buffer [B, Hq, programs, 2R+1] in
    which each dK/dV program writes its own part of the table's gradient."""
    b, hq, lq, _ = q.shape
    lkv = k.shape[2]
    parts = {}
    for index, kernel in enumerate(plan.kernels):
        if kernel.score.rel_grad:
            tiles = max(1, max(-(-geo.kv_len // plan.backward_dkdv.block_n)
                               for geo in group_geometry(lq, lkv, kernel.groups)))
            parts[index] = torch.zeros((b, hq, kernel.groups * tiles, 2 * kernel.score.rel_radius + 1),
                                       dtype=torch.float32, device=q.device)
    return parts


def table_grads(call_kernels, parts: dict) -> dict:
    """id(table) -> the gradient of that rel_bias table: the buffers summed over batch and
    programs (a fixed-order sum: deterministic), added up across kernels sharing it."""
    grads: dict = {}
    for index, part in parts.items():
        table = rel_bias_table(call_kernels[index])
        g = part.sum(dim=(0, 2)).to(table.dtype)
        grads[id(table)] = grads[id(table)] + g if id(table) in grads else g
    return grads


def run_backward(plan: Plan, call_kernels, q, k, v, out, lse, grad_out, grad_lse, scale: float,
                 interpret: bool, routed=None):
    """(dq, dk, dv, table grads) by the generated backward kernels. dQ walks the forward's
    kv tiles per query tile; dK/dV walks the inverted bounds per key tile, summing the
    GQA group's heads in registers, and each rel_bias table's gradient per program; a
    routed plan's kernels walk the selected tiles on top (``routed``: the call's
    ``RoutedBackward``). Deterministic: no atomics anywhere. Table grads map id(table)
    to its gradient."""
    q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
    lse = lse.contiguous()
    # D_i = rowsum(dO * O) (minus the lse gradient, which enters every dS_ij the same way)
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.float(), 0.0)
    delta = delta.contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    parts = bias_grad_buffers(plan, call_kernels, q, k)
    dpair = (torch.zeros((*q.shape[:3], k.shape[2]), dtype=torch.float32, device=q.device)
             if any(kernel.score.pair_bias for kernel in plan.kernels) else None)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return (dq.zero_(), dk.to(k.dtype), dv.to(v.dtype),
                {**table_grads(call_kernels, parts), **pair_grads(plan, call_kernels, dpair)})
    held = _held_launcher(q, interpret)
    for kind, index, grid, args in backward_launches(plan, call_kernels, q, k, v, grad_out, dq, dk,
                                                      dv, lse, delta, scale, parts, dpair, routed):
        _launch(plan, index, kind, grid, args, q, interpret, held)
    return (dq, dk.to(k.dtype), dv.to(v.dtype),
            {**table_grads(call_kernels, parts), **pair_grads(plan, call_kernels, dpair)})


def pair_grads(plan: Plan, call_kernels, dpair) -> dict:
    """id(bias) -> the gradient of each pair bias: the buffer's heads of the kernels
    holding it, summed over the dims the bias broadcasts, in its shape and dtype."""
    grads: dict = {}
    if dpair is None:
        return grads
    for head in call_kernels:
        bias = pair_bias_tensor(head)
        if bias is None or id(bias) in grads:
            continue
        shape = score_terms(head)[PairBias].bias4.shape
        owners = [h for kernel, other in zip(plan.kernels, call_kernels)
                  if pair_bias_tensor(other) is bias
                  for h in (range(dpair.shape[1]) if kernel.heads is None else kernel.heads)]
        g = dpair
        if len(owners) < dpair.shape[1]:  # per-head patterns: other heads hold other biases
            g = torch.zeros_like(dpair)
            g[:, owners] = dpair[:, owners]
        if shape[0] == 1:
            g = g.sum(0, keepdim=True)
        if shape[1] == 1:
            g = g.sum(1, keepdim=True)
        grads[id(bias)] = g.reshape(bias.shape).to(bias.dtype)
    return grads


def _held_launcher(q, interpret: bool):
    """The held-kernel launcher module on a GPU (None under the interpreter or when off)."""
    if q.is_cuda and not interpret and gpu_launch.held_launch_enabled():
        return gpu_launch
    return None


def _launch(plan: Plan, index: int, kind: str, grid, args, q, interpret: bool, held) -> None:
    """One launch: through the held kernel when there is one that accepts the call, else
    through Triton's JIT (which specialises on whatever the call is)."""
    kernel = held.held_kernel(plan, index, q.device.index, kind) if held is not None else None
    if kernel is not None and kernel.launch(grid, args, q.device.index):
        return
    fn, src = sources.kernel_function(plan, index, interpret, kind)
    tma = call_tma(src, args, q.device, interpret)
    if tma and not interpret:
        ensure_allocator()
    fn[grid](*args, **dict(src.constexprs), DOT_UPCAST=interpret and q.dtype == torch.bfloat16,
             TMA=tma, **dict(src.launch_options))


#: decode splits aim at this many programs (about two waves on an H100's 132 SMs)
DECODE_PROGRAMS = 264


def decode_layout(plan: Plan, batch: int, q_heads: int, kv_heads: int) -> tuple[int, int]:
    """(head chunks per kv head, kv splits) of a decode call. A program packs
    BLOCK_M // q_len heads of a GQA group; splits fill the GPU, each at least two tiles."""
    group = q_heads // kv_heads
    per_program = plan.decode.block_m // plan.q_len
    chunks = -(-group // per_program)
    # (a routed plan's splits share every kv tile: selected tiles may lie anywhere)
    span = (-(-plan.kv_len // plan.decode.block_n) if plan.routing_steps
            else max(plan.decode_spans, default=0))
    want = -(-DECODE_PROGRAMS // max(1, batch * kv_heads * chunks))
    return chunks, max(1, min(want, -(-span // 2), 128))


def decode_launches(plan: Plan, call_kernels, q, k, v, out_part, lse_part, scale: float,
                    chunks: int, routed=None):
    """(kernel index, grid, run-time arguments) of every decode launch; ``routed``: a
    routed plan's ``RoutedTiles`` laid out for one query tile of all new tokens."""
    b, hq, lq, _ = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    group = hq // hkv
    for index, kernel in enumerate(plan.kernels):
        # (all new tokens are one query tile)
        extra = _pattern_args(kernel, call_kernels[index], lq, lkv, q.device,
                              (max(lq, 1), plan.decode.block_n, False))
        if routed is not None:
            extra += routed.kernel_args()
        for first_head, n_heads in head_runs(kernel.heads, hq):
            n_kv_heads = kv_heads_spanned(first_head, n_heads, group)
            args = [q, k, v, out_part, lse_part, *extra, *q.stride(), *k.stride(), *v.stride(),
                    *out_part.stride(), *lse_part.stride(), n_heads, first_head, group, lq, lkv,
                    chunks, scale * LOG2E]
            yield index, (out_part.shape[3], b * n_kv_heads * chunks, 1), args


def merge_partials(out_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor) -> None:
    """Exact log-sum-exp combine of split partials ([..., S, D] and [..., S]) into
    ``out``/``lse``; rows no split saw stay 0 / -inf."""
    m = lse_part.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse_part - m)
    total = w.sum(-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out.copy_((out_part * (w / safe)[..., None]).sum(-2))
    lse.copy_(torch.where(total > 0, m + torch.log(safe), float("-inf")).squeeze(-1))


def decode_eligible(plan: Plan) -> bool:
    """Whether the split-KV decode kernel serves this call: a few new tokens (decode
    BLOCK_M >= 16), and a decode kernel for the pattern (the routed bucket rules but
    ``topk_keys`` have one)."""
    return (1 <= plan.q_len <= DECODE_MAX_Q and plan.kv_len > 0
            and (not plan.routing_steps or has_routed_decode(plan.pattern)))


def positive_scale(q, scale: float):
    """(q, scale) with scale >= 0: the forward and decode kernels take the row max of the raw
    scores and scale it (one FMA per score forms the exponent), which needs scale >= 0; a
    negative scale runs as -q with -scale (the same scores, one copy of q)."""
    return (-q, -scale) if scale < 0 else (q, scale)


def run_decode(plan: Plan, call_kernels, q, k, v, out, lse, scale: float, interpret: bool,
               routed=None) -> None:
    """Attention of a few new tokens by the split-KV decode kernels, merged exactly;
    ``routed``: a routed plan's selection laid out for one tile of all new tokens."""
    q, scale = positive_scale(q, scale)
    b, hq, lq, _ = q.shape
    chunks, splits = decode_layout(plan, b, hq, k.shape[1])
    out_part = torch.empty((b, hq, lq, splits, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b, hq, lq, splits), dtype=torch.float32, device=q.device)
    held = _held_launcher(q, interpret)
    for index, grid, args in decode_launches(plan, call_kernels, q, k, v, out_part, lse_part,
                                             scale, chunks, routed):
        _launch(plan, index, "decode", grid, args, q, interpret, held)
    merge_partials(out_part, lse_part, out, lse)


def run_forward(plan: Plan, call_kernels, q, k, v, out, lse, scale: float, interpret: bool,
                routed=None) -> None:
    """Launch every kernel of ``plan`` writing into ``out``/``lse``.

    ``call_kernels`` holds the call's own head patterns (with this call's document ids);
    ``routed`` the call's routing (``routed_tiles.RoutedTiles``) for a routed plan.
    """
    if q.shape[2] == 0:
        return
    q, scale = positive_scale(q, scale)
    held = _held_launcher(q, interpret)
    for index, grid, args in kernel_launches(plan, call_kernels, q, k, v, out, lse, scale, routed):
        _launch(plan, index, "forward", grid, args, q, interpret, held)
