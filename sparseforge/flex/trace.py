"""Read a FlexAttention ``mask_mod`` / ``score_mod`` once, symbolically.

The function is traced the way FlexAttention traces it, with ``make_fx`` on index
tensors, and each ATen op of the graph is turned into sympy: the indices become integer
symbols, arithmetic and comparisons become sympy expressions, ``&``/``|``/``~`` become
``And``/``Or``/``Not``, and a lookup into a captured tensor becomes ``Lookup(k, index...)``
(``k`` numbers the tensor in ``Traced.tables``). Lowering (``flex.lower``) then reads
closed-form patterns off that expression.

Data-dependent Python control flow (``if q_idx > 5:``) cannot be traced: the error names
the line of the user's function. So does an op with no meaning here.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

B, H, Q, KV = sympy.symbols("b h q_idx kv_idx", integer=True)
SCORE = sympy.Symbol("score", real=True)
INDEX_NAMES = {"b": B, "h": H, "q_idx": Q, "kv_idx": KV}


class FlexTraceError(ValueError):
    """A mask_mod or score_mod that cannot be read as closed-form arithmetic."""


class Lookup(sympy.Function):
    """``tables[k][index...]``: the value of captured tensor ``k`` (an integer)."""

    is_integer = True


@dataclass(frozen=True)
class Traced:
    """A traced function: its value as sympy, and the captured tensors its ``Lookup``s
    read (by identity: the user's own tensors)."""

    expr: sympy.Basic
    tables: tuple[torch.Tensor, ...]
    name: str

    def uses(self, symbol: sympy.Symbol) -> bool:
        return symbol in self.expr.free_symbols


def trace_mask_mod(mask_mod) -> Traced:
    """``mask_mod(b, h, q_idx, kv_idx) -> bool`` as a sympy boolean."""
    traced = _trace(mask_mod, ("b", "h", "q_idx", "kv_idx"), "mask_mod")
    expr = traced.expr
    if not _is_bool(expr):
        if not isinstance(expr, sympy.Expr):
            raise FlexTraceError(f"mask_mod {traced.name}: returns {expr}, not a boolean")
        expr = _as_bool(expr)  # a number or a lookup, true where nonzero
    return Traced(expr, traced.tables, traced.name)


def trace_score_mod(score_mod) -> Traced:
    """``score_mod(score, b, h, q_idx, kv_idx) -> score`` as a sympy expression in
    ``SCORE`` and the indices."""
    return _trace(score_mod, ("score", "b", "h", "q_idx", "kv_idx"), "score_mod")


def _describe(fn) -> str:
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"{getattr(fn, '__name__', type(fn).__name__)}{where}"


def _user_line(fn, exc: BaseException) -> str:
    """``file:line: source`` of the deepest frame of ``fn``'s own file in the traceback."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename == code.co_filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}: {f.line}"


def _trace(fn, names: tuple[str, ...], role: str) -> Traced:
    if not callable(fn):
        raise TypeError(f"{role}={type(fn).__name__}: expected a function "
                        f"{role}({', '.join(names)})")
    args = [torch.zeros(1, dtype=torch.float32 if n == "score" else torch.int32)
            for n in names]
    try:
        graph = make_fx(fn, tracing_mode="real")(*args)
    except Exception as exc:  # noqa: BLE001 - any failure to trace is reported the same way
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "data-dependent" in str(exc) or "get value out of a tracing tensor" in str(exc):
            text = ("Python control flow on an index (if/while/and/or/bool()/int() of a "
                    "tensor); write it with torch.where, &, | and ~")
        raise FlexTraceError(f"{role} {_describe(fn)} cannot be traced{_user_line(fn, exc)}: "
                             f"{text}") from exc
    return _Converter(graph, names, role, _describe(fn)).run()


class _Converter:
    """Walks the traced graph, giving each node a sympy value."""

    def __init__(self, graph, names, role: str, name: str):
        self.graph, self.names, self.role, self.name = graph, names, role, name
        self.tables: list[torch.Tensor] = []

    def fail(self, node, why: str):
        raise FlexTraceError(f"{self.role} {self.name}: {why} (traced op {node.target})")

    def run(self) -> Traced:
        env: dict = {}
        placeholders = iter(self.names)
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                name = next(placeholders)
                env[node] = SCORE if name == "score" else INDEX_NAMES[name]
            elif node.op == "get_attr":
                env[node] = self._constant(node, getattr(self.graph, node.target))
            elif node.op == "call_function":
                args = [self._value(a, env) for a in node.args]
                kwargs = {k: self._value(v, env) for k, v in node.kwargs.items()}
                env[node] = self._call(node, args, kwargs)
            elif node.op == "output":
                out = node.args[0]
                out = out[0] if isinstance(out, (tuple, list)) else out
                return Traced(self._value(out, env), tuple(self.tables), self.name)
        raise FlexTraceError(f"{self.role} {self.name}: the traced graph has no output")

    def _value(self, a, env):
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return [self._value(x, env) for x in a]
        if isinstance(a, bool):
            return sympy.true if a else sympy.false
        if isinstance(a, int):
            return sympy.Integer(a)
        if isinstance(a, float):
            return sympy.Float(a)
        return a

    def _constant(self, node, t: torch.Tensor):
        if t.numel() == 1 and t.dim() == 0:  # a captured scalar is read once, here
            return _number(t.item(), t.dtype)
        for k, known in enumerate(self.tables):
            if known is t:
                return _Table(k, t)
        self.tables.append(t)
        return _Table(len(self.tables) - 1, t)

    def _call(self, node, args, kwargs):
        op = getattr(node.target, "overloadpacket", None)
        name = getattr(op, "__name__", str(node.target))
        handler = _OPS.get(name)
        if handler is None:
            self.fail(node, f"{name} has no closed form here")
        try:
            return handler(*args, **kwargs)
        except (TypeError, ValueError, AttributeError) as exc:
            self.fail(node, f"{name} of {[str(a) for a in args]}: {exc}")


@dataclass(frozen=True)
class _Table:
    index: int
    tensor: torch.Tensor


def _number(value, dtype):
    if dtype == torch.bool:
        return sympy.true if value else sympy.false
    return sympy.Integer(int(value)) if not dtype.is_floating_point else sympy.Float(value)


def _is_bool(x) -> bool:
    # a sympy Symbol is a Boolean too (it can stand for a truth value): exclude Exprs
    return isinstance(x, sympy.logic.boolalg.Boolean) and not isinstance(x, sympy.Expr)


def _as_bool(x):
    if _is_bool(x):
        return x
    return sympy.Ne(x, 0)


def _as_number(x):
    if _is_bool(x):
        return sympy.Piecewise((1, x), (0, True))
    return x


def _rel(kind):
    def make(a, b, *_, **__):
        if _is_bool(a) and _is_bool(b) and kind in (sympy.Eq, sympy.Ne):
            same = sympy.Equivalent(a, b)
            return same if kind is sympy.Eq else sympy.Not(same)
        return kind(_as_number(a), _as_number(b))
    return make


def _bool_op(kind):
    def make(a, b, *_, **__):
        return kind(_as_bool(a), _as_bool(b))
    return make


def _add(a, b, *, alpha=1):
    return _as_number(a) + alpha * _as_number(b)


def _sub(a, b, *, alpha=1):
    return _as_number(a) - alpha * _as_number(b)


def _index(table, indices):
    if not isinstance(table, _Table):
        raise TypeError("indexing is supported on captured tensors only")
    if any(i is None for i in indices):
        raise TypeError("slicing a captured tensor; index it with the indices only")
    if len(indices) > table.tensor.dim():
        raise TypeError(f"{len(indices)} indices into a {table.tensor.dim()}-D tensor")
    return Lookup(table.index, *indices)


def _floordiv(a, b, **_):
    return sympy.floor(_as_number(a) / _as_number(b))


def _div(a, b, *, rounding_mode=None):
    if rounding_mode == "floor":
        return _floordiv(a, b)
    if rounding_mode is not None:
        raise ValueError(f"rounding_mode={rounding_mode!r} (only 'floor' has a closed form)")
    return _as_number(a) / _as_number(b)


def _where(cond, a, b):
    cond = _as_bool(cond)
    if _is_bool(a) and _is_bool(b):
        return sympy.Or(sympy.And(cond, a), sympy.And(sympy.Not(cond), b))
    return sympy.Piecewise((_as_number(a), cond), (_as_number(b), True))


def _clamp(x, lo=None, hi=None):
    x = _as_number(x)
    if lo is not None:
        x = sympy.Max(x, lo)
    if hi is not None:
        x = sympy.Min(x, hi)
    return x


def _convert(x, *_, dtype=None, **__):
    if dtype == torch.bool:
        return _as_bool(x)
    if dtype is not None and not dtype.is_floating_point and dtype != torch.bool:
        return _as_number(x)
    return x


def _filled(value, dtype=None):
    if dtype == torch.bool:
        return sympy.true if value else sympy.false
    return value if isinstance(value, sympy.Basic) else sympy.sympify(value)


def _same(x, *_, **__):
    return x


_OPS = {
    "ge": _rel(sympy.Ge), "gt": _rel(sympy.Gt), "le": _rel(sympy.Le), "lt": _rel(sympy.Lt),
    "eq": _rel(sympy.Eq), "ne": _rel(sympy.Ne),
    "bitwise_and": _bool_op(sympy.And), "logical_and": _bool_op(sympy.And),
    "bitwise_or": _bool_op(sympy.Or), "logical_or": _bool_op(sympy.Or),
    "bitwise_xor": _bool_op(sympy.Xor), "logical_xor": _bool_op(sympy.Xor),
    "bitwise_not": lambda a: sympy.Not(_as_bool(a)),
    "logical_not": lambda a: sympy.Not(_as_bool(a)),
    "add": _add, "sub": _sub, "rsub": lambda a, b, *, alpha=1: _sub(b, a, alpha=alpha),
    "mul": lambda a, b: _as_number(a) * _as_number(b),
    "neg": lambda a: -_as_number(a), "abs": lambda a: sympy.Abs(_as_number(a)),
    "floor_divide": _floordiv, "div": _div,
    "remainder": lambda a, b: sympy.Mod(_as_number(a), _as_number(b)),
    "minimum": lambda a, b: sympy.Min(a, b), "maximum": lambda a, b: sympy.Max(a, b),
    "clamp": _clamp, "clamp_min": lambda x, lo: _clamp(x, lo), "clamp_max": lambda x, hi: _clamp(x, None, hi),
    "where": _where, "index": _index, "tanh": lambda a: sympy.tanh(a),
    "_to_copy": _convert, "to": _convert, "lift_fresh_copy": _same, "clone": _same,
    "alias": _same, "detach": _same, "view": _same, "expand": _same, "reshape": _same,
    "squeeze": _same, "unsqueeze": _same, "_unsafe_view": _same,
    "scalar_tensor": lambda v, **kw: _filled(v, kw.get("dtype")),
    "full": lambda size, v, **kw: _filled(v, kw.get("dtype")),
    "full_like": lambda x, v, **kw: _filled(v, kw.get("dtype")),
    "ones_like": lambda x, **kw: _filled(1, kw.get("dtype")),
    "zeros_like": lambda x, **kw: _filled(0, kw.get("dtype")),
    "new_ones": lambda x, size, **kw: _filled(1, kw.get("dtype")),
    "new_zeros": lambda x, size, **kw: _filled(0, kw.get("dtype")),
    "new_full": lambda x, size, v, **kw: _filled(v, kw.get("dtype")),
    "ones": lambda size, **kw: _filled(1, kw.get("dtype")),
    "zeros": lambda size, **kw: _filled(0, kw.get("dtype")),
}
