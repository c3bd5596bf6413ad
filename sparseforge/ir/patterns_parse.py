"""Parse a pattern expression typed on the command line, safely (no eval).

Only the static constructors, integer literals, keyword arguments, ``|`` and ``&`` are
accepted; anything else is a ValueError naming what was found.
"""

from __future__ import annotations

import ast

from . import nodes

CONSTRUCTORS = {name: getattr(nodes, name) for name in (
    "full", "causal", "window", "sliding_window", "sinks", "global_queries", "chunks",
    "prefix_lm")}


def parse_pattern(text: str) -> nodes.Pattern:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"pattern {text!r}: not an expression ({exc.msg})") from None
    return _build(tree.body, text)


def _build(node, text):
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
        a, b = _build(node.left, text), _build(node.right, text)
        return a | b if isinstance(node.op, ast.BitOr) else a & b
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fn = CONSTRUCTORS.get(node.func.id)
        if fn is None:
            raise ValueError(f"pattern {text!r}: unknown constructor {node.func.id!r}; "
                             f"expected one of {', '.join(CONSTRUCTORS)}")
        args = [_int(a, text) for a in node.args]
        kwargs = {kw.arg: _int(kw.value, text) for kw in node.keywords}
        return fn(*args, **kwargs)
    raise ValueError(f"pattern {text!r}: unsupported syntax {ast.dump(node)[:40]}")


def _int(node, text):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    raise ValueError(f"pattern {text!r}: arguments must be integer literals")
