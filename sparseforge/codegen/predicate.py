"""The IR's printer for the kernel: a pattern as a Triton boolean expression.

Names available in the generated ``_allowed`` helper: ``i`` (query rows, [BM, 1]), ``p``
(their absolute positions), ``j`` (keys, [1, BN]), for documents ``doc_q0``/``doc_k0``, ...,
for mask tables ``tbl0``, ... ([BM, BN] tiles of the tables), and
for a routed kernel ``routed`` ([BM, BN]: is the key's bucket selected for the row's).
Only integers from validated IR nodes reach the text: never a user string.
"""

from __future__ import annotations

from ..ir.affine import Affine, TopLeft
from ..ir.neighborhood import Neighborhood, NeighborhoodPart, neighborhood_keep
from ..ir.nodes import (
    Causal,
    Chunks,
    Documents,
    Empty,
    Full,
    GlobalQueries,
    Intersection,
    MaskTable,
    Pattern,
    Sinks,
    Union,
    Window,
    document_terms,
)
from ..ir.ops import TritonOps, TritonText
from ..ir.routing import DynamicPattern


def predicate_prelude(pattern: Pattern) -> list[str]:
    """Statements the ``_allowed`` helper runs before the predicate: a planner-internal
    token layout maps run positions ``i``/``j`` back to original positions here."""
    prelude = getattr(pattern, "triton_prelude", None)
    return prelude(TritonText, TritonOps) if prelude else []


def positions_prelude(pattern: Pattern) -> list[str]:
    """Statements the ``_biased`` helper runs first: under a tiled layout, score modifiers
    read original positions, so run positions ``p``/``j`` are mapped back."""
    original = getattr(pattern, "original_positions", None)
    if original is None:
        return []
    p, j = original(TritonText("p"), TritonText("j"), TritonOps)
    return [f"p = {p}", f"j = {j}"]


def triton_predicate(pattern: Pattern, leaf=None, p: str = "p", root=None) -> str:
    """The pattern's mask as a Triton expression over ``p`` (the query position: the
    name ``p`` of its absolute position, or ``i``, its row, inside ``top_left``) and ``j``
    (key). ``leaf``: a planner-internal node's override for some leaves (returns their
    text, or None for the default). ``root``: the whole pattern, whose ``document_terms``
    number the id pairs (the k-th compares ``doc_qk == doc_kk``) and mask tables (``tblk``)."""
    root = pattern if root is None else root
    text = leaf(pattern) if leaf is not None else None
    if text is not None:
        return text
    if isinstance(pattern, Full):
        return "j >= 0"
    if isinstance(pattern, Empty):
        return "j < 0"
    if isinstance(pattern, Causal):
        return f"j <= {p}"
    if isinstance(pattern, Window):
        d, lo, hi = pattern.dilation, pattern.left * pattern.dilation, pattern.right * pattern.dilation
        band = f"(j >= {p} - {lo}) & (j <= {p} + {hi})"
        return band if d == 1 else f"((j - {p}) % {d} == 0) & {band}"
    if isinstance(pattern, Sinks):
        return f"j < {int(pattern.n)}"
    if isinstance(pattern, GlobalQueries):
        return f"({p} < {int(pattern.n)}) | (j < 0)"
    if isinstance(pattern, Chunks):
        return f"_floordiv({p}, {int(pattern.size)}) == _floordiv(j, {int(pattern.size)})"
    if isinstance(pattern, Documents):
        n = next(k for k, d in enumerate(document_terms(root)) if d is pattern)
        return f"doc_q{n} == doc_k{n}"
    if isinstance(pattern, MaskTable):
        tables = document_terms(root, MaskTable)
        return f"tbl{next(k for k, t in enumerate(tables) if t is pattern)} != 0"
    if isinstance(pattern, Affine):
        return _half_plane(int(pattern.q), int(pattern.kv), int(pattern.const), p)
    if isinstance(pattern, TopLeft):
        return triton_predicate(pattern.pattern, leaf, "i", root)
    if isinstance(pattern, (Neighborhood, NeighborhoodPart)):
        return str(neighborhood_keep(pattern, TritonText(p), TritonText("j"), TritonOps))
    if isinstance(pattern, DynamicPattern):  # the routed kernel's per-pair lookup (_routed)
        return "routed"
    if hasattr(pattern, "triton_predicate"):  # planner-internal nodes (a token layout)
        return pattern.triton_predicate(triton_predicate)
    if isinstance(pattern, Union):
        return " | ".join(f"({triton_predicate(q, leaf, p, root)})" for q in pattern.parts)
    if isinstance(pattern, Intersection):
        return " & ".join(f"({triton_predicate(q, leaf, p, root)})" for q in pattern.parts)
    raise TypeError(f"no Triton predicate for {type(pattern).__name__}")


def _half_plane(a: int, b: int, c: int, p: str) -> str:
    """``a*p + b*j + c >= 0`` as one comparison of ``j`` with a per-row bound (the bound is
    computed once per row, [BM, 1]; a key-free half-plane broadcasts with ``j < 0``)."""
    row = " + ".join(t for t in (f"{a} * {p}" if a not in (0, 1) else p if a == 1 else "",
                                 str(c) if c else "") if t).replace("+ -", "- ") or "0"
    if b == 0:
        return f"({row} >= 0) | (j < 0)"
    if b == -1:
        return f"j <= {row}"
    if b == 1:
        return f"j >= -({row})"
    if b < 0:  # j <= floor(row / -b)
        return f"j <= _floordiv({row}, {-b})"
    return f"j >= _floordiv(-({row}) + {b - 1}, {b})"  # j >= ceil(-row / b)


def slug(pattern: Pattern) -> str:
    """A readable, identifier-safe name for a pattern (used in kernel and file names)."""
    if isinstance(pattern, Window):
        d = f"-d{pattern.dilation}" if pattern.dilation > 1 else ""
        return f"window-l{pattern.left}-r{pattern.right}{d}"
    if isinstance(pattern, (Sinks, GlobalQueries)):
        return f"{'sinks' if isinstance(pattern, Sinks) else 'global'}{pattern.n}"
    if isinstance(pattern, Chunks):
        return f"chunks{pattern.size}"
    if isinstance(pattern, Neighborhood):
        dims = [f"{'x'.join(map(str, v))}" for v in (pattern.shape, pattern.kernel)]
        extra = "".join(f"-{tag}{'x'.join(str(int(x)) for x in getattr(pattern, name))}"
                        for tag, name, default in (("d", "dilation", 1), ("s", "stride", 1),
                                                   ("c", "causal", False))
                        if any(x != default for x in getattr(pattern, name)))
        return f"na{pattern.ndim}d-{dims[0]}-k{dims[1]}{extra}"
    if isinstance(pattern, NeighborhoodPart):
        offsets = "_".join(str(v).replace("-", "m") for v in (pattern.q_offset, pattern.kv_offset))
        return f"{slug(pattern.grid)}-at{offsets}"
    if isinstance(pattern, Affine):
        return "affine" + "_".join(str(v).replace("-", "m")
                                   for v in (pattern.q, pattern.kv, pattern.const))
    if isinstance(pattern, TopLeft):
        return "topleft-" + slug(pattern.pattern)
    if hasattr(pattern, "slug"):
        return pattern.slug(slug)
    if isinstance(pattern, Union):
        return "-or-".join(slug(p) for p in pattern.parts)
    if isinstance(pattern, Intersection):
        return "-and-".join(slug(p) for p in pattern.parts)
    return type(pattern).__name__.lower()
