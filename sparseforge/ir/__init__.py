"""Pattern IR: nodes, constructors and canonicalisation passes."""

from .canonicalize import canonicalize, expression_dag, is_empty
from .nodes import (
    Causal,
    Chunks,
    Documents,
    Empty,
    Full,
    GlobalQueries,
    Intersection,
    Pattern,
    PerHead,
    Sinks,
    Union,
    Window,
    causal,
    chunks,
    documents,
    full,
    global_queries,
    per_head,
    prefix_lm,
    sinks,
    sliding_window,
    walk,
    window,
)

__all__ = [
    "Causal", "Chunks", "Documents", "Empty", "Full", "GlobalQueries", "Intersection",
    "Pattern", "PerHead", "Sinks", "Union", "Window", "canonicalize", "causal", "chunks",
    "documents", "expression_dag", "full", "global_queries", "is_empty", "per_head",
    "prefix_lm", "sinks", "sliding_window", "walk", "window",
]
