"""A traced ``mask_mod`` (sympy, ``flex.trace``) lowered to the pattern IR.

The boolean expression is put in negation normal form; ``And``/``Or`` become ``&``/``|``
and each atom becomes a node:

* ``a*q_idx + b*kv_idx + c  (>=, >, <=, <, ==, !=)  0`` with integer coefficients:
  ``affine`` half-planes (canonicalisation turns unit bands into ``causal``/``window``);
* ``|q_idx - kv_idx| <= w`` (and the other comparisons of one ``abs``): two half-planes;
* ``q_idx // s == kv_idx // s``: ``chunks(s)``; ``q_idx // s >= kv_idx // s``:
  ``causal | chunks(s)`` (block-causal);
* ``(kv_idx - q_idx) % d == 0``: a window with dilation ``d`` (its band comes from the
  half-planes beside it in the same ``&``);
* ``ids[q_idx] == kv_ids[kv_idx]`` (``ids[b, q_idx]`` for per-sequence ids):
  ``documents(ids, kv_ids)``;
* a captured bool ``mask[q_idx, kv_idx]`` (or ``mask[b, q_idx, kv_idx]``) as a truth value:
  ``mask_table(mask)`` (tree masks of speculative decoding).

The whole is wrapped in ``top_left``: Flex's ``q_idx`` is the query's row. A head index
``h`` is substituted per head (``heads=``), giving ``per_head``. Anything else raises
``FlexTraceError`` naming the atom.
"""

from __future__ import annotations

import math

import sympy
import torch

from ..ir.affine import MAX_CONSTANT, Affine, TopLeft
from ..ir.canonicalize import band_bounds, canonicalize
from ..ir.nodes import (
    Causal,
    Chunks,
    Documents,
    Empty,
    Full,
    Intersection,
    MaskTable,
    Pattern,
    PerHead,
    Union,
    Window,
)
from .trace import KV, B, FlexTraceError, H, Lookup, Q, Traced

_RELATIONS = (sympy.Ge, sympy.Gt, sympy.Le, sympy.Lt, sympy.Eq, sympy.Ne)
#: the comparison that holds after both sides are negated
_REVERSED = {sympy.Ge: sympy.Le, sympy.Le: sympy.Ge, sympy.Gt: sympy.Lt, sympy.Lt: sympy.Gt}


def lower_mask(traced: Traced, heads: int | None = None) -> Pattern:
    """The pattern of a traced mask_mod (canonical, ``top_left``-aligned)."""
    if traced.uses(H):
        if heads is None:
            raise FlexTraceError(f"mask_mod {traced.name} depends on h: pass heads=<number of "
                                 "query heads> to build one pattern per head")
        per = [_lower_one(_with_head(traced, h), traced) for h in range(heads)]
        return canonicalize(PerHead(tuple(per)))
    return canonicalize(_lower_one(traced.expr, traced))


def _with_head(traced: Traced, h: int):
    """The expression for head ``h``: lookups indexed by constants read off their tensor."""
    expr = traced.expr.subs(H, h)
    return expr.replace(lambda e: isinstance(e, Lookup) and all(a.is_Integer for a in e.args[1:]),
                        lambda e: _read(traced, e))


def _read(traced: Traced, e: Lookup):
    t = traced.tables[int(e.args[0])]
    value = t[tuple(int(a) for a in e.args[1:])]
    if value.numel() != 1:
        raise FlexTraceError(f"mask_mod {traced.name}: {e} is not one value")
    if t.dtype == torch.bool:
        return sympy.Integer(int(bool(value)))
    if t.dtype.is_floating_point:
        return sympy.Float(float(value))
    return sympy.Integer(int(value))


def _lower_one(expr, traced: Traced) -> Pattern:
    if B in expr.free_symbols and not _b_only_in_documents(expr):
        raise FlexTraceError(f"mask_mod {traced.name} depends on b beyond per-sequence document "
                             "ids (ids[b, q_idx] == ids[b, kv_idx]); sparseforge patterns are "
                             "shared by the batch")
    return TopLeft(_Lowering(traced).lower(sympy.to_nnf(expr)))


def _b_only_in_documents(expr) -> bool:
    lookups = expr.atoms(Lookup)
    rest = expr.replace(lambda e: isinstance(e, Lookup), lambda e: sympy.Integer(0))
    return B not in rest.free_symbols and all(
        a.args[1] == B for a in lookups if B in a.free_symbols)


class _Lowering:
    def __init__(self, traced: Traced):
        self.traced = traced

    def fail(self, atom, why: str):
        raise FlexTraceError(f"mask_mod {self.traced.name}: {atom}: {why}")

    def lower(self, expr) -> Pattern:
        if expr is sympy.true:
            return Full()
        if expr is sympy.false:
            return Empty()
        if isinstance(expr, sympy.And):
            return _meet_dilation([self.lower(a) for a in expr.args])
        if isinstance(expr, sympy.Or):
            return Union(tuple(self.lower(a) for a in expr.args))
        if isinstance(expr, _RELATIONS):
            return self.relation(expr)
        if isinstance(expr, sympy.Not):
            self.fail(expr, "the negation of this has no closed form (no pattern is a "
                            "complement)")
        self.fail(expr, "not a comparison of positions")

    def relation(self, rel) -> Pattern:
        diff = sympy.expand(rel.lhs - rel.rhs)
        if diff.atoms(Lookup):
            return self.lookup(rel, diff)
        if diff.atoms(sympy.Abs):
            return self.absolute(rel, diff)
        if diff.atoms(sympy.floor):
            return self.chunked(rel, diff)
        if diff.atoms(sympy.Mod):
            return self.dilated(rel, diff)
        return self.half_planes(rel, diff)

    # ------------------------------------------------------------------ affine atoms

    def affine(self, atom, diff) -> tuple[int, int, int]:
        """Integer (a, b, c) with ``diff = k * (a*q + b*kv + c)`` for some k > 0."""
        if diff.free_symbols - {Q, KV}:
            self.fail(atom, f"depends on {sorted(map(str, diff.free_symbols - {Q, KV}))}")
        try:
            poly = sympy.Poly(diff, Q, KV)
        except sympy.PolynomialError:
            self.fail(atom, "not affine in q_idx and kv_idx")
        if poly.total_degree() > 1:
            self.fail(atom, "not affine in q_idx and kv_idx (a product of positions)")
        coeffs = [poly.coeff_monomial(m) for m in (Q, KV, 1)]
        if not all(c.is_Rational for c in coeffs):
            self.fail(atom, "non-integer coefficients")
        scale = math.lcm(*(int(c.q) for c in coeffs))
        a, b, c = (int(x * scale) for x in coeffs)
        return a, b, c

    def half_planes(self, rel, diff) -> Pattern:
        a, b, c = self.affine(rel, diff)
        self.check_size(rel, a, b, c)
        ge = Affine(a, b, c)  # diff >= 0
        gt = Affine(a, b, c - 1)
        le = Affine(-a, -b, -c)
        lt = Affine(-a, -b, -c - 1)
        if isinstance(rel, sympy.Ge):
            return ge
        if isinstance(rel, sympy.Gt):
            return gt
        if isinstance(rel, sympy.Le):
            return le
        if isinstance(rel, sympy.Lt):
            return lt
        if isinstance(rel, sympy.Eq):
            return Intersection((ge, le))
        return Union((gt, lt))

    def check_size(self, atom, a, b, c):
        try:
            Affine(a, b, c - 1)
            Affine(-a, -b, -c - 1)
        except ValueError as exc:
            self.fail(atom, f"coefficients too large for the kernels ({exc})")

    def absolute(self, rel, diff) -> Pattern:
        """``|u| + c  OP  0`` with a constant ``c``."""
        terms = diff.atoms(sympy.Abs)
        if len(terms) != 1:
            self.fail(rel, "more than one abs()")
        inner = terms.pop()
        kind = type(rel)
        if diff.coeff(inner) == -1:  # c - |u| OP 0  <=>  |u| - c (reversed OP) 0
            diff = -diff
            kind = _REVERSED.get(kind, kind)
        rest = sympy.expand(diff - inner)
        if not rest.is_number:
            self.fail(rel, "abs() must stand alone on one side of the comparison")
        u = inner.args[0]
        if kind in (sympy.Le, sympy.Lt, sympy.Eq):  # |u| <= -rest: both signs bounded
            op = sympy.Le if kind is sympy.Le else sympy.Lt if kind is sympy.Lt else sympy.Eq
            if kind is sympy.Eq:
                return Union((self.relation(sympy.Eq(u + rest, 0)),
                              self.relation(sympy.Eq(-u + rest, 0))))
            return Intersection((self.relation(op(u + rest, 0)), self.relation(op(-u + rest, 0))))
        if kind in (sympy.Ge, sympy.Gt):  # |u| >= -rest: either sign
            return Union((self.relation(kind(u + rest, 0)), self.relation(kind(-u + rest, 0))))
        self.fail(rel, "abs() compared with != has no closed form")

    # ------------------------------------------------------------- floor / mod atoms

    def chunked(self, rel, diff) -> Pattern:
        """``q // s - kv // s  (==, >=, <=)  0``: chunks, block-causal, block-anticausal."""
        floors = list(diff.atoms(sympy.floor))
        sizes = {_floor_size(f) for f in floors}
        if len(floors) != 2 or len(sizes) != 1 or None in sizes:
            self.fail(rel, "only q_idx // s compared with kv_idx // s (the same s) has a "
                           "closed form")
        size = sizes.pop()
        fq, fk = sympy.floor(Q / size), sympy.floor(KV / size)
        if sympy.expand(diff - (fq - fk)) == 0:
            sign = 1
        elif sympy.expand(diff + (fq - fk)) == 0:
            sign = -1
        else:
            self.fail(rel, "only q_idx // s compared with kv_idx // s has a closed form")
        kind = type(rel)
        if kind is sympy.Eq:
            return Chunks(size)
        if sign < 0:  # kv//s - q//s OP 0  ->  q//s (reversed OP) kv//s
            kind = _REVERSED.get(kind, kind)
        if kind is sympy.Ge:  # kv's chunk is not after q's: causal, or the same chunk
            return Union((Causal(), Chunks(size)))
        if kind is sympy.Le:
            return Union((Affine(-1, 1, 0), Chunks(size)))
        self.fail(rel, "a strict comparison of chunk indices has no closed form")

    def dilated(self, rel, diff) -> Pattern:
        """``(kv - q + c) % d == 0`` with ``c % d == 0``: a dilated window (unbounded
        here; ``_meet_dilation`` takes its band from the sibling half-planes)."""
        mods = list(diff.atoms(sympy.Mod))
        if not isinstance(rel, sympy.Eq) or len(mods) != 1 or sympy.expand(diff - mods[0]) != 0:
            self.fail(rel, "only (kv_idx - q_idx) % d == 0 has a closed form")
        inner, d = mods[0].args
        if not (d.is_Integer and int(d) > 0):
            self.fail(rel, "the modulus must be a positive integer")
        d = int(d)
        a, b, c = self.affine(rel, inner)
        if (abs(a), abs(b)) != (1, 1) or a == b or c % d != 0:
            self.fail(rel, "only (kv_idx - q_idx) % d == 0 has a closed form")
        reach = MAX_CONSTANT // d
        return Window(reach, reach, d)

    # ---------------------------------------------------------------- lookups

    def lookup(self, rel, diff) -> Pattern:
        """``ids[q] == kv_ids[kv]`` (optionally ``[b, ...]`` on both): documents; a bool
        ``mask[q, kv]`` (or ``mask[b, q, kv]``) used as a truth value: ``mask_table``."""
        lookups = list(diff.atoms(Lookup))
        if len(lookups) == 1 and diff == lookups[0] and isinstance(rel, sympy.Ne) and rel.rhs == 0:
            return self.table(rel, lookups[0])
        if not isinstance(rel, sympy.Eq) or len(lookups) != 2:
            self.fail(rel, "a lookup into a captured tensor is read only as "
                           "ids[q_idx] == kv_ids[kv_idx] (documents) or as a bool "
                           "mask[q_idx, kv_idx] (mask_table)")
        first, second = lookups
        if sympy.expand(diff - (first - second)) != 0 and sympy.expand(diff - (second - first)) != 0:
            self.fail(rel, "only ids[q_idx] == kv_ids[kv_idx] has a closed form")
        by_side = {_lookup_side(x): x for x in lookups}
        if set(by_side) != {Q, KV}:
            self.fail(rel, "each side must be indexed by q_idx or by kv_idx alone "
                           "(optionally after b)")
        q_ids, kv_ids = (self._ids(by_side[s], rel) for s in (Q, KV))
        return Documents(q_ids, kv_ids=kv_ids)

    def table(self, rel, lookup: Lookup) -> Pattern:
        t = self.traced.tables[int(lookup.args[0])]
        index = tuple(lookup.args[1:])
        if t.dtype != torch.bool or index not in ((Q, KV), (B, Q, KV)) or t.dim() != len(index):
            self.fail(rel, "a captured tensor read as a mask must be bool and indexed "
                           "[q_idx, kv_idx] or [b, q_idx, kv_idx]")
        return MaskTable(t)

    def _ids(self, lookup: Lookup, rel) -> torch.Tensor:
        t = self.traced.tables[int(lookup.args[0])]
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            self.fail(rel, f"document ids must be integers, got {t.dtype}")
        if t.dim() != len(lookup.args) - 1:
            self.fail(rel, f"ids of shape {tuple(t.shape)} indexed by {len(lookup.args) - 1} "
                           "index(es)")
        return t


def _floor_size(f) -> int | None:
    """``s`` of ``floor(q / s)`` or ``floor(kv / s)``; None for anything else."""
    arg = f.args[0]
    for x in (Q, KV):
        s = sympy.simplify(x / arg) if arg != 0 else None
        if s is not None and s.is_Integer and int(s) > 0:
            return int(s)
    return None


def _lookup_side(lookup: Lookup):
    index = lookup.args[1:]
    if len(index) == 1 and index[0] in (Q, KV):
        return index[0]
    if len(index) == 2 and index[0] == B and index[1] in (Q, KV):
        return index[1]
    return None


def _meet_dilation(parts: list[Pattern]) -> Pattern:
    """An ``&`` holding a dilation atom (an unbounded dilated window) takes its band from
    the unit half-planes and windows beside it: ``-l*d <= kv - q <= r*d``."""
    parts = [q for p in parts for q in (p.parts if isinstance(p, Intersection) else (p,))]
    dilated = [p for p in parts if isinstance(p, Window) and p.dilation > 1
               and p.left == p.right == MAX_CONSTANT // p.dilation]
    if len(dilated) != 1:
        return Intersection(tuple(parts))
    d = dilated[0].dilation
    lo = hi = None
    rest = []
    for p in parts:
        if p is dilated[0]:
            continue
        bound = band_bounds(p)
        if bound is None:
            rest.append(p)
            continue
        lo = bound[0] if lo is None or (bound[0] is not None and bound[0] > lo) else lo
        hi = bound[1] if hi is None or (bound[1] is not None and bound[1] < hi) else hi
    reach = MAX_CONSTANT // d
    left = reach if lo is None else -lo // d  # offsets lo <= k * d: k >= ceil(lo / d)
    right = reach if hi is None else hi // d
    if left < 0 or right < 0:  # the band misses offset 0: keep the parts as they are
        return Intersection(tuple(parts))
    return Intersection((*rest, Window(left, right, d)))
