"""Launch the generated routing pre-kernels (sources from ``codegen.prekernels``).

Each returns what the torch rules of ``routing.rules`` return for the same call, so the
two are interchangeable (the tests hold them equal): block rules give fixed-k rows (or
worst-case rows + counts for ``threshold_blocks``, the CSR layout's input), HiP its
fixed-k search result, ``vertical_slash`` a ``LineSelection``, clusters the nearest
centroid of every token. Every output has a size known before the call, so nothing
waits for the device. They run compiled on a GPU or in Triton's interpreter on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codegen.prekernels import (
    CLUSTER_WARPS,
    HIP_WARPS,
    LINES_BLOCK_N,
    LINES_BLOCK_O,
    LINES_WARPS,
    MAX_BUCKETS,
    SCORE_BLOCK_C,
    SCORE_BLOCK_Q,
    cluster_constexprs,
    hip_constexprs,
    lines_predicate,
    lines_supported,
    padded,
    render_clusters,
    render_hip,
    render_lines,
    render_routing,
    routing_constexprs,
)
from ..codegen.templates import RenderedSource
from ..ir.nodes import Pattern, PerHead, walk
from ..ir.routing import (
    Clusters,
    DynamicPattern,
    Hierarchical,
    ThresholdBlocks,
    TopkBlocks,
    TopkChunks,
    VerticalSlash,
)
from ..ir.split import static_siblings
from ..routing.geometry import head_map, line_candidates, node_buckets, node_candidates
from ..routing.rules import route_node, select_topk
from ..routing.selection import BlockSelection, LineSelection
from .cache import load_kernel_module

LOG2E = 1.4426950408889634


def prekernel_module(src: RenderedSource, interpret: bool):
    """The imported module of a rendered pre-kernel source (cached by its hash)."""
    return load_kernel_module(src.name, src.source, interpret=interpret)


# -- pool -> score -> select


@dataclass(frozen=True)
class RoutingCall:
    """Sizes of one routing call: buckets, routing heads, padded constexprs."""

    q_starts: torch.Tensor  # int32 [B or 1, Cq + 1]
    k_starts: torch.Tensor  # int32 [B or 1, Ck + 1]
    routing_heads: int
    members: int  # query heads per routing head

    @property
    def n_q(self) -> int:
        return self.q_starts.shape[-1] - 1

    @property
    def n_k(self) -> int:
        return self.k_starts.shape[-1] - 1


def routing_call(node, q_heads: int, kv_heads: int, q_len: int, kv_len: int, device) -> RoutingCall:
    q_starts, k_starts = node_buckets(node, q_len, kv_len, device)
    routing_heads = {"head": q_heads, "group": kv_heads, "all": 1}[node.share]
    return RoutingCall(q_starts.to(torch.int32).contiguous(), k_starts.to(torch.int32).contiguous(),
                       routing_heads, q_heads // routing_heads)


def route_prekernels(node, siblings, q: torch.Tensor, k: torch.Tensor, scale: float, *,
                     interpret: bool):
    """(indices int32, counts, the call's buckets, query head -> routing head) from the
    generated pre-kernels, for q ``[B, Hq, Lq, D]`` and k ``[B, Hkv, Lkv, D]``.

    Top-k rules: fixed-k rows ``[B, Hr, Cq, k]`` and counts None. ``threshold_blocks``:
    worst-case rows ``[B, Hr, Cq, Ck]`` and counts ``[B, Hr, Cq]`` (the CSR counts;
    ``BlockSelection.csr`` compacts). Rows are ascending, -1 after the last."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    call = routing_call(node, hq, hkv, q_len, kv_len, q.device)
    if call.n_k > MAX_BUCKETS:
        raise ValueError(f"{node!r}: {call.n_k} key buckets; the select pre-kernel holds at most "
                         f"{MAX_BUCKETS} (use larger blocks)")
    src = render_routing(node)
    module = prekernel_module(src, interpret)
    pool = getattr(module, f"{src.name}_pool")
    score = getattr(module, f"{src.name}_score")
    select = getattr(module, f"{src.name}_select")
    constexprs = routing_constexprs(node, d, call.n_k)
    q, k = q.contiguous(), k.contiguous()
    qbar = torch.empty(b, hq, call.n_q, d, dtype=torch.float32, device=q.device)
    kbar = torch.empty(b, hkv, call.n_k, d, dtype=torch.float32, device=q.device)
    for x, starts, out, offset in ((q, call.q_starts, qbar, kv_len - q_len),
                                   (k, call.k_starts, kbar, 0)):
        heads = x.shape[1]
        sb = 0 if starts.shape[0] == 1 else starts.stride(0)
        pool[(out.shape[2], b * heads)](
            x, starts, out, x.stride(0), x.stride(1), x.stride(2), sb, out.stride(0),
            out.stride(1), out.stride(2), heads, x.shape[2], offset, out.shape[2],
            **constexprs["pool"])
    cand = node_candidates(node, siblings, call.q_starts, call.k_starts, q_len, kv_len,
                           q.device).to(torch.int8).contiguous()
    scores = torch.empty(b, call.routing_heads, call.n_q, call.n_k, dtype=torch.float32,
                         device=q.device)
    grid = (-(-call.n_q // SCORE_BLOCK_Q), -(-call.n_k // SCORE_BLOCK_C), b * call.routing_heads)
    score[grid](qbar, kbar, cand, scores, *qbar.stride()[:3], *kbar.stride()[:3],
                0 if cand.shape[0] == 1 else cand.stride(0), cand.stride(1), *scores.stride()[:3],
                call.routing_heads, hq, hq // hkv, call.members, call.n_q, call.n_k,
                **constexprs["score"])
    grid = (call.n_q, b * call.routing_heads)
    if isinstance(node, ThresholdBlocks):
        indices = torch.empty(b, call.routing_heads, call.n_q, call.n_k, dtype=torch.int32,
                              device=q.device)
        counts = torch.empty(b, call.routing_heads, call.n_q, dtype=torch.int32, device=q.device)
        select[grid](scores, indices, counts, *scores.stride()[:3], *indices.stride()[:3],
                     call.routing_heads, call.n_k, float(scale), node.coverage,
                     **constexprs["select"])
    else:
        indices = torch.empty(b, call.routing_heads, call.n_q, node.k, dtype=torch.int32,
                              device=q.device)
        counts = None
        select[grid](scores, indices, *scores.stride()[:3], *indices.stride()[:3],
                     call.routing_heads, call.n_k, **constexprs["select"])
    return indices, counts, call, head_map(node.share, hq, hkv, str(q.device))


# -- HiP's tree search


def route_hip(node: Hierarchical, siblings, q: torch.Tensor, k: torch.Tensor, *,
              interpret: bool):
    """(fixed-k block indices ``[B, Hq, Cq, k]``, q bucket starts, k bucket starts, head
    map) from the generated search; candidates go in as per-block prefix counts."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    q_starts, k_starts = node_buckets(node, q_len, kv_len, q.device)
    cand = node_candidates(node, siblings, q_starts, k_starts, q_len, kv_len, q.device)
    cq, ck = cand.shape[-2], cand.shape[-1]
    cum = torch.zeros(cand.shape[0], cq, ck + 1, dtype=torch.int32, device=q.device)
    cum[..., 1:] = cand.to(torch.int32).cumsum(-1)
    src = render_hip(node)
    fn = getattr(prekernel_module(src, interpret), f"{src.name}_search")
    q, k = q.contiguous(), k.contiguous()
    out = torch.empty(b, hq, cq, node.k, dtype=torch.int32, device=q.device)
    qs, ks = q_starts[0].to(torch.int32).contiguous(), k_starts[0].to(torch.int32).contiguous()
    fn[(cq, b * hq)](q, k, cum, qs, ks, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                     k.stride(1), k.stride(2), 0 if cum.shape[0] == 1 else cum.stride(0),
                     cum.stride(1), *out.stride()[:3], hq, hq // hkv, q_len, kv_len, ck,
                     max(1, (ck - 1).bit_length()),
                     **hip_constexprs(node, d, ck, interpret and q.dtype == torch.bfloat16),
                     num_warps=HIP_WARPS)
    return out, q_starts, k_starts, head_map("head", hq, hkv, str(q.device))


# -- nearest-centroid clusters


def assign(node: Clusters, x: torch.Tensor, heads_per_set: int, *, interpret: bool) -> torch.Tensor:
    """int64 ``[B, H, L]``: the nearest centroid of every token of ``x`` ``[B, H, L, D]``;
    head h uses centroid set ``h // heads_per_set`` (one set: all heads)."""
    b, h, length, d = x.shape
    cent = node.centroids.to(device=x.device, dtype=torch.float32).contiguous()
    if cent.shape[-1] != d:
        raise ValueError(f"clusters(centroids=[{'x'.join(map(str, node.centroids.shape))}]): "
                         f"expected head dim {d}")
    x = x.contiguous()
    ids = torch.empty(b, h, length, dtype=torch.int32, device=x.device)
    src = render_clusters()
    fn = getattr(prekernel_module(src, interpret), f"{src.name}_assign")
    constexprs = cluster_constexprs(d, cent.shape[1])
    fn[(-(-length // constexprs["BLOCK_T"]), b * h)](
        x, cent, ids, x.stride(0), x.stride(1), x.stride(2), cent.stride(0), cent.stride(1),
        ids.stride(0), ids.stride(1), h, length, heads_per_set, cent.shape[0], cent.shape[1],
        **constexprs, num_warps=CLUSTER_WARPS)
    return ids.long()


# -- MInference's lines


def route_lines(node: VerticalSlash, siblings, q: torch.Tensor, k: torch.Tensor, scale: float,
                *, interpret: bool) -> tuple[LineSelection, torch.Tensor, torch.Tensor]:
    """(the ``LineSelection`` of ``node``, column masses ``[B, Hq, Lkv]``, diagonal masses
    ``[B, Hq, 2 Lkv - 1]``) for q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lkv, D]``, estimated by
    the generated pre-kernels (three kernels; each column and diagonal summed by one
    program, so no atomics), then the top-n among the candidates."""
    b, hq, q_len, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    src = render_lines(node, lines_predicate(siblings))
    module = prekernel_module(src, interpret)
    q, k = q.contiguous(), k.contiguous()
    r_pad, d_pad = padded(min(node.last_q, q_len)), padded(d)
    lse = torch.empty(b * hq, r_pad, dtype=torch.float32, device=q.device)
    vertical = torch.empty(b, hq, kv_len, dtype=torch.float32, device=q.device)
    slash = torch.empty(b, hq, 2 * kv_len - 1, dtype=torch.float32, device=q.device)
    common = (q.stride(1), q.stride(2), k.stride(1), k.stride(2), hq, hq // hkv, q_len, kv_len,
              scale * LOG2E)
    sizes = dict(R_PAD=r_pad, HEAD_DIM=d, D_PAD=d_pad)
    upcast = dict(UPCAST=interpret and q.dtype == torch.bfloat16)
    getattr(module, f"{src.name}_lse")[(b * hq,)](q, k, lse, *common, BLOCK_N=LINES_BLOCK_N,
                                                  **sizes, **upcast, num_warps=LINES_WARPS["lse"])
    getattr(module, f"{src.name}_columns")[(-(-kv_len // LINES_BLOCK_N), b * hq)](
        q, k, lse, vertical, *common, BLOCK_N=LINES_BLOCK_N, **sizes, **upcast,
        num_warps=LINES_WARPS["columns"])
    getattr(module, f"{src.name}_diagonals")[(-(-(2 * kv_len - 1) // LINES_BLOCK_O), b * hq)](
        q, k, lse, slash, *common, BLOCK_O=LINES_BLOCK_O, **sizes,
        num_warps=LINES_WARPS["diagonals"])
    col_cand, diag_cand = line_candidates(siblings, q_len, kv_len, q.device)
    columns = select_topk(vertical, col_cand[:, None].expand_as(vertical), node.n_vertical)
    diagonals = select_topk(slash, diag_cand[:, None].expand_as(slash), node.n_slash)
    return LineSelection(columns, diagonals), vertical, slash


# -- every node of a pattern


def route_with_prekernels(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float, *,
                          interpret: bool) -> dict:
    """``routing.rules.route`` with the generated pre-kernels where a rule has them (block
    rules, HiP, ``vertical_slash`` without document ids); the rest by the torch rules."""
    if isinstance(pattern, PerHead):
        raise ValueError("per_head with routing nodes is not supported yet: route one pattern "
                         "for all heads (share='head' decides per head)")
    out = {}
    for node in walk(pattern):
        if not isinstance(node, DynamicPattern) or node in out:
            continue
        siblings = static_siblings(pattern, node)
        if isinstance(node, Hierarchical):
            indices, q_starts, k_starts, heads = route_hip(node, siblings, q, k,
                                                           interpret=interpret)
            out[node] = BlockSelection.from_fixed_k(indices, q_starts, k_starts, heads)
        elif isinstance(node, VerticalSlash) and lines_supported(siblings):
            out[node] = route_lines(node, siblings, q, k, scale, interpret=interpret)[0]
        elif isinstance(node, (TopkBlocks, TopkChunks, ThresholdBlocks)):
            indices, _, call, heads = route_prekernels(node, siblings, q, k, scale,
                                                       interpret=interpret)
            out[node] = BlockSelection.from_fixed_k(indices, call.q_starts, call.k_starts, heads)
        else:
            out[node] = route_node(node, siblings, q, k, scale)
    return out
