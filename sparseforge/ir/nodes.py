"""Pattern IR: frozen dataclasses that say which (query, key) pairs may interact.

Every node is plain immutable data with a readable ``repr`` that is also the Python
expression that builds it, so a canonicalised pattern prints as something a user can
paste back. Semantics (docs/semantics.md) live in ``sparseforge.semantics``; this module
only holds structure and validation.

Positions: query ``i`` in [0, Lq), key ``j`` in [0, Lkv); the query's absolute position
is ``p = i + (Lkv - Lq)`` (bottom-right alignment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}({name}={value!r}): {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be >= {minimum}")


class Pattern:
    """Base of every pattern node; ``|`` is union and ``&`` is intersection."""

    def __or__(self, other: Pattern) -> Pattern:
        _check_pattern("|", other)
        return Union((self, other))

    def __and__(self, other: Pattern) -> Pattern:
        _check_pattern("&", other)
        return Intersection((self, other))

    @property
    def children(self) -> tuple[Pattern, ...]:
        return ()


def _check_pattern(op: str, other: Any) -> None:
    if not isinstance(other, Pattern):
        raise TypeError(
            f"pattern {op} {type(other).__name__}: both operands must be sparseforge patterns"
        )


@dataclass(frozen=True)
class Full(Pattern):
    def __repr__(self) -> str:
        return "full()"


@dataclass(frozen=True)
class Empty(Pattern):
    """No pair interacts. Only produced by canonicalisation (e.g. ``sinks(0)``)."""

    def __repr__(self) -> str:
        return "empty()"


@dataclass(frozen=True)
class Causal(Pattern):
    def __repr__(self) -> str:
        return "causal()"


@dataclass(frozen=True)
class Window(Pattern):
    """``(j - p) % dilation == 0`` and ``-left <= (j - p) / dilation <= right``."""

    left: int
    right: int
    dilation: int = 1

    def __post_init__(self) -> None:
        check_int("window", "left", self.left, 0)
        check_int("window", "right", self.right, 0)
        check_int("window", "dilation", self.dilation, 1)

    def __repr__(self) -> str:
        dil = f", dilation={self.dilation}" if self.dilation != 1 else ""
        return f"window(left={self.left}, right={self.right}{dil})"


@dataclass(frozen=True)
class Sinks(Pattern):
    """Keys ``j < n`` are seen by every query."""

    n: int

    def __post_init__(self) -> None:
        check_int("sinks", "n", self.n, 0)

    def __repr__(self) -> str:
        return f"sinks({self.n})"


@dataclass(frozen=True)
class GlobalQueries(Pattern):
    """Queries with ``p < n`` see every key."""

    n: int

    def __post_init__(self) -> None:
        check_int("global_queries", "n", self.n, 0)

    def __repr__(self) -> str:
        return f"global_queries({self.n})"


@dataclass(frozen=True)
class Chunks(Pattern):
    """Block-diagonal: ``p // size == j // size``."""

    size: int

    def __post_init__(self) -> None:
        check_int("chunks", "size", self.size, 1)

    def __repr__(self) -> str:
        return f"chunks({self.size})"


@dataclass(frozen=True, eq=False)
class Documents(Pattern):
    """Packed sequences: ``ids_q[i] == ids_k[j]``.

    ``ids`` is a per-key integer tensor ``[Lkv]`` or ``[B, Lkv]``; the query at row ``i``
    takes the id at its absolute position ``p``. Pass ``kv_ids`` to give query ids
    (``ids``, ``[.., Lq]``) and key ids separately. Identity (not value) equality: two
    ``documents`` nodes are the same node only if they hold the same tensors.
    """

    ids: Any
    kv_ids: Any = None

    def __post_init__(self) -> None:
        for name, t in (("ids", self.ids), ("kv_ids", self.kv_ids)):
            if t is None and name == "kv_ids":
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"documents({name}=...): expected an integer torch.Tensor, "
                                f"got {type(t).__name__}")
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"documents({name}=...): expected an integer dtype, got {t.dtype}")
            if t.dim() not in (1, 2):
                raise ValueError(f"documents({name}=...): expected shape [L] or [B, L], "
                                 f"got {tuple(t.shape)}")

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.ids.shape)
        return f"documents(<ids {shape}>)" if self.kv_ids is None else f"documents(<ids {shape}>, <kv_ids>)"

    def __hash__(self) -> int:
        return hash((id(self.ids), id(self.kv_ids)))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Documents) and other.ids is self.ids
                and other.kv_ids is self.kv_ids)


@dataclass(frozen=True, eq=False)
class MaskTable(Pattern):
    """``mask[i, j]``: any boolean mask, given as a tensor ``[Lq, Lkv]`` or ``[B, Lq, Lkv]``
    (tree masks of speculative decoding, masks with no closed form). Indexed by the query
    row, like ``documents`` with ``kv_ids``, so its alignment is its own. Identity (not
    value) equality, like ``documents``."""

    mask: Any

    def __post_init__(self) -> None:
        if not isinstance(self.mask, torch.Tensor):
            raise TypeError(f"mask_table(mask=...): expected a bool torch.Tensor, "
                            f"got {type(self.mask).__name__}")
        if self.mask.dtype != torch.bool:
            raise TypeError(f"mask_table(mask=...): expected dtype torch.bool, got {self.mask.dtype}")
        if self.mask.dim() not in (2, 3):
            raise ValueError(f"mask_table(mask=...): expected shape [Lq, Lkv] or [B, Lq, Lkv], "
                             f"got {tuple(self.mask.shape)}")

    def __repr__(self) -> str:
        return f"mask_table(<mask {'x'.join(str(s) for s in self.mask.shape)}>)"

    def __hash__(self) -> int:
        return hash(id(self.mask))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskTable) and other.mask is self.mask

    def table(self, q_len: int, kv_len: int) -> torch.Tensor:
        """The bool table of a call with these lengths."""
        return self.mask


#: evaluated tables of ``EvaluatedMask`` nodes by (node id, lengths); a value holds its
#: node, so the id stays unique while cached
_evaluated: dict = {}


@dataclass(frozen=True, eq=False)
class EvaluatedMask(MaskTable):
    """A FlexAttention ``mask_mod`` with no closed form (``from_mask_mod(...,
    fallback="blocks")``), evaluated once per (Lq, Lkv) over the whole grid by Flex's own
    ``create_mask`` (O(Lq * Lkv) time and memory, like Flex's ``create_block_mask``) and
    then run as a ``mask_table``. ``head``: the h it is evaluated at; ``batch``: how many
    batch rows to evaluate (None: one, shared)."""

    mask: Any = None
    mask_mod: Any = None
    head: int = 0
    batch: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.mask_mod):
            raise TypeError(f"EvaluatedMask(mask_mod={type(self.mask_mod).__name__}): expected "
                            "a function mask_mod(b, h, q_idx, kv_idx)")

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", "mask_mod")
        return f"mask_table(<mask_mod {name} h{self.head} at {id(self.mask_mod):#x}>)"

    def __hash__(self) -> int:
        return hash((id(self.mask_mod), self.head, self.batch))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, EvaluatedMask) and other.mask_mod is self.mask_mod
                and (other.head, other.batch) == (self.head, self.batch))

    def table(self, q_len: int, kv_len: int) -> torch.Tensor:
        key = (id(self), q_len, kv_len)
        hit = _evaluated.get(key)
        if hit is None:
            # FlexAttention's module loads its compiler stack: only this fallback needs it
            from torch.nn.attention.flex_attention import create_mask

            def at_head(b, h, q_idx, kv_idx):
                return self.mask_mod(b, h * 0 + self.head, q_idx, kv_idx)

            mask = create_mask(at_head, self.batch or 1, 1, q_len, kv_len, device="cpu")[:, 0]
            if len(_evaluated) > 64:
                _evaluated.clear()
            hit = _evaluated[key] = (self, mask if self.batch else mask[0])
        return hit[1]

class ScoreModifier(Pattern):
    """Base of the score modifiers (``sparseforge.ir.scores``): they change the scores of
    allowed pairs, never which pairs interact, so as a mask each one allows every pair.
    They combine with a pattern by ``&`` only (``sf.causal() & sf.softcap(30.0)``)."""


def _check_no_modifier(op: str, parts) -> None:
    for p in parts:
        if any(isinstance(n, ScoreModifier) for n in walk(p)):
            raise TypeError(f"a score modifier inside {op!r}: modifiers apply to a whole pattern; "
                            "write (a | b) & sf.softcap(c), not a | (b & sf.softcap(c))")


@dataclass(frozen=True)
class Union(Pattern):
    parts: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        for p in self.parts:
            _check_pattern("|", p)
        _check_no_modifier("|", self.parts)

    @property
    def children(self) -> tuple[Pattern, ...]:
        return self.parts

    def __repr__(self) -> str:
        return "(" + " | ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True)
class Intersection(Pattern):
    parts: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        for p in self.parts:
            _check_pattern("&", p)

    @property
    def children(self) -> tuple[Pattern, ...]:
        return self.parts

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True)
class PerHead(Pattern):
    """One pattern per query head (``len(patterns)`` must equal Hq at call time)."""

    patterns: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        if len(self.patterns) == 0:
            raise ValueError("per_head(patterns=[]): need at least one pattern")
        for p in self.patterns:
            if not isinstance(p, Pattern):
                raise TypeError(f"per_head(patterns=...): every entry must be a pattern, "
                                f"got {type(p).__name__}")
            if isinstance(p, PerHead) or any(isinstance(n, PerHead) for n in walk(p)):
                raise ValueError("per_head(patterns=...): per_head cannot be nested")

    @property
    def children(self) -> tuple[Pattern, ...]:
        return self.patterns

    def __repr__(self) -> str:
        return "per_head([" + ", ".join(map(repr, self.patterns)) + "])"

    def __or__(self, other: Pattern) -> Pattern:
        raise TypeError("per_head(...) | ...: combine patterns (and score modifiers) inside "
                        "per_head, not around it")

    __and__ = __or__


def walk(pattern: Pattern):
    """Yield every node of the expression, parents before children."""
    yield pattern
    for c in pattern.children:
        yield from walk(c)


def document_terms(pattern: Pattern, kind: type = Documents) -> tuple:
    """The distinct ``documents`` nodes (or ``kind``: ``MaskTable``) of a pattern, in walk
    order: the kernels number their id pairs so (``doc_q0/doc_k0``, ...) and their mask
    tables (``tbl0``, ...), and a call's own pattern (the same canonical structure, its
    own tensors) lists its tensors in the same order."""
    seen: dict[int, Pattern] = {}
    for node in walk(pattern):
        if isinstance(node, kind):
            seen.setdefault(id(node), node)
    return tuple(seen.values())


def data_tensors(pattern: Pattern) -> tuple[torch.Tensor, ...]:
    """The tensors deciding which pairs interact (document ids, mask tables), in walk
    order: what a cached tile refinement is checked against."""
    out: list[torch.Tensor] = []
    for node in walk(pattern):
        if isinstance(node, Documents):
            out += [t for t in (node.ids, node.kv_ids) if t is not None]
        elif isinstance(node, MaskTable) and not isinstance(node, EvaluatedMask):
            out.append(node.mask)
    return tuple(out)


# ---------------------------------------------------------------- public constructors


def full() -> Pattern:
    """Every query sees every key (dense attention)."""
    return Full()


def causal() -> Pattern:
    """``j <= p``: autoregressive attention, bottom-right aligned."""
    return Causal()


def window(left: int, right: int, dilation: int = 1) -> Pattern:
    """Keys within ``left`` steps before and ``right`` after the query, every ``dilation``-th."""
    return Window(left, right, dilation)


def sliding_window(size: int) -> Pattern:
    """Causal window of ``size`` keys including the query's own (Mistral, Longformer-causal)."""
    check_int("sliding_window", "size", size, 1)
    return Window(size - 1, 0, 1)


def sinks(n: int) -> Pattern:
    """The first ``n`` keys are visible to every query (StreamingLLM attention sinks)."""
    return Sinks(n)


def global_queries(n: int) -> Pattern:
    """Queries at absolute positions ``< n`` see every key (Longformer/BigBird globals)."""
    return GlobalQueries(n)


def chunks(size: int) -> Pattern:
    """Block-diagonal attention over chunks of ``size`` tokens."""
    return Chunks(size)


def documents(ids: Any, kv_ids: Any = None) -> Pattern:
    """Packed sequences: tokens attend only within their own document id."""
    return Documents(ids, kv_ids)


def mask_table(mask: Any) -> Pattern:
    """Pairs where ``mask[i, j]`` (or ``mask[b, i, j]``) is true: any mask as a tensor."""
    return MaskTable(mask)


def prefix_lm(n: int) -> Pattern:
    """Prefix-LM: causal, plus the first ``n`` keys (the prefix) visible to all."""
    check_int("prefix_lm", "n", n, 0)
    return Union((Causal(), Sinks(n)))


def per_head(patterns: list[Pattern] | tuple[Pattern, ...]) -> Pattern:
    """A different pattern for each query head."""
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(f"per_head(patterns={type(patterns).__name__}): expected a list of patterns")
    return PerHead(tuple(patterns))
