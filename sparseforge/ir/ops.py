"""The ``ops`` namespaces that integer rules are written once against.

A rule such as NATTEN's neighbourhood (``ir.neighborhood``) or a tiled layout's
coordinates (``planner.layout``) is a function of positions and an ``ops`` namespace
(``fdiv``, ``min``, ``max``, ``where``). ``TorchOps`` evaluates it on tensors (the CPU
path and the planner's counts), ``TritonOps`` prints it as kernel text (the codegen
printer), and ``planner.symbolic.SympyOps`` derives closed-form bounds from it, so the
three cannot drift apart.
"""

from __future__ import annotations

import torch


def _pairwise(on_ints, on_tensors, a, b):
    """``on_ints`` of two ints, else ``on_tensors`` with ints made tensors beside the other."""
    if isinstance(a, int) and isinstance(b, int):
        return on_ints(a, b)
    device = (a if isinstance(a, torch.Tensor) else b).device
    return on_tensors(torch.as_tensor(a, device=device), torch.as_tensor(b, device=device))


class TorchOps:
    """Integer operations on torch tensors (or ints), for rules written once over an
    ``ops`` namespace (``sparseforge.ir.neighborhood``, ``planner.layout``)."""

    @staticmethod
    def fdiv(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return a // b
        return torch.div(a, b, rounding_mode="floor")

    @staticmethod
    def min(a, b):
        return _pairwise(min, torch.minimum, a, b)

    @staticmethod
    def max(a, b):
        return _pairwise(max, torch.maximum, a, b)

    @staticmethod
    def where(cond, a, b):
        return torch.where(cond, a, b)


class TritonText:
    """Integer/boolean Triton expression text built by Python operators, so rules written
    once over an ``ops`` namespace (``TritonOps``) print as kernel code. Operands are
    other ``TritonText`` values or ints; nothing else can reach the text."""

    def __init__(self, text: str):
        self.text = text

    @staticmethod
    def of(value) -> TritonText:
        if isinstance(value, TritonText):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"TritonText operand {value!r}: expected an int or TritonText")
        return TritonText(str(value) if value >= 0 else f"({value})")

    def _op(self, op, other, swap=False):
        identity = 1 if op == "*" else 0 if op in "+-" else None  # fold x*1, x+0, x-0
        if type(other) is int and other == identity and not (swap and op == "-"):
            return self
        a, b = (TritonText.of(other), self) if swap else (self, TritonText.of(other))
        return TritonText(f"({a.text} {op} {b.text})")

    def __add__(self, o): return self._op("+", o)  # noqa: E704
    def __radd__(self, o): return self._op("+", o, True)  # noqa: E704
    def __sub__(self, o): return self._op("-", o)  # noqa: E704
    def __rsub__(self, o): return self._op("-", o, True)  # noqa: E704
    def __mul__(self, o): return self._op("*", o)  # noqa: E704
    def __rmul__(self, o): return self._op("*", o, True)  # noqa: E704
    def __lt__(self, o): return self._op("<", o)  # noqa: E704
    def __le__(self, o): return self._op("<=", o)  # noqa: E704
    def __gt__(self, o): return self._op(">", o)  # noqa: E704
    def __ge__(self, o): return self._op(">=", o)  # noqa: E704
    def __eq__(self, o): return self._op("==", o)  # noqa: E704
    def __and__(self, o): return self._op("&", o)  # noqa: E704
    def __rand__(self, o): return self._op("&", o, True)  # noqa: E704
    def __or__(self, o): return self._op("|", o)  # noqa: E704
    __hash__ = None

    def __str__(self) -> str:
        return self.text


class TritonOps:
    """``ops`` namespace printing Triton: floor division through the kernel's
    ``_floordiv`` helper (correct for negative numerators)."""

    @staticmethod
    def fdiv(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return a // b
        if b == 1:
            return a
        return TritonText(f"_floordiv({TritonText.of(a)}, {TritonText.of(b)})")

    @staticmethod
    def min(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return min(a, b)
        return TritonText(f"tl.minimum({TritonText.of(a)}, {TritonText.of(b)})")

    @staticmethod
    def max(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return max(a, b)
        return TritonText(f"tl.maximum({TritonText.of(a)}, {TritonText.of(b)})")

    @staticmethod
    def where(cond, a, b):
        return TritonText(f"tl.where({TritonText.of(cond)}, {TritonText.of(a)}, {TritonText.of(b)})")
