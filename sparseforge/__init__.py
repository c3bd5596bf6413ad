"""sparseforge: a compiler for sparse attention patterns.

The public API lives here and only here. Each name is loaded from its module on first
use (PEP 562), so ``import sparseforge`` costs almost nothing and Triton, sympy,
networkx and matplotlib load only when a call needs them: the pattern constructors need
none of them, planning needs sympy and networkx, the CPU path never imports Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

#: public name -> the module that defines it
_PUBLIC = {
    "BuildSpec": "aot.spec",
    "affine": "ir.affine", "top_left": "ir.affine",
    "create_block_mask": "flex.api", "flex_attention": "flex.api", "from_mask_mod": "flex.api",
    "from_score_mod": "flex.api",
    "Pattern": "ir.nodes", "causal": "ir.nodes", "chunks": "ir.nodes", "documents": "ir.nodes",
    "full": "ir.nodes", "global_queries": "ir.nodes", "per_head": "ir.nodes",
    "prefix_lm": "ir.nodes", "sinks": "ir.nodes", "sliding_window": "ir.nodes",
    "mask_table": "ir.nodes",
    "window": "ir.nodes",
    "halo_blocks": "ir.neighborhood", "maxvit_block": "ir.neighborhood",
    "maxvit_grid": "ir.neighborhood", "neighborhood": "ir.neighborhood",
    "swin_window": "ir.neighborhood",
    "clusters": "ir.routing", "hierarchical": "ir.routing", "threshold_blocks": "ir.routing",
    "topk_blocks": "ir.routing", "topk_chunks": "ir.routing", "topk_keys": "ir.routing",
    "vertical_slash": "ir.routing",
    "alibi": "ir.scores", "alibi_slopes": "ir.scores", "rel_bias": "ir.scores",
    "pair_bias": "ir.scores", "softcap": "ir.scores",
    "merge": "merging",
    "SparseAttention": "modules",
    "na1d": "natten_api", "na2d": "natten_api", "na3d": "natten_api",
    "Plan": "planner.plan", "plan": "planner.plan",
    "dense_mask": "oracle", "reference_attention": "oracle",
    "attention": "api",
    "load_kernels": "runtime.prebuilt",
}

__all__ = [
    "BuildSpec", "Pattern", "Plan", "SparseAttention", "affine", "alibi", "alibi_slopes", "attention",
    "causal", "chunks", "clusters", "create_block_mask", "dense_mask", "documents",
    "flex_attention", "from_mask_mod", "from_score_mod", "full", "global_queries",
    "halo_blocks", "hierarchical", "load_kernels", "mask_table", "maxvit_block", "maxvit_grid",
    "merge", "na1d",
    "na2d", "na3d", "neighborhood", "pair_bias", "per_head", "plan", "prefix_lm",
    "reference_attention",
    "rel_bias", "sinks", "sliding_window", "softcap", "swin_window", "threshold_blocks",
    "top_left", "topk_blocks", "topk_chunks", "topk_keys", "vertical_slash", "window",
]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # what static tools and IDEs see: the same names, imported eagerly
    from .aot.spec import BuildSpec
    from .api import attention
    from .flex.api import create_block_mask, flex_attention, from_mask_mod, from_score_mod
    from .ir.affine import affine, top_left
    from .ir.neighborhood import halo_blocks, maxvit_block, maxvit_grid, neighborhood, swin_window
    from .ir.nodes import (
        Pattern,
        causal,
        chunks,
        documents,
        full,
        global_queries,
        mask_table,
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
    from .ir.scores import alibi, alibi_slopes, pair_bias, rel_bias, softcap
    from .merging import merge
    from .modules import SparseAttention
    from .natten_api import na1d, na2d, na3d
    from .oracle import dense_mask, reference_attention
    from .planner.plan import Plan, plan
    from .runtime.prebuilt import load_kernels
