"""Two nodes for masks written as arithmetic on positions (FlexAttention's ``mask_mod``).

``affine(q, kv, const)``: the half-plane ``q * p + kv * j + const >= 0`` of the pair grid.
Every comparison of two affine expressions in the query position and the key is one (a
strict ``<`` is ``<= -1`` on integers; ``==`` is two of them). Its tile bounds are closed
form like every primitive's, so a mask no named node fits still needs no index tensor.

``top_left(pattern)``: ``pattern`` with queries aligned to the *first* key instead of the
last: the query position is its row ``i``, not ``p = i + Lkv - Lq``. FlexAttention's
``q_idx`` is the row, so ``q_idx >= kv_idx`` is ``top_left(causal())``. With Lq == Lkv the
two alignments are the same and the planner drops the wrapper (identical kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

from .neighborhood import Neighborhood, NeighborhoodPart
from .nodes import (
    Causal,
    Chunks,
    Documents,
    Full,
    GlobalQueries,
    Intersection,
    MaskTable,
    Pattern,
    PerHead,
    ScoreModifier,
    Window,
    check_int,
    walk,
)
from .routing import DynamicPattern

#: coefficients and constants stay small enough that ``q * p + kv * j + const`` fits in
#: the kernels' int32 arithmetic for sequences up to 2**24 tokens
MAX_COEFFICIENT = 64
MAX_CONSTANT = 1 << 24


@dataclass(frozen=True)
class Affine(Pattern):
    """``q * p + kv * j + const >= 0`` (``p`` the query's position, ``j`` the key)."""

    q: int
    kv: int
    const: int = 0

    def __post_init__(self) -> None:
        for name, limit in (("q", MAX_COEFFICIENT), ("kv", MAX_COEFFICIENT),
                            ("const", MAX_CONSTANT)):
            value = getattr(self, name)
            check_int("affine", name, value, -limit)
            if value > limit:
                raise ValueError(f"affine({name}={value}): {name} must be <= {limit}")

    def __repr__(self) -> str:
        return f"affine(q={self.q}, kv={self.kv}, const={self.const})"


@dataclass(frozen=True)
class TopLeft(Pattern):
    """``pattern`` evaluated with the query position taken as its row ``i``."""

    pattern: Pattern

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"top_left(pattern={type(self.pattern).__name__}): expected a "
                            "sparseforge pattern")
        for node in walk(self.pattern):
            if isinstance(node, (ScoreModifier, DynamicPattern, PerHead)):
                raise ValueError(f"top_left({node!r}): only static masks can be re-aligned; "
                                 "put score modifiers, routing and per_head outside top_left")
            if isinstance(node, Documents) and node.kv_ids is None:
                raise ValueError("top_left(documents(ids)): a single ids tensor is aligned to "
                                 "the last key; pass query ids and kv_ids separately")

    @property
    def children(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    def __repr__(self) -> str:
        return f"top_left({self.pattern!r})"


def affine(q: int, kv: int, const: int = 0) -> Pattern:
    """The pairs with ``q * p + kv * j + const >= 0``: any linear comparison of the
    query position ``p`` and the key ``j`` (``affine(1, -1, 0)`` is ``causal()``)."""
    return Affine(q, kv, const)


def top_left(pattern: Pattern) -> Pattern:
    """``pattern`` with queries aligned to the first key (FlexAttention's convention)
    instead of the last; the same as ``pattern`` when Lq == Lkv."""
    return TopLeft(pattern)


def reads_query_position(pattern: Pattern) -> bool:
    """Whether the mask depends on the query's position (so its alignment matters)."""
    for node in walk(pattern):
        if isinstance(node, (Causal, Window, GlobalQueries, Chunks, Neighborhood,
                             NeighborhoodPart)):
            return True
        if isinstance(node, Affine) and node.q != 0:
            return True
    return False


def drop_top_left(pattern: Pattern) -> Pattern:
    """``pattern`` with every ``top_left`` wrapper removed: the same mask when Lq == Lkv."""
    if isinstance(pattern, TopLeft):
        return drop_top_left(pattern.pattern)
    if not any(isinstance(n, TopLeft) for n in walk(pattern)):
        return pattern
    kids = tuple(drop_top_left(c) for c in pattern.children)
    return type(pattern)(kids)  # Union, Intersection and PerHead hold only their children


def data_conjuncts(pattern: Pattern) -> list[MaskTable | Documents]:
    """The ``mask_table`` and ``documents`` nodes every allowed pair of ``pattern`` must
    satisfy: those at its top-level ``&`` (through nested intersections and ``top_left``,
    which neither notices: both are indexed by row). Their pairs bound the tiles a kernel
    visits (``planner/data_hulls.py``); a node inside a union bounds nothing."""
    if isinstance(pattern, TopLeft):
        return data_conjuncts(pattern.pattern)
    if isinstance(pattern, (MaskTable, Documents)):
        return [pattern]
    if isinstance(pattern, Intersection):
        return [t for part in pattern.parts for t in data_conjuncts(part)]
    return []


def without_data_conjuncts(pattern: Pattern) -> Pattern:
    """``pattern`` with each of its ``data_conjuncts`` read as ``full()``: what the
    closed-form segments bound when the kernels take those nodes' tiles from their data
    (``planner/data_hulls.py``)."""
    if isinstance(pattern, TopLeft):
        return TopLeft(without_data_conjuncts(pattern.pattern))
    if isinstance(pattern, (MaskTable, Documents)):
        return Full()
    if isinstance(pattern, Intersection):
        return Intersection(tuple(without_data_conjuncts(p) for p in pattern.parts))
    return pattern
