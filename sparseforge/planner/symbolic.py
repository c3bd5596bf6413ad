"""Symbols, integer floor division, and the two consumers of a closed-form bound.

A bound is a sympy expression over the tile index and the problem sizes. It is either
*evaluated* (vectorised over all tiles, for the planner's statistics, the CPU path and
the property tests) or *printed* as a Triton expression (for the kernel). Both go
through this module so there is one meaning for every operator.
"""

from __future__ import annotations

import numpy as np
import sympy

# The tile index of a query tile, the tile sizes, the (group-local) lengths.
M = sympy.Symbol("m", integer=True, nonnegative=True)
BLOCK_M = sympy.Symbol("BM", integer=True, positive=True)
BLOCK_N = sympy.Symbol("BN", integer=True, positive=True)
Q_LEN = sympy.Symbol("Lq", integer=True, nonnegative=True)
KV_LEN = sympy.Symbol("Lkv", integer=True, nonnegative=True)

# Named intermediates of the query tile: kept as symbols so printed bounds stay short;
# ``DERIVED`` gives each one's closed form (the kernel and ``evaluate`` compute them so).
P_FIRST = sympy.Symbol("p_first", integer=True)  # absolute position of the tile's first row
P_LAST = sympy.Symbol("p_last", integer=True)  # ... of its last valid row
KV_TILES = sympy.Symbol("n_kv_tiles", integer=True, nonnegative=True)
KV_FULL_TILES = sympy.Symbol("n_kv_full_tiles", integer=True, nonnegative=True)

# The same from a key tile's side (the backward dK/dV kernel walks query tiles per key
# tile): its index, first and last valid key, and the query tile counts.
N = sympy.Symbol("n", integer=True, nonnegative=True)
J_FIRST = sympy.Symbol("j_first", integer=True)
J_LAST = sympy.Symbol("j_last", integer=True)
Q_TILES = sympy.Symbol("n_q_tiles", integer=True, nonnegative=True)
Q_FULL_TILES = sympy.Symbol("n_q_full_tiles", integer=True, nonnegative=True)

# The run of a segment family (``ranges.TileSegment.runs``): the kernel's loop variable.
RUN = sympy.Symbol("run", integer=True, nonnegative=True)

# What each symbol is called inside the generated kernel.
TRITON_NAMES = {M: "pid_m", BLOCK_M: "BLOCK_M", BLOCK_N: "BLOCK_N", Q_LEN: "q_len",
                KV_LEN: "kv_len", P_FIRST: "p_first", P_LAST: "p_last", KV_TILES: "n_kv_tiles",
                KV_FULL_TILES: "n_kv_full_tiles", N: "pid_n", J_FIRST: "j_first",
                J_LAST: "j_last", Q_TILES: "n_q_tiles", Q_FULL_TILES: "n_q_full_tiles",
                RUN: "run"}


class FloorDiv(sympy.Function):
    """``floor(a / b)`` for integers, kept as one node so printing stays integer-only."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) // int(b))
        if b == 1 or a == 0:
            return a
        return None


def ceil_div(a, b):
    return FloorDiv(a + b - 1, b)


DERIVED = {
    P_FIRST: M * BLOCK_M + KV_LEN - Q_LEN,
    P_LAST: sympy.Min(M * BLOCK_M + BLOCK_M, Q_LEN) - 1 + KV_LEN - Q_LEN,
    KV_TILES: ceil_div(KV_LEN, BLOCK_N),
    KV_FULL_TILES: FloorDiv(KV_LEN, BLOCK_N),
    J_FIRST: N * BLOCK_N,
    J_LAST: sympy.Min(N * BLOCK_N + BLOCK_N, KV_LEN) - 1,
    Q_TILES: ceil_div(Q_LEN, BLOCK_M),
    Q_FULL_TILES: FloorDiv(Q_LEN, BLOCK_M),
}


def clamp(x, lo, hi):
    return sympy.Min(sympy.Max(x, lo), hi)


# ----------------------------------------------------------------------------- evaluate


def _is_power(expr) -> bool:
    """A product of equal factors: sympy folds ``x * x`` into ``x**2`` (N-D bounds multiply
    equal 0/1 switches when two dimensions have the same extent)."""
    return isinstance(expr, sympy.Pow) and expr.exp.is_Integer and int(expr.exp) >= 1


def evaluate(expr, env: dict) -> np.ndarray:
    """Evaluate ``expr`` with numpy int64 semantics (floor division), broadcasting ``env``.

    Named intermediates missing from ``env`` are computed from ``DERIVED``.
    """
    if expr in DERIVED and expr not in env:
        env[expr] = evaluate(DERIVED[expr], env)
    if expr in env:
        return np.asarray(env[expr], dtype=np.int64)
    if expr.is_Integer:
        return np.asarray(int(expr), dtype=np.int64)
    args = [evaluate(a, env) for a in expr.args]
    if isinstance(expr, sympy.Add):
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if isinstance(expr, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if isinstance(expr, sympy.Min):
        return np.minimum.reduce(np.broadcast_arrays(*args))
    if isinstance(expr, sympy.Max):
        return np.maximum.reduce(np.broadcast_arrays(*args))
    if isinstance(expr, FloorDiv):
        return np.floor_divide(args[0], args[1])
    if _is_power(expr):
        return args[0] ** int(expr.exp)
    raise TypeError(f"cannot evaluate {type(expr).__name__} in a tile bound: {expr}")


# ----------------------------------------------------------------------------- print


def to_triton(expr, names: dict | None = None) -> str:
    """Print ``expr`` as a Triton scalar expression (integer arithmetic only)."""
    names = TRITON_NAMES if names is None else names
    if expr in names:
        return names[expr]
    if expr.is_Integer:
        return str(int(expr))
    args = [to_triton(a, names) for a in expr.args]
    if isinstance(expr, sympy.Add):
        # put the negative terms last so the text reads as a - b
        return "(" + " + ".join(args).replace("+ -", "- ") + ")"
    if isinstance(expr, sympy.Mul):
        return "(" + " * ".join(args) + ")"
    if isinstance(expr, (sympy.Min, sympy.Max)):
        fn = "tl.minimum" if isinstance(expr, sympy.Min) else "tl.maximum"
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out
    if isinstance(expr, FloorDiv):
        return f"_floordiv({args[0]}, {args[1]})"
    if _is_power(expr):
        return "(" + " * ".join([args[0]] * int(expr.exp)) + ")"
    raise TypeError(f"cannot print {type(expr).__name__} as Triton: {expr}")


class SympyOps:
    """Integer operations on sympy expressions, for rules written once over an ``ops``
    namespace (``sparseforge.ir.neighborhood``): their tile bounds come out closed-form."""

    @staticmethod
    def fdiv(a, b):
        return FloorDiv(sympy.sympify(a), sympy.sympify(b))

    # evaluate=False: sympy's Min/Max simplification compares its arguments through the
    # assumptions system, which takes seconds on the nested bounds of N-D layouts

    @staticmethod
    def min(a, b):
        return sympy.Min(a, b, evaluate=False)

    @staticmethod
    def max(a, b):
        return sympy.Max(a, b, evaluate=False)


def gt0(x):
    """1 if the integer ``x`` is > 0, else 0, as Min/Max arithmetic (unevaluated, see
    ``SympyOps``): how bounds switch a range on or off without a branch."""
    return SympyOps.min(1, SympyOps.max(0, x))
