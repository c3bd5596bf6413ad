"""Parse a pattern expression typed on the command line, safely (no eval).

Only the static constructors, integer literals (negative ones too), keyword arguments,
patterns as arguments (``top_left(causal())``), ``|`` and ``&`` are accepted; anything
else is a ValueError naming what was found.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache

from . import affine, neighborhood, nodes, scores

CONSTRUCTORS = {name: getattr(nodes, name) for name in (
    "full", "causal", "window", "sliding_window", "sinks", "global_queries", "chunks",
    "prefix_lm")}
CONSTRUCTORS.update({name: getattr(neighborhood, name) for name in (
    "neighborhood", "maxvit_block", "maxvit_grid", "swin_window", "halo_blocks")})
CONSTRUCTORS.update(affine=affine.affine, top_left=affine.top_left)


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
    if isinstance(node, (ast.Call, ast.BinOp)):  # a pattern argument: top_left(causal())
        return _build(node, text)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_int(node.operand, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Tuple):  # per-dimension values of a neighbourhood
        return tuple(_int(e, text) for e in node.elts)
    raise ValueError(f"pattern {text!r}: arguments must be integer literals (or tuples of them)")


# --------------------------------------------------------------- reprs, with tensors

_PLACEHOLDER = re.compile(r"<(ids|kv_ids|mask|slopes|table|bias)( [0-9x]*)?>")


@lru_cache(maxsize=256)
def _repr_tree(text: str) -> ast.expr:
    try:
        return ast.parse(_PLACEHOLDER.sub("_tensor", text), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"pattern repr {text!r}: not an expression ({exc.msg})") from None


def placeholder_kinds(text: str) -> list[str]:
    """What each tensor of a pattern repr is, in order: ids, kv_ids, mask, slopes, table or
    bias."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(text)]


def parse_repr(text: str, tensors: list) -> nodes.Pattern:
    """The pattern whose ``repr`` is ``text``, with its ``<ids ...>``/``<slopes ...>``/
    ``<table ...>`` placeholders filled by ``tensors`` in order (``pattern_tensors``
    order). How the torch.compile custom op rebuilds a call's pattern from a string key
    that dynamo traced, with no side table."""
    it = iter(tensors)
    built = _build_repr(_repr_tree(text), text, it)
    if next(it, None) is not None:
        raise ValueError(f"pattern repr {text!r}: more tensors than placeholders")
    return built


def _build_repr(node, text, tensors):
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
        a, b = _build_repr(node.left, text, tensors), _build_repr(node.right, text, tensors)
        return a | b if isinstance(node.op, ast.BitOr) else a & b
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fn = _REPR_CONSTRUCTORS.get(node.func.id)
        if fn is None:
            raise ValueError(f"pattern repr {text!r}: unknown constructor {node.func.id!r}")
        args = [_repr_value(a, text, tensors) for a in node.args]
        kwargs = {kw.arg: _repr_value(kw.value, text, tensors) for kw in node.keywords}
        return fn(*args, **kwargs)
    raise ValueError(f"pattern repr {text!r}: unsupported syntax {ast.dump(node)[:40]}")


def _repr_value(node, text, tensors):
    if isinstance(node, ast.Name) and node.id == "_tensor":
        value = next(tensors, None)
        if value is None:
            raise ValueError(f"pattern repr {text!r}: fewer tensors than placeholders")
        return value
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_repr_value(node.operand, text, tensors)
    if isinstance(node, ast.List):
        return [_build_repr(e, text, tensors) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_repr_value(e, text, tensors) for e in node.elts)
    if isinstance(node, (ast.BinOp, ast.Call)):
        return _build_repr(node, text, tensors)
    raise ValueError(f"pattern repr {text!r}: unsupported argument {ast.dump(node)[:40]}")


def _repr_constructors() -> dict:
    table = dict(CONSTRUCTORS)
    table.update(empty=nodes.Empty, documents=nodes.documents, mask_table=nodes.mask_table,
                 per_head=nodes.per_head,
                 softcap=scores.softcap, alibi=scores.Alibi, rel_bias=scores.rel_bias,
                 pair_bias=scores.pair_bias, neighborhood_part=neighborhood.NeighborhoodPart)
    return table


_REPR_CONSTRUCTORS = _repr_constructors()
