"""The routing pre-kernels' sources and the constants they are specialised on.

One module per routing family in ``templates/``: ``routing.py.jinja`` (pool -> score ->
select for ``topk_blocks``, ``topk_chunks`` and ``threshold_blocks``),
``hierarchical.py.jinja`` (HiP's tree search), ``clusters.py.jinja`` (nearest centroid)
and ``vertical_slash.py.jinja`` (MInference's line estimate, with the static part printed
as its ``_allowed`` predicate). Everything goes through ``templates.render``; the
launches live in ``runtime.prekernels``, which reads the tile constants and constexpr
tables from here so that launching and cross-compiling specialise alike.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from ..ir.nodes import Documents, Full, Intersection, MaskTable, walk
from ..ir.routing import Hierarchical, ThresholdBlocks, TopkBlocks, TopkChunks, VerticalSlash
from ..ir.scores import strip_scores
from .predicate import triton_predicate
from .render import padded_pow2
from .templates import RenderedSource, render

# -- pool -> score -> select (routing.py.jinja)
POOL_BLOCK_T = 64  # tokens a pool program loads per step
SCORE_BLOCK_Q = SCORE_BLOCK_C = 32  # query x key buckets a score program computes
MAX_BUCKETS = 16384  # key buckets a select program holds in registers
PREKERNEL_NODES = (TopkBlocks, TopkChunks, ThresholdBlocks)
# -- hierarchical.py.jinja
HIP_WARPS = 4
# -- clusters.py.jinja
CLUSTER_BLOCK_T = 16
CLUSTER_WARPS = 4
# -- vertical_slash.py.jinja
LINES_BLOCK_N = 32  # keys per column program
LINES_BLOCK_O = 64  # diagonals per diagonal program
#: the fp32 (IEEE) score tiles of up to 128 rows x D=128 spill on 4 warps (cuobjdump)
LINES_WARPS = {"lse": 8, "columns": 8, "diagonals": 4}


def padded(n: int, floor: int = 16) -> int:
    """A padded ``tl.arange`` size: the power of two at or above ``n``, at least ``floor``."""
    return max(floor, padded_pow2(n))


def render_routing(node) -> RenderedSource:
    """Source of the three pre-kernels (pool, score, select) of one routing node."""
    if not isinstance(node, PREKERNEL_NODES):
        raise TypeError(f"{node!r}: generated pre-kernels exist for topk_blocks, topk_chunks "
                        "and threshold_blocks")
    pool = getattr(node, "pool", "mean")
    sqrt_len = isinstance(node, TopkChunks) or getattr(node, "scale_by_sqrt_len", False)
    rule = "coverage" if isinstance(node, ThresholdBlocks) else "topk"
    keep = "cov" if rule == "coverage" else f"k{node.k}"
    tag = f"{node.kind}_{pool}{'_sqrt' if sqrt_len else ''}_{node.share}_{keep}"
    return render("routing", f"route_{tag}",
                  dict(pool=pool, sqrt_len=sqrt_len, share=node.share, rule=rule),
                  comment=repr(node))


def routing_constexprs(node, head_dim: int, n_k_buckets: int) -> dict:
    """Per pre-kernel (pool, score, select): the constexprs a call specialises on."""
    d_pad = padded(head_dim)
    return {"pool": dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_T=POOL_BLOCK_T),
            "score": dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_Q=SCORE_BLOCK_Q,
                          BLOCK_C=SCORE_BLOCK_C),
            "select": (dict(C_PAD=padded(n_k_buckets)) if isinstance(node, ThresholdBlocks) else
                       dict(K=node.k, K_PAD=padded(node.k, 1), C_PAD=padded(n_k_buckets)))}


@lru_cache(maxsize=64)
def render_hip(node: Hierarchical) -> RenderedSource:
    """Source of HiP's search pre-kernel (one program per query block and head)."""
    return render("hierarchical", f"route_hierarchical_k{node.k}", {}, comment=repr(node))


def hip_constexprs(node: Hierarchical, head_dim: int, n_k: int, upcast: bool) -> dict:
    return dict(TOPK=node.k, K_PAD=max(8, padded(node.k, 1)), QB_PAD=padded(node.q_block),
                HEAD_DIM=head_dim, D_PAD=padded(head_dim), STEPS=(n_k + 1).bit_length() + 1,
                UPCAST=upcast)


@lru_cache(maxsize=8)
def render_clusters() -> RenderedSource:
    """Source of the nearest-centroid assignment pre-kernel."""
    return render("clusters", "route_clusters", {}, comment="clusters(nearest centroid)")


def cluster_constexprs(head_dim: int, n_clusters: int) -> dict:
    return dict(BLOCK_T=CLUSTER_BLOCK_T, C_PAD=padded(n_clusters), HEAD_DIM=head_dim,
                D_PAD=padded(head_dim), D_CHUNK=min(32, padded(head_dim)))


def lines_supported(siblings) -> bool:
    """Whether the line pre-kernels can print the static part (no document ids: those
    are run-time data, routed with torch ops; so are mask tables)."""
    return not any(isinstance(n, (Documents, MaskTable)) for s in siblings for n in walk(s))


def lines_predicate(siblings) -> str:
    """The static part beside a ``vertical_slash`` node as the kernels' predicate text."""
    parts = [strip_scores(s) for s in siblings]
    return triton_predicate(Intersection(tuple(parts)) if len(parts) > 1
                            else parts[0] if parts else Full())


@lru_cache(maxsize=64)
def render_lines(node: VerticalSlash, predicate: str) -> RenderedSource:
    """Source of the three line pre-kernels (row lse, column masses, diagonal masses)."""
    tag = f"vertical_slash_q{node.last_q}_{hashlib.sha256(predicate.encode()).hexdigest()[:10]}"
    return render("vertical_slash", f"route_{tag}", dict(last_q=node.last_q, predicate=predicate),
                  comment=repr(node))
