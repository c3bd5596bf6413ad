"""Render the kernels of a planned head pattern from their jinja2 templates.

Four kinds share one context (``KINDS``): ``forward``, ``backward_dq`` (same walk as the
forward: kv tiles per query tile), ``backward_dkdv`` (the inverted walk: query tiles per
kv tile, from the key-side range analysis) and ``decode`` (split-KV, in original token
order). The context holds only validated integers, booleans, enum names and expressions
printed by our own printers. The same plan renders byte-identical source, so the cache
key is stable.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import NamedTuple

from .._env import triton_version
from ..ir.nodes import MaskTable, document_terms, walk
from ..ir.ops import TritonOps, TritonText
from ..ir.routing import (
    Clusters,
    DynamicPattern,
    ThresholdBlocks,
    TopkChunks,
    TopkKeys,
    VerticalSlash,
    is_dynamic,
)
from ..ir.scores import REGISTER_REL_BIAS_WIDTH, ScoreSpec, rel_index
from ..planner.plan import KernelPlan, Plan
from ..planner.ranges import (
    FULL_HI,
    FULL_LO,
    HI,
    LO,
    RAW_FULL_HI,
    RAW_FULL_LO,
    RAW_HI,
    RAW_LO,
    merged_lets,
    normalise_steps,
)
from ..planner.routing_steps import has_generated_backward, has_routed_decode
from ..planner.symbolic import BLOCK_M, BLOCK_N, TRITON_NAMES, to_triton
from ..planner.tiles import padded_head_dim
from .predicate import (
    positions_prelude,
    predicate_prelude,
    slug,
    triton_predicate,
)
from .templates import TEMPLATES, render


def padded_pow2(n: int) -> int:
    """The power of two at or above ``n`` (>= 1): the padded sizes of ``tl.arange``."""
    return 1 << max(0, n - 1).bit_length()


class KernelKind(NamedTuple):
    template: str  # a key of ``templates.TEMPLATES``
    prefix: str  # of the kernel name
    config: str  # the Plan field holding its tiles
    segments: str  # the KernelPlan field holding the segments it walks
    side: str  # whose tiles those segments bound: "query" (kv tiles) or "key" (query tiles)
    permuted: bool  # runs on the plan's dilation-group permutation (else original order)

    @property
    def family(self) -> str:  # what the manifest calls it: forward/backward/decode
        return TEMPLATES[self.template].family


KINDS = {
    "forward": KernelKind("forward", "fwd", "config", "walked_segments", "query", True),
    "backward_dq": KernelKind("backward_dq", "bwd_dq", "backward_dq", "walked_segments", "query",
                              True),
    "backward_dkdv": KernelKind("backward_dkdv", "bwd_dkdv", "backward_dkdv", "key_segments",
                                "key", True),
    "decode": KernelKind("decode", "dec", "decode", "decode_segments", "query", False),
}
_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class KernelSource:
    name: str  # readable kernel name, e.g. fwd_window-l255-r0_bm128_bn64_d128_bf16
    source: str
    sha256: str
    kernel_index: int  # which of the plan's kernels this is
    launch_options: tuple  # (("num_warps", 4), ("num_stages", 3))
    kind: str  # a key of KINDS
    constexprs: tuple  # (("BLOCK_M", 64), ...): what it is specialised on besides the source
    #: the kernel can take TMA descriptors (its ``TMA`` constexpr, set per target and call
    #: by the runtime): a 16-bit plan whose rows are 16-byte multiples
    tma_ready: bool = False

    @property
    def family(self) -> str:
        return KINDS[self.kind].family

    @property
    def block_m(self) -> int:
        return dict(self.constexprs)["BLOCK_M"]

    @property
    def block_n(self) -> int:
        return dict(self.constexprs)["BLOCK_N"]

    @property
    def module_stem(self) -> str:
        return f"{self.name}_{self.sha256[:16]}"


def tma_fits(plan: Plan, kernel: KernelPlan, kind: str) -> bool:
    """Whether the kernel's tiles may move by TMA descriptors (its ``TMA`` constexpr,
    set per target and call by the runtime). Descriptors need 16-byte rows: 16-bit plans
    with head_dim % 8 == 0. Where they made sm_90 kernels spill, the kernel keeps its
    pointer loads (Triton 3.9, the template-variant set): dK/dV (8-112 bytes), head dims
    above 128 (56-664 bytes) and a rel_bias table read through a tiled N-D layout's
    positions (16 bytes). Head dims below 64 keep them as well: their small tiles issued
    4-9 % more per score with descriptors (``planner/tile_costs.json``). Under Triton 3.6
    the decode kernel keeps them too: 3.6's ptxas crashed (signal 11) on a two-segment
    decode kernel with descriptors."""
    kinds = ("forward", "backward_dq", "decode") if triton_version() >= (3, 9) else (
        "forward", "backward_dq")
    return (kind in kinds
            and plan.dtype in ("bfloat16", "float16")
            and all(d % 8 == 0 and 64 <= padded_head_dim(d) <= 128
                    for d in (plan.head_dim, plan.value_dim))
            and not (kernel.score.rel_bias and plan.layout is not None))


def kernel_name(plan: Plan, kernel: KernelPlan, kind: str = "forward") -> str:
    pattern_slug = slug(kernel.pattern)
    if len(pattern_slug) > 60:
        pattern_slug = pattern_slug[:48] + "-" + hashlib.sha256(pattern_slug.encode()).hexdigest()[:8]
    cfg = kind_config(plan, kind)
    dims = f"d{plan.head_dim}" + (f"v{plan.value_dim}" if plan.value_dim != plan.head_dim else "")
    name = (f"{KINDS[kind].prefix}_{pattern_slug}_bm{cfg.block_m}_bn{cfg.block_n}_{dims}_"
            f"{_DTYPE_SHORT[plan.dtype]}")
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def kind_config(plan: Plan, kind: str):
    """The tile config a kernel kind runs with: the plan's forward or backward tiles."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    return getattr(plan, KINDS[kind].config)


def _let_names(lets) -> dict:
    return {symbol: symbol.name for symbol, _ in lets}


def _segment_texts(s: int, seg, tiles: dict, side: str = "query") -> dict:
    names = dict(TRITON_NAMES)
    names.update(_let_names(seg.lets))
    names.update({RAW_LO: f"lo_raw{s}", RAW_HI: f"hi_raw{s}", RAW_FULL_LO: f"flo_raw{s}",
                  RAW_FULL_HI: f"fhi_raw{s}", LO: f"lo{s}", HI: f"hi{s}", FULL_LO: f"flo{s}",
                  FULL_HI: f"fhi{s}"})
    seg = seg.subs(tiles)
    out = {k: to_triton(getattr(seg, k), names) for k in ("lo", "hi", "full_lo", "full_hi")}
    # normalisation steps refer to this segment's raw bounds and to earlier steps
    for (_, expr), key in zip(normalise_steps(side), ("lo", "hi", "full_lo", "full_hi")):
        out[f"norm_{key}"] = to_triton(expr, names)
    return out


def _score_context(score: ScoreSpec, cfg) -> dict:
    """Which score modifiers the kernel applies, and the static sizes of the rel_bias
    gradient (table entries padded to a power of two; diagonals of a dK/dV tile)."""
    rel_text = (str(rel_index(score, TritonText("p"), TritonText("j"), TritonOps))
                if score.rel_bias else "")
    return dict(score_any=score.any, alibi=score.alibi, alibi_offset=score.alibi_offset,
                softcap=score.softcap,
                rel_bias=score.rel_bias, rel_index=rel_text,
                rel_grad=score.rel_grad, pair_bias=score.pair_bias,
                rel_wide=2 * score.rel_radius + 1 > REGISTER_REL_BIAS_WIDTH,
                rel_radius=max(score.rel_radius, 0),
                bias_t_pad=padded_pow2(2 * max(score.rel_radius, 0) + 1),
                bias_chunk=padded_pow2(cfg.block_m + cfg.block_n - 1))


def _routing_context(pattern, kv_len: int) -> dict:
    """Which routed walk the forward kernel takes: key buckets (top-k / coverage) or lines
    (vertical_slash: columns and diagonals), with the binary searches' unrolled steps
    (enough for the longest selection a row can hold)."""
    nodes = [n for n in walk(pattern) if isinstance(n, DynamicPattern)] if pattern else []
    context = dict(routed_lines=False, col_steps=0, off_steps=0, sel_steps=0, list_steps=0,
                   key_bias=False, remapped=False)
    if not nodes:
        return context
    node = nodes[0]
    context["key_bias"] = isinstance(node, TopkKeys)
    def steps(n: int) -> int:
        return max(n, 1).bit_length() + 1

    if isinstance(node, Clusters):  # tokens sorted by cluster; one key bucket per query bucket
        # one entry per row; dK/dV searches a query tile's cluster list (up to every cluster)
        return dict(context, remapped=True, sel_steps=2, list_steps=steps(node.centroids.shape[1]))

    if isinstance(node, VerticalSlash):
        return dict(context, routed_lines=True, col_steps=steps(node.n_vertical),
                    off_steps=steps(node.n_slash))
    buckets = node.chunks if isinstance(node, TopkChunks) else -(-kv_len // node.block) + 1
    # (topk_keys: blocks of one key, so a row may hold min(k, Lkv) of them)
    width = buckets if isinstance(node, ThresholdBlocks) else min(node.k, buckets)
    # dK/dV's search of a query tile's bucket list (at most every bucket)
    return dict(context, sel_steps=steps(width), list_steps=steps(buckets))


def routed_kernels(pattern, kind: str) -> bool:
    """Whether a routed pattern has a generated ``kind`` kernel: every routed pattern with
    a kernel has its forward and backward (dQ, dK/dV: ``routing_steps.has_generated_backward``);
    the bucket rules but ``topk_keys`` their split-KV decode (``has_routed_decode``)."""
    if kind == "decode":
        return has_routed_decode(pattern)
    return kind == "forward" or has_generated_backward(pattern)


def render_kernel(plan: Plan, kernel_index: int = 0, kind: str = "forward") -> KernelSource:
    """Source of one kernel of ``plan``; ``kind`` is a key of ``KINDS``."""
    cfg = kind_config(plan, kind)
    spec = KINDS[kind]
    kernel = plan.kernels[kernel_index]
    tiles = {BLOCK_M: cfg.block_m, BLOCK_N: cfg.block_n}
    walked = kernel.kernel_segments(spec.segments)
    # unpermuted kinds see the pattern in original coordinates, without dilation groups
    analysed, groups = (kernel.analysed, kernel.groups) if spec.permuted else (kernel.mask, 1)
    routed = is_dynamic(analysed)
    if routed and not routed_kernels(analysed, kind):
        raise ValueError(f"{kind} kernel of {kernel.pattern!r}: this routing rule has a generated "
                         "forward kernel only (its training runs with torch ops, its decode on "
                         "the forward kernel)")
    runs = walked[0].runs if len(walked) == 1 else 1
    if any(seg.runs > 1 for seg in walked) and (len(walked) > 1 or routed or kind == "decode"):
        raise ValueError(f"{kind} kernel of {kernel.pattern!r}: a segment family is walked "
                         "alone, by a static forward, dQ or dK/dV kernel only")
    segments = [_segment_texts(s, seg, tiles, spec.side) for s, seg in enumerate(walked)]
    lets = merged_lets(seg.subs(tiles) for seg in walked)
    let_names = {**TRITON_NAMES, **_let_names(lets)}
    segment_lets = [(symbol.name, to_triton(expr, let_names)) for symbol, expr in lets]
    n = len(segments)
    sort_pairs = [(j, j + 1) for i in range(n) for j in range(n - 1 - i)]
    name = kernel_name(plan, kernel, kind)
    context = dict(
        schedule=kernel.schedule,
        groups=groups,
        segments=segments,
        runs=runs,
        sort_pairs=sort_pairs,
        segment_lets=segment_lets,
        predicate=triton_predicate(analysed),
        predicate_prelude=predicate_prelude(analysed),
        positions_prelude=positions_prelude(analysed) if kernel.score.any else [],
        has_documents=kernel.has_documents,
        n_documents=len(document_terms(analysed)),
        has_tables=kernel.has_tables,
        data_hull=kernel.narrowed_by_data,
        n_tables=len(document_terms(analysed, MaskTable)),
        routed=routed,
        **_routing_context(kernel.analysed if routed else None, plan.kv_len),
        d_padded=plan.padded_head_dim != plan.head_dim,
        dv_padded=plan.padded_value_dim != plan.value_dim,
        split_v=plan.value_dim != plan.head_dim,
        dot_precision=', input_precision="ieee"' if plan.dtype == "float32" else "",
        # dK/dV: several head patterns may share a kv head, each kernel then adds its part
        # to the buffers; alone, a kernel stores (the read-back spilled at D=128 on sm_90)
        accumulate=len(plan.kernels) > 1,
        **_score_context(kernel.score, cfg),
    )
    # the header comment: the pattern's repr, enum names unquoted
    rendered = render(spec.template, name, context, comment=repr(kernel.pattern).replace("'", ""))
    options = (("num_warps", cfg.num_warps), ("num_stages", cfg.num_stages))
    constexprs = (("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n), ("HEAD_DIM", plan.head_dim),
                  ("D_PAD", plan.padded_head_dim), ("HEAD_DIM_V", plan.value_dim),
                  ("DV_PAD", plan.padded_value_dim), ("GROUPS", groups))
    tma_ready = tma_fits(plan, kernel, kind)
    return KernelSource(name, rendered.source, rendered.sha256, kernel_index, options, kind,
                        constexprs, tma_ready)
