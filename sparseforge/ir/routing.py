"""Content-dependent (dynamic) pattern nodes: which key blocks a query block reads is
decided at run time from q and k (docs/semantics.md, "Routing").

Each node is structure and validation only; the rules themselves are in
``sparseforge.routing.rules`` (torch) and, as plain loops, in the oracle
(``sparseforge.oracle.routing``). Composition: in
``S & node`` the *candidates* are the key blocks (chunks, columns, diagonals) where the
other, static operands of the (flattened, canonical) intersection allow at least one
pair, and the result is ``S`` and selected; a union adds its static parts whatever was
selected. So ``(sf.causal() & sf.topk_blocks(512, 3, query_block=1)) | (sf.causal() &
sf.chunks(512))`` is MoBA: the top-3 earlier blocks per token plus its own block.

Seed systems: BiFormer (Zhu et al., CVPR 2023) and MoBA (Lu et al. 2025) route by pooled
block top-k; NSA's selection branch (Yuan et al. 2025) likewise; DHSA (2025) pools
variable-length chunks scaled by sqrt(len); XAttention / FlexPrefill keep the fewest
blocks reaching a softmax coverage; MInference (Jiang et al. 2024) keeps vertical
columns and slash diagonals estimated from the last queries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from .nodes import Pattern, check_int, walk

SHARES = ("head", "group", "all")
POOLS = ("mean", "max")


class DynamicPattern(Pattern):
    """Base of the routing nodes: their pairs depend on the tensors of the call."""

    kind = ""


class _HoldsTensors(DynamicPattern):
    """Identity equality for routing nodes holding run-time tensors (as ``documents``
    has): the fields named in ``_tensors`` compare by identity, the others by value."""

    _tensors: tuple[str, ...] = ()

    def _identity(self) -> tuple:
        return tuple(id(getattr(self, f.name)) if f.name in self._tensors else getattr(self, f.name)
                     for f in dataclasses.fields(self))

    def __hash__(self) -> int:
        return hash((type(self), self._identity()))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._identity() == self._identity()


class _BlockRouting(DynamicPattern):
    """Routing over fixed-size key blocks and query blocks."""

    @property
    def q_block(self) -> int:
        """Query bucket size: ``query_block``, by default the key ``block``."""
        return self.block if self.query_block is None else self.query_block


def _keywords(*entries) -> str:
    """``, name=value`` for each (name, value, default) that differs from its default."""
    return "".join(f", {name}={value!r}" for name, value, default in entries if value != default)


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}({name}={value!r}): expected one of {', '.join(choices)}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}({name}={value!r}): expected a bool")


@dataclass(frozen=True)
class TopkBlocks(_BlockRouting):
    """Top-k key blocks of ``block`` tokens per query block of ``query_block`` tokens, by
    the dot product of pooled q and pooled k (summed over the heads sharing a decision)."""

    block: int
    k: int
    query_block: int | None = None
    pool: str = "mean"
    scale_by_sqrt_len: bool = False
    share: str = "head"
    kind = "topk_blocks"

    def __post_init__(self) -> None:
        owner = "topk_blocks"
        check_int(owner, "block", self.block, 1)
        check_int(owner, "k", self.k, 1)
        if self.query_block is not None:
            check_int(owner, "query_block", self.query_block, 1)
        _check_choice(owner, "pool", self.pool, POOLS)
        _check_bool(owner, "scale_by_sqrt_len", self.scale_by_sqrt_len)
        _check_choice(owner, "share", self.share, SHARES)

    def __repr__(self) -> str:
        extra = _keywords(("query_block", self.query_block, None), ("pool", self.pool, "mean"),
                          ("scale_by_sqrt_len", self.scale_by_sqrt_len, False),
                          ("share", self.share, "head"))
        return f"topk_blocks({self.block}, {self.k}{extra})"


@dataclass(frozen=True, eq=False)
class TopkChunks(_HoldsTensors):
    """Top-k variable-length key chunks per query chunk; chunk ``c`` holds positions
    ``[boundaries[c], boundaries[c + 1])`` for keys and queries alike, and its vector is
    its mean times sqrt(its length) (DHSA). Identity equality, like ``documents``: the
    boundaries are run-time data."""

    boundaries: Any
    k: int
    share: str = "head"
    kind = "topk_chunks"
    _tensors = ("boundaries",)

    def __post_init__(self) -> None:
        owner = "topk_chunks"
        check_int(owner, "k", self.k, 1)
        _check_choice(owner, "share", self.share, SHARES)
        b = self.boundaries
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{owner}(boundaries=...): expected an integer torch.Tensor, "
                            f"got {type(b).__name__}")
        if b.dtype.is_floating_point or b.dtype == torch.bool or b.is_complex():
            raise TypeError(f"{owner}(boundaries=...): expected an integer dtype, got {b.dtype}")
        if b.dim() not in (1, 2) or b.shape[-1] < 2:
            raise ValueError(f"{owner}(boundaries=...): expected shape [C + 1] or [B, C + 1] "
                             f"with C >= 1 chunks, got {tuple(b.shape)}")

    @property
    def chunks(self) -> int:
        return self.boundaries.shape[-1] - 1

    def __repr__(self) -> str:
        share = "" if self.share == "head" else f", share={self.share!r}"
        shape = "x".join(str(s) for s in self.boundaries.shape)
        return f"topk_chunks(<boundaries {shape}>, {self.k}{share})"


@dataclass(frozen=True)
class ThresholdBlocks(_BlockRouting):
    """The fewest key blocks whose softmax-normalised pooled scores reach ``coverage``."""

    block: int
    coverage: float
    query_block: int | None = None
    share: str = "head"
    kind = "threshold_blocks"

    def __post_init__(self) -> None:
        owner = "threshold_blocks"
        check_int(owner, "block", self.block, 1)
        if self.query_block is not None:
            check_int(owner, "query_block", self.query_block, 1)
        if isinstance(self.coverage, bool) or not isinstance(self.coverage, (int, float)):
            raise TypeError(f"{owner}(coverage={self.coverage!r}): expected a float")
        if not (math.isfinite(self.coverage) and 0.0 < self.coverage <= 1.0):
            raise ValueError(f"{owner}(coverage={self.coverage!r}): expected a value in (0, 1]")
        object.__setattr__(self, "coverage", float(self.coverage))
        _check_choice(owner, "share", self.share, SHARES)

    def __repr__(self) -> str:
        extra = _keywords(("query_block", self.query_block, None), ("share", self.share, "head"))
        return f"threshold_blocks({self.block}, {self.coverage!r}{extra})"


@dataclass(frozen=True)
class VerticalSlash(DynamicPattern):
    """The ``n_vertical`` key columns and ``n_slash`` diagonals (offsets ``p - j``) with
    the most attention mass from the last ``last_q`` queries, per head."""

    n_vertical: int
    n_slash: int
    last_q: int = 64
    kind = "vertical_slash"

    def __post_init__(self) -> None:
        owner = "vertical_slash"
        check_int(owner, "n_vertical", self.n_vertical, 0)
        check_int(owner, "n_slash", self.n_slash, 0)
        check_int(owner, "last_q", self.last_q, 1)
        if self.n_vertical + self.n_slash == 0:
            raise ValueError(f"{owner}(n_vertical=0, n_slash=0): keeps nothing; expected at "
                             "least one column or diagonal")

    def __repr__(self) -> str:
        last = "" if self.last_q == 64 else f", last_q={self.last_q}"
        return f"vertical_slash({self.n_vertical}, {self.n_slash}{last})"


@dataclass(frozen=True, eq=False)
class TopkKeys(_HoldsTensors, _BlockRouting):
    """DMA: per query head, the ``k`` keys with the largest per-key ``bias`` among those
    the static part allows some row of the query block (``query_block`` rows); the bias
    is added to every score of the pattern (a per-key additive modifier). Identity
    equality: the bias is run-time data."""

    bias: Any
    k: int
    query_block: int = 64
    kind = "topk_keys"
    block = 1  # key buckets are single keys
    share = "head"
    _tensors = ("bias",)

    def __post_init__(self) -> None:
        owner = "topk_keys"
        check_int(owner, "k", self.k, 1)
        check_int(owner, "query_block", self.query_block, 1)
        b = self.bias
        if not isinstance(b, torch.Tensor) or not b.dtype.is_floating_point:
            raise TypeError(f"{owner}(bias=...): expected a float torch.Tensor [Hq, Lkv] or "
                            f"[B, Hq, Lkv], got {type(b).__name__}")
        if b.dim() not in (2, 3):
            raise ValueError(f"{owner}(bias=...): expected shape [Hq, Lkv] or [B, Hq, Lkv], got "
                             f"{tuple(b.shape)}")

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.bias.shape)
        extra = _keywords(("query_block", self.query_block, 64))
        return f"topk_keys(<bias {shape}>, {self.k}{extra})"


@dataclass(frozen=True)
class Hierarchical(_BlockRouting):
    """HiP's tree search per query block: start from ``k`` equal branches over the
    candidate key blocks, split every branch in two, score each child by its
    representative key (the middle key of its range) against the query block (max over
    the block's queries, per head), keep the top ``k`` children (ties: lower block), and
    repeat until every branch is one key block wide. O(k log L) scores per query block."""

    k: int
    block: int
    query_block: int | None = None
    kind = "hierarchical"
    share = "head"

    def __post_init__(self) -> None:
        owner = "hierarchical"
        check_int(owner, "k", self.k, 1)
        check_int(owner, "block", self.block, 1)
        if self.query_block is not None:
            check_int(owner, "query_block", self.query_block, 1)

    def __repr__(self) -> str:
        extra = _keywords(("query_block", self.query_block, None))
        return f"hierarchical({self.k}, {self.block}{extra})"


@dataclass(frozen=True, eq=False)
class Clusters(_HoldsTensors):
    """Routing Transformer: unit-normalised queries and keys each go to the centroid
    (``[Hkv or 1, C, D]``) with the largest dot product (ties: lower centroid); a pair
    interacts iff both went to the same one. ``balanced=w``: each centroid instead takes
    its ``w`` nearest queries and its ``w`` nearest keys (equal-size clusters; a token may
    sit in several or none), and a pair interacts iff they share a cluster. Identity
    equality: the centroids are run-time data."""

    centroids: Any
    balanced: int | None = None
    kind = "clusters"
    _tensors = ("centroids",)

    def __post_init__(self) -> None:
        owner = "clusters"
        c = self.centroids
        if not isinstance(c, torch.Tensor) or not c.dtype.is_floating_point:
            raise TypeError(f"{owner}(centroids=...): expected a float torch.Tensor "
                            f"[Hkv or 1, C, D], got {type(c).__name__}")
        if c.dim() != 3 or c.shape[1] < 1:
            raise ValueError(f"{owner}(centroids=...): expected shape [Hkv or 1, C, D] with C >= 1, "
                             f"got {tuple(c.shape)}")
        if self.balanced is not None:
            check_int(owner, "balanced", self.balanced, 1)

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.centroids.shape)
        extra = _keywords(("balanced", self.balanced, None))
        return f"clusters(<centroids {shape}>{extra})"


def is_dynamic(pattern: Pattern) -> bool:
    return any(isinstance(n, DynamicPattern) for n in walk(pattern))


# ---------------------------------------------------------------- public constructors


def topk_blocks(block: int, k: int, *, query_block: int | None = None, pool: str = "mean",
                scale_by_sqrt_len: bool = False, share: str = "head") -> Pattern:
    """Per query block, the ``k`` key blocks with the largest pooled dot product (ties:
    lower index) among the candidates; ``query_block=1`` routes every token (MoBA).
    ``share``: one decision per query head, per GQA group, or for all heads (BiFormer,
    DHSA), scored by the sum of the member heads' dot products."""
    return TopkBlocks(block, k, query_block, pool, scale_by_sqrt_len, share)


def topk_chunks(boundaries, k: int, *, share: str = "head") -> Pattern:
    """Like ``topk_blocks`` over variable-length chunks ``[boundaries[c],
    boundaries[c + 1])`` (``[C + 1]`` or ``[B, C + 1]``, from 0 to Lkv), chunk vectors =
    mean * sqrt(len), as in DHSA."""
    return TopkChunks(boundaries, k, share)


def threshold_blocks(block: int, coverage: float, *, query_block: int | None = None,
                     share: str = "head") -> Pattern:
    """The fewest candidate key blocks whose softmax over pooled scores sums to at least
    ``coverage`` (XAttention, FlexPrefill)."""
    return ThresholdBlocks(block, coverage, query_block, share)


def topk_keys(bias, k: int, *, query_block: int = 64) -> Pattern:
    """DMA's learned per-key top-k: per query head and query block of ``query_block`` rows,
    the ``k`` allowed keys with the largest ``bias`` (``[Hq, Lkv]`` or ``[B, Hq, Lkv]``,
    ties to the lower index); the bias is also added to the scores."""
    return TopkKeys(bias, k, query_block)


def hierarchical(k: int, block: int, *, query_block: int | None = None) -> Pattern:
    """HiP's hierarchically pruned attention: per query block (``query_block`` rows,
    default ``block``), ``k`` key blocks of ``block`` tokens found by a binary tree search
    over the candidate blocks (split, score the children's middle keys, keep the top k).
    Add the window and sinks HiP always keeps with ``|``."""
    return Hierarchical(k, block, query_block)


def clusters(centroids, *, balanced: int | None = None) -> Pattern:
    """Routing Transformer's content clusters: a pair interacts iff the query and the key
    (unit-normalised) go to the same centroid of ``centroids`` ``[Hkv or 1, C, D]``;
    ``balanced=w`` gives every centroid its ``w`` nearest queries and keys instead.
    Compose with ``sf.causal()`` for causality by original position."""
    return Clusters(centroids, balanced)


def vertical_slash(n_vertical: int, n_slash: int, last_q: int = 64) -> Pattern:
    """MInference's vertical-slash pattern: the top key columns and top diagonals
    estimated from the attention of the last ``last_q`` queries."""
    return VerticalSlash(n_vertical, n_slash, last_q)
