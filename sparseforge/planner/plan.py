"""The planner: from a canonical pattern and problem sizes to a ``Plan`` (plain data).

A plan fixes everything a kernel is specialised on: the tile configuration, the token
permutation (dilation groups as strided views), the closed-form segments per query
tile and whether they are walked one by one or as one hull. It is built once per
(pattern, sizes, dtype, target) and reused; ``explain()`` and ``save_png()`` show it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..ir.affine import data_conjuncts, drop_top_left, without_data_conjuncts
from ..ir.canonicalize import canonicalize
from ..ir.neighborhood import Neighborhood, NeighborhoodPart
from ..ir.nodes import (
    Documents,
    Intersection,
    MaskTable,
    Pattern,
    PerHead,
    Window,
    document_terms,
    walk,
)
from ..ir.routing import Clusters, TopkKeys, VerticalSlash, is_dynamic
from ..ir.scores import ScoreSpec, score_spec, score_terms, strip_scores
from ..ir.split import envelope, static_part
from ..semantics import pair_mask
from .data_hulls import narrow_to_hulls
from .explain import explain
from .layout import GridTiling, Tiled, choose_tiling, layout_node
from .picture import save_png
from .ranges import TileSegment, tile_segments, walk_count, walked
from .routing_steps import (
    MAX_ROUTED_BLOCK_N,
    RoutingStep,
    kernel_routing_node,
    routing_dag,
    routing_steps,
    tile_list_step,
)
from .schedule import GroupSchedule, group_geometry, visit_matrices
from .tiles import (
    CPU_TILED_LAYOUT_PENALTY,
    DECODE_MAX_Q,
    TARGETS,
    TileConfig,
    backward_configs,
    candidate_configs,
    decode_config,
    estimated_cost,
    grid_part_forward_config,
    padded_head_dim,
    priced,
    tiled_forward_config,
)

log = logging.getLogger("sparseforge")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCHEDULES = ("segments", "hull")


def dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == dtype:
                return name
    elif isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)} (or the torch dtype)")


@dataclass(frozen=True)
class TileStats:
    q_tiles: int
    kv_tiles: int
    visited: int
    full: int
    useful_pairs: int
    computed_pairs: int
    mask_pairs: int  # Lq * Lkv

    @property
    def partial(self) -> int:
        return self.visited - self.full

    @property
    def utilisation(self) -> float:
        return self.useful_pairs / self.computed_pairs if self.computed_pairs else 1.0

    @property
    def density(self) -> float:
        return self.useful_pairs / self.mask_pairs if self.mask_pairs else 0.0


@dataclass(frozen=True)
class KernelPlan:
    """One generated kernel: a head pattern, its permutation, segments and schedule."""

    pattern: Pattern  # canonical pattern of these heads (with score modifiers), original coordinates
    analysed: Pattern  # the mask segments and the predicate use (group-local if groups > 1)
    groups: int  # dilation groups made contiguous via strided views; 1 = no permutation
    segments: tuple[TileSegment, ...]
    schedule: str  # "segments": walk each sorted segment; "hull": one covering range
    heads: tuple[int, ...] | None  # query heads served; None = all

    def _walked(self, segments) -> tuple[TileSegment, ...]:
        """What a kernel walks under this plan's schedule: each segment, or their hull."""
        return walked(segments, self.schedule)

    @cached_property
    def walked_segments(self) -> tuple[TileSegment, ...]:
        return self._walked(self.segments)

    @cached_property
    def key_segments(self) -> tuple[TileSegment, ...]:
        """Query-tile segments per kv tile (inverted bounds), walked by backward dK/dV; of
        the static part of a routed pattern (its selected tiles come on top, per call)."""
        static = static_part(self.analysed) if is_dynamic(self.analysed) else self.analysed
        return self._walked(tile_segments(static, side="key"))

    @cached_property
    def decode_segments(self) -> tuple[TileSegment, ...]:
        """The decode kernel's segments: original coordinates (no dilation permutation;
        a few new tokens gain nothing from it), one query tile holding every new token; of
        the static part of a routed pattern."""
        mask = static_part(self.mask) if is_dynamic(self.mask) else self.mask
        return self._walked(tile_segments(mask))

    @cached_property
    def mask(self) -> Pattern:
        """The pattern without its score modifiers, in original coordinates (outside a
        tiled layout: the decode kernel keeps original token order)."""
        mask = strip_scores(self.pattern)
        return mask.pattern if isinstance(mask, Tiled) else mask

    @cached_property
    def score(self) -> ScoreSpec:
        """Which score modifiers the kernels apply (their values are run-time arguments)."""
        return score_spec(self.pattern)

    @cached_property
    def static_mask(self) -> Pattern:
        """What the closed-form segments cover, in run coordinates: the pattern, routing
        nodes read as empty (a routed kernel's selected tiles come on top, per call)."""
        return static_part(self.pattern) if is_dynamic(self.pattern) else self.pattern

    @cached_property
    def has_documents(self) -> bool:
        return any(isinstance(n, Documents) for n in walk(self.analysed))

    @cached_property
    def has_tables(self) -> bool:
        return any(isinstance(n, MaskTable) for n in walk(self.analysed))

    @cached_property
    def narrowed_by_data(self) -> bool:
        """The kernels walk the segments of the pattern without its conjunct mask tables
        and document ids, clamped per tile to the ranges that data allows (computed once
        per data tensor, ``planner/data_hulls.py``). Needs original token order, no
        dilation groups, no routing, and no segment family (its runs are walked in a
        loop the clamp does not reach)."""
        return self.groups == 1 and _data_free_segments(self.analysed) is not None

    def kernel_segments(self, name: str) -> tuple[TileSegment, ...]:
        """What a generated kernel walks: ``name`` (``walked_segments``, ``key_segments``
        or ``decode_segments``), or with ``narrowed_by_data`` the same of the pattern
        without its data conjuncts (the kernel clamps them to the data's ranges)."""
        if not self.narrowed_by_data:
            return getattr(self, name)
        free = without_data_conjuncts(self.mask if name == "decode_segments" else self.analysed)
        return self._walked(tile_segments(free, side="key" if name == "key_segments" else "query"))


@dataclass(frozen=True)
class TileChoice:
    """One priced forward tile config: in a tiled token layout or not, and its estimated
    cost (``planner.tiles.estimated_cost``: thousands of warp-instructions issued)."""

    config: TileConfig
    tiled: bool
    cost: float


@dataclass(frozen=True)
class Plan:
    """Everything the kernels of one call are specialised on. With a tiled ``layout``
    (N-D neighbourhoods, ``planner/layout.py``) the kernels run on permuted, padded
    tokens: ``q_len``/``kv_len`` are those run lengths and ``lengths`` the caller's."""

    pattern: Pattern
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    target: str
    config: TileConfig
    kernels: tuple[KernelPlan, ...]
    backward_dq: TileConfig  # tiles of the backward dQ kernel
    backward_dkdv: TileConfig  # ... and of the dK/dV kernel
    decode: TileConfig  # tiles of the split-KV decode kernel (used when q_len is short)
    layout: tuple[GridTiling, GridTiling] | None = None  # (queries, keys) token order
    #: routing pre-kernels of a dynamic pattern (``planner/routing_steps.py``), in
    #: dependency order; empty for a static pattern
    routing_steps: tuple[RoutingStep, ...] = ()
    #: every forward tile config the planner priced, with its estimated cost (``explain``
    #: says why the chosen one won)
    tile_choices: tuple[TileChoice, ...] = ()
    #: v's head dim (the output's); None on construction means ``head_dim``. It differs
    #: for MLA-style attention (DeepSeek-V2/V3: q/k 192, v 128).
    value_dim: int | None = None

    def __post_init__(self):
        if self.value_dim is None:
            object.__setattr__(self, "value_dim", self.head_dim)

    @cached_property
    def routing_dag(self):
        """The routing pre-kernels as a networkx DAG (empty for static patterns)."""
        return routing_dag(self.routing_steps)

    @property
    def lengths(self) -> tuple[int, int]:
        """(Lq, Lkv) of the call, before any layout."""
        if self.layout is None:
            return self.q_len, self.kv_len
        return self.layout[0].length, self.layout[1].length

    @property
    def block_m(self) -> int:
        return self.config.block_m

    @property
    def block_n(self) -> int:
        return self.config.block_n

    @property
    def padded_head_dim(self) -> int:
        return padded_head_dim(self.head_dim)

    @property
    def padded_value_dim(self) -> int:
        return padded_head_dim(self.value_dim)

    @cached_property
    def schedules(self) -> tuple[tuple[GroupSchedule, ...], ...]:
        """Per kernel, per dilation group: the walked segments evaluated over every query
        tile. Computed once per plan; the CPU path, stats and the picture all read it."""
        return tuple(
            tuple(GroupSchedule(geo, *visit_matrices(list(k.walked_segments), geo.q_len,
                                                     geo.kv_len, self.block_m, self.block_n))
                  for geo in group_geometry(self.q_len, self.kv_len, k.groups))
            for k in self.kernels)

    @cached_property
    def decode_spans(self) -> tuple[int, ...]:
        """Per kernel: kv tiles between the first and last one the decode kernel visits
        for all new tokens (what its splits divide)."""
        spans = []
        for k in self.kernels:
            visit, _ = visit_matrices(list(k.decode_segments), self.q_len, self.kv_len,
                                      max(self.decode.block_m, self.q_len), self.decode.block_n)
            cols = visit.any(0).nonzero()[0] if visit.size else []
            spans.append(int(cols[-1] - cols[0] + 1) if len(cols) else 0)
        return tuple(spans)

    @cached_property
    def stats(self) -> tuple[TileStats, ...]:
        """Per kernel tile statistics. Lazy: counting useful pairs evaluates the predicate
        on every partial tile, which dispatch never needs (only explain/png do)."""
        return tuple(_stats(self, i) for i in range(len(self.kernels)))

    def explain(self) -> str:
        return explain(self)

    def save_png(self, path, *, max_tokens: int = 1024) -> None:
        save_png(self, path, max_tokens=max_tokens)


def _check_len(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"plan({name}={value!r}): expected an int >= 0")
    return value


def _check_block(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 16 or value & (value - 1)):
        raise ValueError(f"plan({name}={value!r}): expected a power of two >= 16")


def default_target(device: torch.device | None = None) -> str:
    if device is not None and device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "sm_90" if major >= 9 else "sm_80"
    return "cpu"


def plan(pattern: Pattern, *, q_len: int, kv_len: int, head_dim: int, dtype="bfloat16",
         target: str = "cpu", block_m: int | None = None, block_n: int | None = None,
         schedule: str | None = None, groups: int | None = None,
         tiled: bool | None = None, value_dim: int | None = None) -> Plan:
    """Plan ``pattern`` for the given sizes. ``block_m``/``block_n``/``schedule``/``groups``
    and ``tiled`` (N-D tiled token layout on/off) override the cost model (tests and
    benchmarks use this). ``value_dim`` is v's head dim where it differs from q's and k's
    (``head_dim``); tiles are chosen for the larger of the two.

    Three steps: check the arguments, canonicalise, then plan a routed pattern
    (``_plan_routed``: its static part's segments plus the selected tiles) or a static one
    (``_plan_static``: price every tile config and token layout, keep the cheapest)."""
    request = _check_request(pattern, q_len, kv_len, head_dim, dtype, target, block_m, block_n,
                             schedule, groups, tiled, value_dim)
    canonical = canonicalize(pattern)
    if q_len == kv_len:  # both alignments agree: plan the plain pattern (the same kernels)
        canonical = canonicalize(drop_top_left(canonical))
    if is_dynamic(canonical):
        return _plan_routed(canonical, request)
    return _plan_static(canonical, request)


@dataclass(frozen=True)
class PlanRequest:
    """The checked arguments of ``plan``: sizes, dtype, target and the overrides."""

    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    target: str
    block_m: int | None = None
    block_n: int | None = None
    schedule: str | None = None
    groups: int | None = None
    tiled: bool | None = None
    value_dim: int | None = None

    @property
    def tile_dim(self) -> int:
        """The head dim tiles are chosen for: the larger of q/k's and v's (the q tile and
        the output accumulator are both live across the tile loop)."""
        return max(self.head_dim, self.value_dim)

    def replan(self, pattern: Pattern, **changes) -> Plan:
        """``plan`` of another pattern with these arguments, some changed."""
        return plan(pattern, **{**dataclasses.asdict(self), **changes})


def _check_request(pattern, q_len, kv_len, head_dim, dtype, target, block_m, block_n, schedule,
                   groups, tiled, value_dim) -> PlanRequest:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"plan(pattern={type(pattern).__name__}): expected a sparseforge pattern")
    q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= 256:
        raise ValueError(f"plan(head_dim={head_dim!r}): expected an int in [1, 256]")
    if value_dim is None:
        value_dim = head_dim
    elif isinstance(value_dim, bool) or not isinstance(value_dim, int) or not 1 <= value_dim <= 256:
        raise ValueError(f"plan(value_dim={value_dim!r}): expected None or an int in [1, 256]")
    dtype = dtype_name(dtype)
    if target not in TARGETS:
        raise ValueError(f"plan(target={target!r}): expected one of {', '.join(TARGETS)}")
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"plan(schedule={schedule!r}): expected one of {', '.join(SCHEDULES)}")
    if tiled not in (None, True, False):
        raise ValueError(f"plan(tiled={tiled!r}): expected None, True or False")
    return PlanRequest(q_len, kv_len, head_dim, dtype, target, block_m, block_n, schedule, groups,
                       tiled, value_dim)


def _plan_routed(canonical: Pattern, r: PlanRequest) -> Plan:
    """A routed pattern. Without a generated kernel (the torch path runs it) the plan is
    that of its envelope; with one, the closed-form segments of its static part (original
    token order), then the selected tiles, the predicate being the whole pattern."""
    steps = routing_steps(canonical, r.q_len, r.kv_len, r.head_dim)
    node = kernel_routing_node(canonical)
    if node is None:
        envelope_plan = r.replan(envelope(canonical))
        return dataclasses.replace(envelope_plan, pattern=canonical, routing_steps=steps)
    if r.groups not in (None, 1) or r.tiled:
        raise ValueError("plan(groups=, tiled=): a routed pattern runs in original token "
                         "order (groups=1, tiled=False)")
    static = r.replan(static_part(canonical), groups=1, tiled=False)
    cfg = static.config
    if (score_spec(canonical).any or isinstance(node, TopkKeys)) and not (r.block_m or r.block_n):
        # modifiers (or DMA's key bias) beside the scores: the scored tile table
        cfg = candidate_configs(r.target, r.tile_dim, r.dtype, scored=True)[0]
    cfg = dataclasses.replace(cfg, block_n=min(cfg.block_n, MAX_ROUTED_BLOCK_N))  # 64-bit masks
    if r.target == "sm_80":  # a fourth inlined tile walk: two stages left stack bytes (cuobjdump)
        cfg = dataclasses.replace(cfg, num_stages=1)
    if (cfg.block_m, cfg.block_n) != (static.block_m, static.block_n):
        static = r.replan(static_part(canonical), groups=1, tiled=False, block_m=cfg.block_m,
                          block_n=cfg.block_n)
    # dQ's key tiles hold one 64-bit mask of buckets too. dK/dV looks each row's selection
    # up per bucket, in the row slice of its [keys, rows] tiles: larger tiles or two stages
    # left 24-920 stack bytes on sm_90 (MoBA, D = 64 and 128, Triton 3.9); 32 x 32 tiles,
    # 4 warps and one stage compile clean on sm_80 and sm_90
    dq_cfg = dataclasses.replace(static.backward_dq,
                                 block_n=min(static.backward_dq.block_n, MAX_ROUTED_BLOCK_N))
    if r.target == "sm_90":  # MoBA's dQ at D = 128 stacked 8 bytes in two stages (Triton 3.6)
        dq_cfg = dataclasses.replace(dq_cfg, num_stages=1)
        # with the key bias, lines or sorted positions: 24-32 stack bytes at 64 keys (D = 128,
        # Triton 3.6); 32 keys compile clean
        if isinstance(node, (TopkKeys, VerticalSlash, Clusters)):
            dq_cfg = dataclasses.replace(dq_cfg, block_n=min(dq_cfg.block_n, 32))
    # (lines: each key's rows in one 64-bit mask, so at most 64 rows on any target)
    dkdv_cfg = dataclasses.replace(static.backward_dkdv,
                                   block_m=min(static.backward_dkdv.block_m, MAX_ROUTED_BLOCK_N))
    if r.target in ("sm_80", "sm_90"):
        dkdv_cfg = dataclasses.replace(dkdv_cfg, block_m=min(dkdv_cfg.block_m, 32),
                                       block_n=min(dkdv_cfg.block_n, 32), num_warps=4,
                                       num_stages=1)
    # the routed decode kernel's key tiles hold one 64-bit mask of buckets, as the forward's;
    # on sm_80 one stage (two left 8-24 stack bytes at D = 128 under Triton 3.6)
    decode_cfg = dataclasses.replace(static.decode,
                                     block_n=min(static.decode.block_n, MAX_ROUTED_BLOCK_N))
    if r.target == "sm_80":
        decode_cfg = dataclasses.replace(decode_cfg, num_stages=1)
    static = dataclasses.replace(static, config=cfg, backward_dq=dq_cfg, backward_dkdv=dkdv_cfg,
                                 decode=decode_cfg)
    kernels = tuple(dataclasses.replace(kp, pattern=canonical, analysed=strip_scores(canonical))
                    for kp in static.kernels)
    steps += (tile_list_step(steps, node, r.q_len, r.kv_len, static.block_m, static.block_n),)
    # the routed kernel's tiles follow the rules above, not the static part's pricing
    return dataclasses.replace(static, pattern=canonical, kernels=kernels, routing_steps=steps,
                               tile_choices=())


@dataclass(frozen=True)
class Candidate:
    """One way to run a static pattern: forward tiles, token layout (None: original
    order), the head patterns as the kernels see them, run lengths, backward tiles."""

    config: TileConfig
    layout: tuple[GridTiling, GridTiling] | None
    heads: list
    q_len: int
    kv_len: int
    backward: tuple[TileConfig, TileConfig]


def _plan_static(canonical: Pattern, r: PlanRequest) -> Plan:
    heads = head_groups(canonical)
    scored = any(score_spec(p).any for p, _ in heads)
    best = None
    priced_candidates = []
    for candidate in _candidates(heads, scored, r):
        choices = [_choose_kernel(strip_scores(p), candidate.q_len, candidate.kv_len,
                                  candidate.config, r.schedule, r.groups)
                   for p, _ in candidate.heads]
        cost = sum(c[0] for c in choices)
        if r.target == "cpu" and candidate.layout is not None:
            cost *= CPU_TILED_LAYOUT_PENALTY
        priced_candidates.append(TileChoice(candidate.config, candidate.layout is not None, cost))
        if best is None or cost < best[0]:
            best = (cost, candidate, choices)
    _, chosen, choices = best
    kernels = tuple(KernelPlan(p, analysed, g, tuple(segs), sched, h)
                    for (_, analysed, g, segs, sched), (p, h) in zip(choices, chosen.heads))
    backward = chosen.backward
    if not all(_lean_walk(k) for k in kernels):
        backward = backward_configs(r.target, r.tile_dim, r.dtype, scored,
                                    tiled=chosen.layout is not None, lean_walk=False)
    decode = decode_config(r.target, r.tile_dim, r.dtype, scored)
    if _has_tables(heads):
        backward = tuple(_within_a_word(c) for c in backward)
        decode = _within_a_word(decode)
    if r.value_dim != r.head_dim and r.target == "sm_80" and backward[0].block_n > 32:
        # dQ with q/k 64 and v 96 or 128 wide: 64 x 64 tiles left 16 stack bytes on sm_80,
        # 64 x 32 none (cuobjdump, Triton 3.9)
        backward = (dataclasses.replace(backward[0], block_n=backward[0].block_n // 2),
                    backward[1])
    return Plan(canonical, chosen.q_len, chosen.kv_len, r.head_dim, r.dtype, r.target,
                chosen.config, kernels, *backward, decode, chosen.layout,
                tile_choices=tuple(priced_candidates), value_dim=r.value_dim)


def _lean_walk(kernel: KernelPlan) -> bool:
    """Whether the kernel's dK/dV walk holds little state beside its tiles: one segment,
    no dilation groups, no document ids, no N-D neighbourhood coordinates in the predicate
    (``tiles.backward_configs``)."""
    return (len(kernel.key_segments) == 1 and kernel.groups == 1 and not kernel.has_documents
            and not kernel.has_tables
            and not any(isinstance(n, (Neighborhood, NeighborhoodPart))
                    for n in walk(kernel.analysed)))


#: keys a mask table's word holds: the kernels read one word per row and key tile, so key
#: tiles of patterns with tables hold at most this many keys
TABLE_WORD = 64


def _has_tables(heads) -> bool:
    return any(isinstance(n, MaskTable) for p, _ in heads for n in walk(p))


def _id_terms(heads) -> int:
    return max(len(document_terms(p)) for p, _ in heads)


def _within_a_word(cfg: TileConfig) -> TileConfig:
    return cfg if cfg.block_n <= TABLE_WORD else dataclasses.replace(cfg, block_n=TABLE_WORD)


def _candidates(heads, scored: bool, r: PlanRequest) -> list[Candidate]:
    """Every tile config of the target's table (or the one the overrides give), each in
    original token order and, for an N-D neighbourhood, in a tiled layout."""
    configs = candidate_configs(r.target, r.tile_dim, r.dtype, scored)
    if _has_tables(heads) or _id_terms(heads) > 1:
        # a table's word per row, or several id pairs, live beside the scores: key tiles of
        # at most 64 (two id terms stacked 248 bytes at 128 x 128 under Triton 3.6)
        configs = [c for c in configs if c.block_n <= TABLE_WORD] or [
            dataclasses.replace(configs[0], block_n=TABLE_WORD)]
    if r.block_m or r.block_n:
        base = configs[0]
        configs = [TileConfig(r.block_m or base.block_m, r.block_n or base.block_n,
                              base.num_warps, base.num_stages, base.efficiency, base.tile_overhead)]
        if r.dtype != "float32":
            configs = [priced(r.target, r.tile_dim, configs[0])]
        if _has_tables(heads) and configs[0].block_n > TABLE_WORD:
            raise ValueError(f"plan(block_n={configs[0].block_n}): a pattern with a mask_table "
                             f"needs key tiles of at most {TABLE_WORD} (one table word per row)")
    if not (r.block_m or r.block_n) and any(_reads_a_grid_part(p) for p, _ in heads):
        configs = list(dict.fromkeys(grid_part_forward_config(c, r.target, r.dtype)
                                     for c in configs))
    backward = backward_configs(r.target, r.tile_dim, r.dtype, scored)
    node = _tileable(heads, r.q_len, r.kv_len, r.groups) if r.tiled is not False else None
    if r.tiled and node is None:
        raise ValueError("plan(tiled=True): the tiled layout needs an N-D neighborhood in every "
                         "head (one grid and dilation), q_len == kv_len >= the grid size > "
                         f"{DECODE_MAX_Q}, no documents, no token-offset rel_bias and no pair_bias")
    tiled_backward = backward_configs(r.target, r.tile_dim, r.dtype, scored, tiled=True)
    out = []
    for base_cfg in configs:
        if not r.tiled:
            out.append(Candidate(base_cfg, None, heads, r.q_len, r.kv_len, backward))
        if node is None:
            continue
        cfg = (tiled_forward_config(base_cfg, r.target, r.tile_dim, r.dtype, scored, node.ndim)
               if not (r.block_m or r.block_n) else base_cfg)
        # 128 x 128 tiles spill once the layout's predicate is live beside them (cuobjdump)
        if cfg.block_m * cfg.block_n > 128 * 64:
            continue
        layout = choose_tiling(node, r.q_len, cfg, tiled_backward)
        if layout is None:
            continue
        blocks = tuple((c.block_m, c.block_n) for c in (cfg, *tiled_backward))
        tiled_heads = [(_with_scores(Tiled(strip_scores(p), *layout, blocks,
                                           not score_spec(p).any), p), h) for p, h in heads]
        out.append(Candidate(cfg, layout, tiled_heads, layout[0].run_len, layout[1].run_len,
                             tiled_backward))
    return out


def _reads_a_grid_part(pattern: Pattern) -> bool:
    """Whether a window-offset table is read on a part of its grid (a ``NeighborhoodPart``
    beside it)."""
    return (score_spec(pattern).rel_grid is not None
            and any(isinstance(n, NeighborhoodPart) for n in walk(pattern)))


def _tileable(heads, q_len: int, kv_len: int, groups):
    """The neighbourhood a tiled layout would serve, or None where one cannot be used:
    it permutes absolute positions (q_len == kv_len), decode keeps original order,
    document ids are read per original position, a token-offset rel_bias table's
    gradient is summed along tile diagonals, and a pair bias's gradient is stored by
    original row and key (score modifiers otherwise map run positions back,
    ``Tiled.original_positions``)."""
    masks = [p for p, _ in heads]
    node = layout_node(masks)
    if (node is None or groups is not None or q_len != kv_len or q_len < node.size
            or q_len <= DECODE_MAX_Q
            or any(score_spec(p).rel_grad or score_spec(p).pair_bias for p in masks)
            or any(isinstance(n, (Documents, MaskTable)) for p in masks for n in walk(p))):
        return None
    return node


def _with_scores(tiled: Tiled, head: Pattern) -> Pattern:
    """A tiled head keeps its score modifiers beside the tiled mask (``score_spec`` and
    the executors read them from the top-level intersection)."""
    modifiers = tuple(score_terms(head).values())
    return Intersection((tiled, *modifiers)) if modifiers else tiled


def head_groups(canonical: Pattern) -> list[tuple[Pattern, tuple[int, ...] | None]]:
    """Distinct head patterns and the heads using each (one kernel per distinct pattern)."""
    if not isinstance(canonical, PerHead):
        return [(canonical, None)]
    order: dict[Pattern, list[int]] = {}
    for h, p in enumerate(canonical.patterns):
        order.setdefault(p, []).append(h)
    return [(p, tuple(hs)) for p, hs in order.items()]


def _permutations(pattern: Pattern) -> list[tuple[int, Pattern]]:
    """(groups, pattern in group-local coordinates) options for this head pattern."""
    options = [(1, pattern)]
    if isinstance(pattern, Window) and pattern.dilation > 1:
        options.append((pattern.dilation, Window(pattern.left, pattern.right, 1)))
    return options


def _choose_kernel(pattern, q_len, kv_len, cfg, schedule, groups):
    """(cost, analysed pattern, groups, segments, schedule) of the cheapest way to run
    the mask ``pattern`` with tiles ``cfg``."""
    best = None
    for g, analysed in _permutations(pattern):
        if groups is not None and g != groups:
            continue
        segs = tile_segments(analysed)
        free = _data_free_segments(analysed) if g == 1 else None
        several = walk_count(segs) > 1
        for sched in (SCHEDULES if several else ("segments",)):
            if schedule is not None and several and sched != schedule:
                continue
            walk = walked(segs, sched)
            visited = partial = 0
            for geo in group_geometry(q_len, kv_len, g):
                # with data conjuncts the kernels walk the data-free segments (clamped by the
                # data at run time: the price stays a function of the shapes, as the plan
                # cache key is, so it reads no ids or tables)
                v, f = visit_matrices(list(walk if free is None else walked(free, sched)),
                                      geo.q_len, geo.kv_len, cfg.block_m, cfg.block_n)
                visited += int(v.sum())
                partial += int((v & ~f).sum())
            # walking several segments costs a little per query tile: prefer the hull on ties
            cost = estimated_cost(cfg, visited, partial) * (1.0 + 0.02 * (walk_count(walk) - 1))
            if best is None or cost < best[0]:
                best = (cost, analysed, g, segs, sched)
    if best is None:
        raise ValueError(f"plan(groups={groups!r}): not a valid permutation for {pattern!r}")
    return best


def _data_free_segments(analysed: Pattern) -> list[TileSegment] | None:
    """The segments of ``analysed`` without its data conjuncts, where the kernels can
    clamp them to the data's per-tile ranges (not routed, no segment family on either
    side); None where they cannot."""
    if not data_conjuncts(analysed) or is_dynamic(analysed):
        return None
    free = without_data_conjuncts(analysed)
    segs = tile_segments(free)
    if any(seg.runs > 1 for seg in (*segs, *tile_segments(free, side="key"))):
        return None
    return segs


def _stats(p: Plan, index: int) -> TileStats:
    kernel = p.kernels[index]
    bm, bn = p.block_m, p.block_n
    q_tiles = kv_tiles = visited = full_tiles = useful = 0
    for sched in p.schedules[index]:
        v, f = sched.visit, sched.full
        if kernel.narrowed_by_data:  # the tiles a generated kernel walks with this data
            v, f = visit_matrices(list(kernel.kernel_segments("walked_segments")), p.q_len,
                                  p.kv_len, bm, bn)
            v, f = narrow_to_hulls(kernel.analysed, v, f, p.q_len, p.kv_len, bm, bn)
        q_tiles += v.shape[0]
        kv_tiles = max(kv_tiles, v.shape[1] if v.ndim == 2 else 0)
        visited += int(v.sum())
        full_tiles += int(f.sum())
        useful += _useful_pairs(kernel.static_mask, sched.geometry, kernel.groups, v, f, p.q_len,
                                p.kv_len, bm, bn)
    lq, lkv = p.lengths
    return TileStats(q_tiles, kv_tiles, visited, full_tiles, useful, visited * bm * bn, lq * lkv)


def _useful_pairs(pattern, geo, groups, visit, full, q_len, kv_len, bm, bn, chunk=2048) -> int:
    """Allowed pairs inside visited tiles: full tiles by area, partial ones evaluated."""
    if visit.size == 0:
        return 0
    rows = np.minimum((np.arange(visit.shape[0]) + 1) * bm, geo.q_len) - np.arange(visit.shape[0]) * bm
    cols = np.minimum((np.arange(visit.shape[1]) + 1) * bn, geo.kv_len) - np.arange(visit.shape[1]) * bn
    total = int((full * rows[:, None] * cols[None, :]).sum())
    tq, tk = np.nonzero(visit & ~full)
    r = torch.arange(bm)
    c = torch.arange(bn)
    for s in range(0, len(tq), chunk):
        mt = torch.from_numpy(tq[s:s + chunk])
        nt = torch.from_numpy(tk[s:s + chunk])
        t_rows = mt[:, None] * bm + r[None, :]  # group-local
        t_cols = nt[:, None] * bn + c[None, :]
        i = geo.q_start + t_rows * groups
        j = geo.kv_start + t_cols * groups
        ok = pair_mask(pattern, i[:, :, None], j[:, None, :], q_len, kv_len)
        ok = ok & (t_rows < geo.q_len)[:, :, None] & (t_cols < geo.kv_len)[:, None, :]
        total += int(ok.sum()) // (ok.shape[0] if ok.dim() == 4 else 1)
    return total
