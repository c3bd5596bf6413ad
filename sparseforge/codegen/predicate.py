"""The IR's printer for the kernel: a pattern as a Triton boolean expression.

Names available in the generated ``_allowed`` helper: ``i`` (query rows, [BM, 1]), ``p``
(their absolute positions), ``j`` (keys, [1, BN]) and, for documents, ``doc_q``/``doc_k``.
Only integers from validated IR nodes reach the text: never a user string.
"""

from __future__ import annotations

from ..ir.nodes import (
    Causal,
    Chunks,
    Documents,
    Empty,
    Full,
    GlobalQueries,
    Intersection,
    Pattern,
    Sinks,
    Union,
    Window,
)


def triton_predicate(pattern: Pattern) -> str:
    if isinstance(pattern, Full):
        return "j >= 0"
    if isinstance(pattern, Empty):
        return "j < 0"
    if isinstance(pattern, Causal):
        return "j <= p"
    if isinstance(pattern, Window):
        d, lo, hi = pattern.dilation, pattern.left * pattern.dilation, pattern.right * pattern.dilation
        band = f"(j >= p - {lo}) & (j <= p + {hi})"
        return band if d == 1 else f"((j - p) % {d} == 0) & {band}"
    if isinstance(pattern, Sinks):
        return f"j < {int(pattern.n)}"
    if isinstance(pattern, GlobalQueries):
        return f"(p < {int(pattern.n)}) | (j < 0)"
    if isinstance(pattern, Chunks):
        return f"_floordiv(p, {int(pattern.size)}) == _floordiv(j, {int(pattern.size)})"
    if isinstance(pattern, Documents):
        return "doc_q == doc_k"
    if isinstance(pattern, Union):
        return " | ".join(f"({triton_predicate(p)})" for p in pattern.parts)
    if isinstance(pattern, Intersection):
        return " & ".join(f"({triton_predicate(p)})" for p in pattern.parts)
    raise TypeError(f"no Triton predicate for {type(pattern).__name__}")


def slug(pattern: Pattern) -> str:
    """A readable, identifier-safe name for a pattern (used in kernel and file names)."""
    if isinstance(pattern, Window):
        d = f"-d{pattern.dilation}" if pattern.dilation > 1 else ""
        return f"window-l{pattern.left}-r{pattern.right}{d}"
    if isinstance(pattern, (Sinks, GlobalQueries)):
        return f"{'sinks' if isinstance(pattern, Sinks) else 'global'}{pattern.n}"
    if isinstance(pattern, Chunks):
        return f"chunks{pattern.size}"
    if isinstance(pattern, Union):
        return "-or-".join(slug(p) for p in pattern.parts)
    if isinstance(pattern, Intersection):
        return "-and-".join(slug(p) for p in pattern.parts)
    return type(pattern).__name__.lower()
