"""A routed pattern seen as its parts: the pairs allowed whatever is routed (the static
part), the pairs it may allow (the envelope), and the static siblings a routing node is
intersected with (its candidates' source). Pure rewrites of the IR.
"""

from __future__ import annotations

from .canonicalize import canonicalize
from .nodes import Empty, Full, Intersection, Pattern, PerHead, Union, walk
from .routing import DynamicPattern


def static_siblings(head: Pattern, node: DynamicPattern) -> list[Pattern]:
    """The other operands of the intersection holding ``node`` directly (none: every
    bucket is a candidate)."""
    for parent in walk(head):
        if isinstance(parent, Intersection) and any(p is node or p == node for p in parent.parts):
            others = [p for p in parent.parts if not (p is node or p == node)]
            dynamic = [p for p in others if any(isinstance(n, DynamicPattern) for n in walk(p))]
            if dynamic:
                raise ValueError(f"{node!r} & {dynamic[0]!r}: two routing nodes in one "
                                 "intersection are not supported; route once per pattern part")
            return others
    return []



def replace_routing(pattern: Pattern, by: Pattern) -> Pattern:
    """``pattern`` with every routing node replaced by the static ``by``, canonical."""
    def strip(p: Pattern) -> Pattern:
        if isinstance(p, DynamicPattern):
            return by
        if isinstance(p, Union):
            return Union(tuple(strip(c) for c in p.parts))
        if isinstance(p, Intersection):
            return Intersection(tuple(strip(c) for c in p.parts))
        if isinstance(p, PerHead):
            return PerHead(tuple(strip(c) for c in p.patterns))
        return p

    return canonicalize(strip(pattern))


def envelope(pattern: Pattern) -> Pattern:
    """Every pair the pattern may allow: each routing node read as ``full()`` (it may
    select any candidate), so ``S & topk`` plans as ``S``."""
    return replace_routing(pattern, Full())


def static_part(pattern: Pattern) -> Pattern:
    """The pairs allowed whatever is selected: each routing node read as ``empty()``. A
    routed kernel walks this part's closed-form tile ranges, then the selected tiles.
    Patterns have no negation, so static_part <= pattern <= envelope."""
    return replace_routing(pattern, Empty())
