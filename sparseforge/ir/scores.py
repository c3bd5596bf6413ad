"""Score modifiers: change the score of an allowed pair, never which pairs interact.

``s = scale * q.k``, then, in this fixed order (docs/semantics.md):

1. ``alibi(slopes)``: ``s += slopes[h] * (j - p)`` (Press et al. 2022, "Train short,
   test long"; FlexAttention's ALiBi example uses the same sign and offset);
2. ``rel_bias(table)``: ``s += table[h, clamp(j - p, -R, R) + R]`` with ``table`` of shape
   ``[H, 2R + 1]``: a learned bias per relative offset, clipped at distance R beyond
   (Shaw et al. 2018's clipped relative positions). Differentiable in ``table``.
   With an N-D table ``[H, 2R_0 + 1, ..., 2R_n-1 + 1]`` (n = 2 or 3) the offsets are
   window offsets on the grid of the pattern's ``neighborhood``: per dimension, the
   difference of the key's and query's coordinates inside their dilation group, clipped
   to ``+-R_d`` (Swin's and MaxViT's relative-position bias over a window, NATTEN's
   ``rpb``). Forward and q/k/v gradients; the table's own gradient is on the CPU path;
3. ``pair_bias(bias)``: ``s += bias[b, h, i, j]`` with ``i`` the query's row, ``bias``
   broadcastable to ``[B, Hq, Lq, Lkv]``: a bias per pair gathered from a tensor
   (Graphormer's spatial and edge encodings, T5's bias materialised per pair, any Flex
   ``score_mod`` that adds ``bias[b, h, q_idx, kv_idx]``). Differentiable in ``bias``;
4. ``softcap(c)``: ``s = c * tanh(s / c)`` (Gemma 2, Grok-1: logit soft-capping).

``p = i + Lkv - Lq`` is the query's absolute position (bottom-right alignment). A
modifier is a pattern node that allows every pair, joined to a mask by ``&``:
``sf.sliding_window(4096) & sf.softcap(50.0)``. Canonicalisation keeps them as operands
of the top-level intersection (or of a ``per_head`` entry), which is the only place
they may appear; kernels are specialised on which modifiers are present (``ScoreSpec``)
and read the slopes, table and cap as run-time arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .neighborhood import Neighborhood, NeighborhoodPart, grid_coordinate
from .nodes import Documents, Full, Intersection, MaskTable, Pattern, ScoreModifier, walk

#: widest rel_bias table (2R + 1 entries) the kernels accept (a radius of 64k tokens)
MAX_REL_BIAS_WIDTH = 2 ** 17 + 1
#: widest table whose gradient the dK/dV kernel sums in registers (one accumulator per
#: entry); wider ones are summed in the program's own row of the gradient buffer
REGISTER_REL_BIAS_WIDTH = 1025


def _check_float_tensor(owner: str, name: str, t: Any, dims: int, shape_text: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}({name}=...): expected a floating-point torch.Tensor, "
                        f"got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{owner}({name}=...): expected a floating-point dtype, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{owner}({name}=...): expected shape {shape_text}, got {tuple(t.shape)}")


@dataclass(frozen=True)
class Softcap(ScoreModifier):
    """``s = cap * tanh(s / cap)`` on the scaled score."""

    cap: float

    def __post_init__(self) -> None:
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, float)):
            raise TypeError(f"softcap(cap={self.cap!r}): expected a float")
        if not (math.isfinite(self.cap) and self.cap > 0):
            raise ValueError(f"softcap(cap={self.cap!r}): expected a finite value > 0")
        object.__setattr__(self, "cap", float(self.cap))

    def __repr__(self) -> str:
        return f"softcap({self.cap!r})"


class _TensorModifier(ScoreModifier):
    """Identity equality, like ``documents``: the tensor is run-time data, so two nodes
    are the same node only if they hold the same tensor; the plan key (``repr``) holds
    only its shape."""

    tensor_name = ""

    def __hash__(self) -> int:
        return hash((type(self), id(getattr(self, self.tensor_name))))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (getattr(other, self.tensor_name)
                                              is getattr(self, self.tensor_name))

    def __repr__(self) -> str:
        t = getattr(self, self.tensor_name)
        return f"{self.kind}(<{self.tensor_name} {'x'.join(str(s) for s in t.shape)}>)"


@dataclass(frozen=True, eq=False, repr=False)
class Alibi(_TensorModifier):
    """``s += slopes[h] * (j - p + offset)``; ``slopes`` is ``[Hq]`` (one per query head).
    ``offset`` is 0 from ``alibi``; context parallelism sets it on a part of the sequence
    (``distributed/parts.py``), whose own ``j - p`` is the whole's less that constant: an
    integer added before the product, so a part's scores are the whole's to the bit.
    Kernels print it as a constant, so it is part of the plan key (``repr``)."""

    slopes: Any
    offset: int = 0
    tensor_name = "slopes"
    kind = "alibi"

    def __post_init__(self) -> None:
        _check_float_tensor("alibi", "slopes", self.slopes, 1, "[Hq]")
        if self.slopes.requires_grad:
            raise ValueError("alibi(slopes=...): slopes are fixed (not trained) here; pass "
                             "slopes.detach()")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int):
            raise TypeError(f"alibi(offset={self.offset!r}): expected an int")

    def __hash__(self) -> int:
        return hash((super().__hash__(), self.offset))

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and other.offset == self.offset

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if not self.offset else f"{text[:-1]}, offset={self.offset})"


@dataclass(frozen=True, eq=False, repr=False)
class RelBias(_TensorModifier):
    """``s += table[h, clamp(j - p, -R, R) + R]``; ``table`` is ``[Hq, 2R + 1]``, or
    ``[Hq, 2R_0 + 1, ..., 2R_n-1 + 1]`` for window offsets on a neighbourhood's grid."""

    table: Any
    tensor_name = "table"
    kind = "rel_bias"

    def __post_init__(self) -> None:
        if isinstance(self.table, torch.Tensor) and self.table.dim() in (3, 4):
            _check_float_tensor("rel_bias", "table", self.table, self.table.dim(),
                                "[Hq, 2R_0 + 1, ..., 2R_n-1 + 1]")
            if any(e % 2 == 0 for e in self.table.shape[1:]):
                raise ValueError(f"rel_bias(table=...): every window extent must be odd "
                                 f"(2R + 1 offsets), got {tuple(self.table.shape[1:])}")
            return
        _check_float_tensor("rel_bias", "table", self.table, 2,
                            "[Hq, 2R + 1] (token offsets) or [Hq, 2R_0 + 1, 2R_1 + 1(, 2R_2 + 1)] "
                            "(window offsets)")
        width = self.table.shape[1]
        if width % 2 == 0 or not 1 <= width <= MAX_REL_BIAS_WIDTH:
            raise ValueError(f"rel_bias(table=...): expected an odd number of offsets 2R + 1 "
                             f"in [1, {MAX_REL_BIAS_WIDTH}], got {width}")

    @property
    def window_dims(self) -> int:
        """Grid dimensions of a window-offset table; 0 for token offsets."""
        return self.table.dim() - 1 if self.table.dim() > 2 else 0

    @property
    def radius(self) -> int:
        """Half the flattened table width: entries are 0 .. 2 * radius."""
        return (self.table[0].numel() - 1) // 2


@dataclass(frozen=True, eq=False, repr=False)
class PairBias(_TensorModifier):
    """``s += bias[b, h, i, j]`` (``i`` the query's row, not its position ``p``); ``bias``
    is ``[Lq, Lkv]``, ``[Hq or 1, Lq, Lkv]`` or ``[B or 1, Hq or 1, Lq, Lkv]``."""

    bias: Any
    tensor_name = "bias"
    kind = "pair_bias"

    def __post_init__(self) -> None:
        dims = self.bias.dim() if isinstance(self.bias, torch.Tensor) else 0
        _check_float_tensor("pair_bias", "bias", self.bias, dims if dims in (2, 3, 4) else 4,
                            "[Lq, Lkv], [Hq or 1, Lq, Lkv] or [B or 1, Hq or 1, Lq, Lkv]")

    @property
    def bias4(self) -> torch.Tensor:
        """The bias as ``[B or 1, Hq or 1, Lq, Lkv]`` (a view)."""
        return self.bias.reshape((1,) * (4 - self.bias.dim()) + tuple(self.bias.shape))

    def check_call(self, batch: int, q_heads: int, q_len: int, kv_len: int) -> None:
        """The bias broadcasts to the call's ``[B, Hq, Lq, Lkv]``."""
        b, h, lq, lk = self.bias4.shape
        if (lq, lk) != (q_len, kv_len) or b not in (1, batch) or h not in (1, q_heads):
            raise ValueError(f"pair_bias(bias=[{'x'.join(map(str, self.bias.shape))}]): expected "
                             f"a shape broadcastable to [B={batch}, Hq={q_heads}, Lq={q_len}, "
                             f"Lkv={kv_len}] (B and Hq may be 1)")


MODIFIERS = (Alibi, RelBias, PairBias, Softcap)  # in the order they apply


@dataclass(frozen=True)
class RelGrid:
    """Where a window-offset ``rel_bias`` table reads its offsets: the grid and dilation of
    the pattern's neighbourhood, and the table's half-extents ``R_d``."""

    shape: tuple[int, ...]
    dilation: tuple[int, ...]
    halves: tuple[int, ...]
    #: some allowed pair may lie outside the table (clip per dimension); False when the
    #: mask is inside a neighbourhood whose windows the table covers (every group offset
    #: of NATTEN's rule is within kernel - 1), so the entry is a difference of two
    #: per-token numbers: cheaper in the kernel's [BM, BN] registers
    clipped: bool = True
    #: a part of the grid (``NeighborhoodPart``): its query and key positions are these
    #: offsets away from their positions on the grid
    q_offset: int = 0
    kv_offset: int = 0


@dataclass(frozen=True)
class ScoreSpec:
    """What a kernel is specialised on: which modifiers are present (not their values)."""

    alibi: bool = False
    alibi_offset: int = 0  # added to j - p (a part of the sequence; see Alibi)
    rel_radius: int = -1  # half the flattened rel_bias width, -1 without one
    softcap: bool = False
    rel_grid: RelGrid | None = None  # window offsets; None: token offsets j - p
    pair_bias: bool = False

    @property
    def rel_bias(self) -> bool:
        return self.rel_radius >= 0

    @property
    def any(self) -> bool:
        return self.alibi or self.rel_bias or self.softcap or self.pair_bias

    @property
    def rel_grad(self) -> bool:
        """The dK/dV kernel accumulates the table's gradient (token offsets only: their
        entries run along the tile's diagonals)."""
        return self.rel_bias and self.rel_grid is None


def _operands(pattern: Pattern) -> tuple[Pattern, ...]:
    return pattern.parts if isinstance(pattern, Intersection) else (pattern,)


def score_terms(pattern: Pattern) -> dict[type, ScoreModifier]:
    """The modifiers of one head pattern by type (they sit at its top-level ``&``)."""
    terms: dict[type, ScoreModifier] = {}
    for p in _operands(pattern):
        if isinstance(p, ScoreModifier):
            if type(p) in terms and terms[type(p)] != p:
                raise ValueError(f"{p!r} & {terms[type(p)]!r}: at most one {type(p).__name__.lower()} "
                                 "modifier per pattern")
            terms[type(p)] = p
    return terms


def score_spec(pattern: Pattern) -> ScoreSpec:
    terms = score_terms(pattern)
    rel = terms.get(RelBias)
    grid = _rel_grid(pattern, rel) if rel is not None and rel.window_dims else None
    alibi = terms.get(Alibi)
    return ScoreSpec(alibi is not None, alibi.offset if alibi is not None else 0,
                     rel.radius if rel is not None else -1, Softcap in terms, grid,
                     PairBias in terms)


def _rel_grid(pattern: Pattern, rel: RelBias) -> RelGrid:
    """The grid a window-offset table is read on: that of the pattern's neighbourhood
    (all of its neighbourhoods must share one grid and dilation)."""
    grids = {(n.shape, n.dilation, 0, 0) for n in walk(pattern) if isinstance(n, Neighborhood)}
    grids |= {(n.grid.shape, n.grid.dilation, n.q_offset, n.kv_offset) for n in walk(pattern)
              if isinstance(n, NeighborhoodPart)}
    shape_text = "x".join(str(e) for e in rel.table.shape[1:])
    if len(grids) != 1:
        raise ValueError(f"{rel!r}: a window-offset table [{shape_text}] reads coordinates from "
                         f"the pattern's sf.neighborhood; expected exactly one grid and dilation, "
                         f"found {len(grids)}")
    (shape, dilation, q_offset, kv_offset), = grids
    if len(shape) != rel.window_dims:
        raise ValueError(f"{rel!r}: the table has {rel.window_dims} window dimensions but the "
                         f"neighbourhood's grid {shape} has {len(shape)}")
    halves = tuple((e - 1) // 2 for e in rel.table.shape[1:])
    mask = strip_scores(pattern)
    if hasattr(mask, "original_positions"):  # a planner's tiled layout of the mask
        mask = mask.pattern
    operands = [mask] if not isinstance(mask, Intersection) else list(mask.parts)
    bounding = [n.grid if isinstance(n, NeighborhoodPart) else n for n in operands
                if isinstance(n, (Neighborhood, NeighborhoodPart))]
    covered = any(all(h >= k - 1 for h, k in zip(halves, n.kernel)) for n in bounding)
    return RelGrid(shape, dilation, halves, clipped=not covered, q_offset=q_offset,
                   kv_offset=kv_offset)


def rel_index(spec: ScoreSpec, p, j, ops):
    """Flattened table entry of query position ``p`` and key ``j``, written once over an
    ``ops`` namespace (torch for the oracle and CPU path, Triton text for the kernels).

    Token offsets: ``clamp(j - p, -R, R) + R``. Window offsets: per dimension the
    difference of the coordinates inside the dilation group, clipped to ``+-R_d``,
    row-major over the table's extents.
    """
    if spec.rel_grid is None:
        r = spec.rel_radius
        return ops.min(ops.max(j - p, -r), r) + r
    grid = spec.rel_grid
    p, j = p + grid.q_offset, j + grid.kv_offset  # a part's positions, on the grid
    index = 0
    flat_q = flat_k = 0
    for dim, (dil, half) in enumerate(zip(grid.dilation, grid.halves)):
        xq, xk = (ops.fdiv(grid_coordinate(x, grid.shape, dim, ops), dil) for x in (p, j))
        inner = math.prod(2 * h + 1 for h in grid.halves[dim + 1:])
        if grid.clipped:
            index = index + (ops.min(ops.max(xk - xq, -half), half) + half) * inner
        else:
            flat_q, flat_k = flat_q + xq * inner, flat_k + xk * inner
    if grid.clipped:
        return index
    # the same entry for every pair the table covers; the clamp keeps masked pairs'
    # loads inside the table
    r = spec.rel_radius
    return ops.min(ops.max(flat_k - flat_q + r, 0), 2 * r)


def rel_bias_table(pattern: Pattern):
    """The rel_bias table of one head pattern, None without one."""
    rel = score_terms(pattern).get(RelBias)
    return None if rel is None else rel.table


def pair_bias_tensor(pattern: Pattern):
    """The pair_bias tensor of one head pattern, None without one."""
    pair = score_terms(pattern).get(PairBias)
    return None if pair is None else pair.bias


def window_tables(pattern: Pattern) -> tuple:
    """The window-offset (N-D) rel_bias tables of a pattern."""
    return tuple(n.table for n in walk(pattern) if isinstance(n, RelBias) and n.window_dims)


def learned_tensors(pattern: Pattern) -> list:
    """The tensors of one head pattern that may carry a gradient: its rel_bias table and
    pair_bias tensor (slopes are fixed)."""
    return [t for t in (rel_bias_table(pattern), pair_bias_tensor(pattern)) if t is not None]


def strip_scores(pattern: Pattern) -> Pattern:
    """The mask of a head pattern: its modifiers removed."""
    kept = tuple(p for p in _operands(pattern) if not isinstance(p, ScoreModifier))
    if not kept:
        return Full()
    return kept[0] if len(kept) == 1 else Intersection(kept)


def check_score_tensors(pattern: Pattern, batch: int, q_heads: int, q_len: int,
                        kv_len: int) -> None:
    """The slopes / table of every modifier have one row per query head, and a pair bias
    broadcasts to the call's ``[B, Hq, Lq, Lkv]``."""
    for node in walk(pattern):
        if isinstance(node, (Alibi, RelBias)):
            rows = getattr(node, node.tensor_name).shape[0]
            if rows != q_heads:
                raise ValueError(f"{node!r}: {node.tensor_name} has {rows} rows, expected one "
                                 f"per query head ({q_heads})")
        elif isinstance(node, PairBias):
            node.check_call(batch, q_heads, q_len, kv_len)


# ---------------------------------------------------------------- public constructors


def softcap(cap: float) -> Pattern:
    """Soft-cap scores to (-cap, cap): ``cap * tanh(s / cap)`` (Gemma 2, Grok-1)."""
    return Softcap(cap)


def pair_bias(bias) -> Pattern:
    """Add ``bias[b, h, i, j]`` to the score of query row ``i`` and key ``j`` (``bias``:
    ``[Lq, Lkv]``, ``[Hq or 1, Lq, Lkv]`` or ``[B or 1, Hq or 1, Lq, Lkv]``): a bias per
    pair, as Graphormer's spatial and edge encodings (Ying et al. 2021) or a T5 bias
    materialised per pair. Its gradient is ``dS`` per pair (summed over broadcast dims)."""
    return PairBias(bias)


def alibi(slopes) -> Pattern:
    """Add ``slopes[h] * (j - p)`` to every score (ALiBi, Press et al. 2022)."""
    return Alibi(slopes)


def rel_bias(table) -> Pattern:
    """Add a learned per-offset bias ``table[h, clamp(j - p, -R, R) + R]`` (Shaw et al.
    2018), ``table``: [Hq, 2R+1]; or, with ``table`` [Hq, 2R_0+1, ..., 2R_n-1+1], the
    relative-position bias over a window of Swin (Liu et al. 2021) and MaxViT (Tu et al.
    2022): offsets are coordinate differences on the grid of the pattern's
    ``sf.neighborhood`` (inside dilation groups), clipped per dimension."""
    return RelBias(table)


def alibi_slopes(n_heads: int):
    """ALiBi's slopes for ``n_heads`` heads (the paper's geometric sequence, with the
    interleaving it uses when ``n_heads`` is not a power of two), as a float32 tensor."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"alibi_slopes(n_heads={n_heads!r}): expected an int >= 1")

    def powers(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest != n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


# ------------------------------------------------- run-time tensors held by a pattern


def pattern_tensors(pattern: Pattern) -> list:
    """Every run-time tensor the pattern holds (document ids, mask tables, ALiBi slopes,
    rel_bias tables, pair biases), in walk order, which is the order of their placeholders in ``repr``: what
    a compiled graph passes to the custom op (see ``patterns_parse.parse_repr``)."""
    out = []
    for node in walk(pattern):
        if isinstance(node, Documents):
            out += [node.ids] + ([] if node.kv_ids is None else [node.kv_ids])
        elif isinstance(node, MaskTable) and node.mask is not None:  # not a fallback mask_mod
            out.append(node.mask)
        elif isinstance(node, (Alibi, RelBias, PairBias)):
            out.append(getattr(node, node.tensor_name))
    return out
