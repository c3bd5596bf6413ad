"""sparseforge: a compiler for sparse attention patterns.

The public API lives here and only here (DESIGN section 2).
"""

from ._version import __version__ as __version__
from .aot.spec import BuildSpec
from .ir.neighborhood import halo_blocks, maxvit_block, maxvit_grid, neighborhood, swin_window
from .ir.nodes import (
    Pattern,
    causal,
    chunks,
    documents,
    full,
    global_queries,
    per_head,
    prefix_lm,
    sinks,
    sliding_window,
    window,
)
from .ir.routing import (
    clusters,
    hierarchical,
    threshold_blocks,
    topk_blocks,
    topk_chunks,
    topk_keys,
    vertical_slash,
)
from .ir.scores import alibi, alibi_slopes, rel_bias, softcap
from .merge import merge
from .modules import SparseAttention
from .natten_api import na1d, na2d, na3d
from .planner.plan import Plan, plan
from .reference import dense_mask, reference_attention
from .runtime.dispatch import attention
from .runtime.prebuilt import load_kernels

__all__ = [
    "BuildSpec", "Pattern", "Plan", "alibi", "alibi_slopes", "attention", "causal", "chunks",
    "clusters",
    "dense_mask", "documents", "full", "global_queries", "halo_blocks", "hierarchical", "load_kernels",
    "maxvit_block", "maxvit_grid", "merge", "na1d", "na2d", "na3d", "neighborhood", "per_head", "plan",
    "prefix_lm", "reference_attention", "rel_bias", "sinks", "sliding_window", "softcap",
    "SparseAttention", "swin_window", "threshold_blocks", "topk_blocks", "topk_chunks", "topk_keys",
    "vertical_slash", "window",
]
