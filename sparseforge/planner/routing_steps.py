"""The routing pre-kernels a dynamic pattern needs, as a small DAG the plan records and
``plan.explain()`` prints: pool q, pool k -> score -> select -> per-tile lists for block
rules, lse -> column and diagonal masses -> select -> tile map for ``vertical_slash``, one
chain per routing node, all feeding the attention. Work is counted at the plan's sizes
(multiply-adds for pooling and scoring, comparisons for selection), so the cost of
routing is visible next to the attention's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from ..ir.nodes import Documents, Empty, MaskTable, Pattern, PerHead, walk
from ..ir.routing import (
    Clusters,
    DynamicPattern,
    Hierarchical,
    ThresholdBlocks,
    TopkChunks,
    TopkKeys,
    VerticalSlash,
)
from ..ir.scores import Alibi, PairBias, RelBias
from ..ir.split import static_part

#: a routed kernel's key tiles hold at most this many keys (one bit each per row)
MAX_ROUTED_BLOCK_N = 64


@dataclass(frozen=True)
class RoutingStep:
    """One pre-kernel: ``name`` (unique), ``op``, its ``inputs`` (step names, or ``q``/``k``),
    what it produces, and its work per (batch, head)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    work: int


def _bucket_counts(node, q_len: int, kv_len: int) -> tuple[int, int]:
    if isinstance(node, TopkChunks):
        return node.chunks, node.chunks
    first = kv_len - q_len
    cq = max(1, -(-kv_len // node.q_block) - math.floor(first / node.q_block))
    return cq, max(1, -(-kv_len // node.block))


def routing_steps(pattern: Pattern, q_len: int, kv_len: int, head_dim: int) -> tuple[RoutingStep, ...]:
    """The pre-kernels of every routing node of ``pattern``, in dependency order."""
    steps: list[RoutingStep] = []
    seen = []
    for node in walk(pattern):
        if not isinstance(node, DynamicPattern) or node in seen:
            continue
        seen.append(node)
        tag = f"{len(seen) - 1}"
        if isinstance(node, VerticalSlash):
            rows = min(node.last_q, q_len)
            steps += [
                RoutingStep(f"lse{tag}", f"last {rows} rows' log-sum-exp", ("q", "k"),
                            f"[{rows}]", rows * kv_len * head_dim),
                RoutingStep(f"columns{tag}", "column mass", ("q", "k", f"lse{tag}"),
                            f"[{kv_len}]", rows * kv_len * head_dim),
                RoutingStep(f"diagonals{tag}", "diagonal mass", ("q", "k", f"lse{tag}"),
                            f"[{2 * kv_len - 1}]", rows * (2 * kv_len - 1) * head_dim),
                RoutingStep(f"select{tag}", f"top-{node.n_vertical} columns, top-{node.n_slash} "
                            "diagonals", (f"columns{tag}", f"diagonals{tag}"),
                            "ascending columns / offsets",
                            3 * kv_len * max(1, math.ceil(math.log2(max(kv_len, 2))))),
            ]
            continue
        if isinstance(node, Clusters):
            c = node.centroids.shape[1]
            how = "nearest centroid" if node.balanced is None else f"{node.balanced} nearest per centroid"
            sort = max(1, math.ceil(math.log2(max(q_len, 2)))) if node.balanced else 1
            steps += [
                RoutingStep(f"assign_q{tag}", f"normalise, {how}", ("q",),
                            f"memberships [{q_len}, {c}]", q_len * c * (head_dim + sort)),
                RoutingStep(f"assign_k{tag}", f"normalise, {how}", ("k",),
                            f"memberships [{kv_len}, {c}]", kv_len * c * (head_dim + sort)),
            ]
            continue
        cq, ck = _bucket_counts(node, q_len, kv_len)
        if isinstance(node, Hierarchical):
            rounds = max(1, (ck - 1).bit_length())
            steps += [
                RoutingStep(f"branches{tag}", f"{node.k} equal branches per query block", (),
                            f"[{cq}, {node.k}] block ranges", cq * node.k),
                RoutingStep(f"refine{tag}", f"{rounds} rounds: split, score middle keys "
                            f"(max over {node.q_block} queries), keep top-{node.k}",
                            ("q", "k", f"branches{tag}"), f"fixed-k indices [{cq}, {node.k}]",
                            rounds * cq * 2 * node.k * (node.q_block * head_dim
                                                        + max(1, (2 * node.k).bit_length()))),
            ]
            continue
        if isinstance(node, TopkKeys):
            steps.append(RoutingStep(f"select{tag}", f"top-{node.k} keys by bias per "
                                     f"{node.query_block}-row block", ("bias",),
                                     f"fixed-k key indices [{cq}, {node.k}]",
                                     cq * ck * max(1, math.ceil(math.log2(max(ck, 2))))))
            continue
        pool = getattr(node, "pool", "mean") + (" * sqrt(len)" if isinstance(node, TopkChunks)
                                                or getattr(node, "scale_by_sqrt_len", False) else "")
        if isinstance(node, ThresholdBlocks):
            select, layout = f"coverage {node.coverage}", f"CSR counts [{cq}] + offsets"
        else:
            select, layout = f"top-{node.k}", f"fixed-k indices [{cq}, {node.k}]"
        steps += [
            RoutingStep(f"pool_q{tag}", f"pool {pool}", ("q",), f"[{cq}, {head_dim}]", q_len * head_dim),
            RoutingStep(f"pool_k{tag}", f"pool {pool}", ("k",), f"[{ck}, {head_dim}]", kv_len * head_dim),
            RoutingStep(f"score{tag}", f"dot, share={node.share}", (f"pool_q{tag}", f"pool_k{tag}"),
                        f"[{cq}, {ck}]", cq * ck * head_dim),
            RoutingStep(f"select{tag}", select, (f"score{tag}",), layout,
                        cq * ck * max(1, math.ceil(math.log2(max(ck, 2))))),
        ]
    return tuple(steps)


def _tag(name: str) -> str:
    """The routing node's number at the end of a step name (``select0`` -> ``0``)."""
    return name[len(name.rstrip("0123456789")):]


def tile_list_step(steps: tuple[RoutingStep, ...], node, q_len: int, kv_len: int,
                   block_m: int, block_n: int) -> RoutingStep:
    """The step the routed forward kernel adds after ``select``: per query tile of
    ``block_m`` rows, the sorted union of its rows' selected key buckets (gather, sort,
    drop repeats: fixed sizes, on the device)."""
    if isinstance(node, Clusters):
        tag = _tag(next(s.name for s in reversed(steps) if s.name.startswith("assign_q")))
        log = max(1, math.ceil(math.log2(max(q_len, kv_len, 2))))
        return RoutingStep(f"sort{tag}", "sort each head's tokens by cluster",
                           (f"assign_q{tag}", f"assign_k{tag}"),
                           f"permutations [{q_len}], [{kv_len}] + per-tile cluster lists",
                           (q_len + kv_len) * log)
    select = next(s for s in reversed(steps) if s.name.startswith(("select", "refine")))
    if isinstance(node, VerticalSlash):
        return _tile_map(f"tiles{_tag(select.name)}", select.name, q_len, kv_len, block_m, block_n)
    return _bucket_lists(f"tiles{_tag(select.name)}", select.name, node, q_len, kv_len, block_m)


def _list_width(node, q_len: int, kv_len: int, block_m: int) -> tuple[int, int]:
    """(selections gathered per query tile, the width of its sorted bucket list)."""
    cq, ck = _bucket_counts(node, q_len, kv_len)
    span = cq if isinstance(node, TopkChunks) else min(cq, (block_m - 1) // node.q_block + 2)
    gathered = span * min(getattr(node, "k", ck), ck)
    return gathered, min(gathered, ck)


def _bucket_lists(name: str, source: str, node, q_len: int, kv_len: int,
                  block_m: int) -> RoutingStep:
    q_tiles = -(-q_len // block_m)
    gathered, width = _list_width(node, q_len, kv_len, block_m)
    return RoutingStep(name, f"union per {block_m}-row tile", (source,),
                       f"sorted bucket lists [{q_tiles}, <= {width}]",
                       2 * q_tiles * gathered * max(1, math.ceil(math.log2(max(gathered, 2)))))


def has_generated_backward(pattern: Pattern) -> bool:
    """Whether a routed pattern trains with generated backward kernels (dQ, dK/dV): one
    routing node, any rule (``topk_blocks``, ``topk_chunks``, ``threshold_blocks``,
    ``hierarchical``, ``topk_keys`` with its key bias's gradient, ``vertical_slash``
    through its transposed tile map, ``clusters`` on the cluster-sorted tokens)."""
    return kernel_routing_node(pattern) is not None


def has_routed_decode(pattern: Pattern) -> bool:
    """Whether a few new tokens of a routed pattern run the split-KV decode kernel: the
    bucket rules but ``topk_keys`` (whose per-head key bias the decode kernel's rows,
    which hold several heads, do not read); the others run the forward kernel."""
    nodes = [n for n in walk(pattern) if isinstance(n, DynamicPattern)]
    return len(nodes) == 1 and not isinstance(nodes[0], (VerticalSlash, Clusters, TopkKeys))


def backward_steps(steps: tuple[RoutingStep, ...], node, q_len: int, kv_len: int,
                   forward_tiles: tuple[int, int], dq_tiles: tuple[int, int],
                   dkdv_tiles: tuple[int, int]) -> tuple[RoutingStep, ...]:
    """What the routed backward adds to the forward's routing (no step routes again: the
    forward's selection is kept), for tiles ``(block_m, block_n)``: the selection laid out
    per dQ and per dK/dV query tile where their tiles differ from the forward's, and
    dK/dV's transpose of the latter, feeding the ``dq`` and ``dkdv`` kernels. Buckets
    and clusters: per key bucket, the query tiles listing it (a counting sort on the
    device); lines: the tile map turned around (per key tile, the query tiles a selected
    line crosses)."""
    lines = isinstance(node, VerticalSlash)
    if isinstance(node, Clusters):
        select = next(s for s in reversed(steps) if s.name.startswith("sort"))
    else:
        select = next(s for s in reversed(steps) if s.name.startswith(("select", "refine")))
    tag = _tag(select.name)
    forward_lists = f"tiles{tag}" if not isinstance(node, Clusters) else select.name
    out = []
    made = {}  # the layouts built so far, by what they depend on (lines: both tile sizes)

    def laid_out(tiles: tuple[int, int], name: str) -> str:
        key = tiles if lines else tiles[0]
        if key == (forward_tiles if lines else forward_tiles[0]):
            return forward_lists
        if key in made:
            return made[key]
        if lines:
            out.append(_tile_map(f"{name}{tag}", select.name, q_len, kv_len, *tiles))
        elif isinstance(node, Clusters):
            c = node.centroids.shape[1]
            out.append(RoutingStep(f"{name}{tag}", f"clusters per {tiles[0]}-row tile",
                                   (select.name,), f"cluster lists [{-(-q_len // tiles[0])}, <= {c}]",
                                   2 * q_len))
        else:
            out.append(_bucket_lists(f"{name}{tag}", select.name, node, q_len, kv_len, tiles[0]))
        made[key] = out[-1].name
        return out[-1].name

    dq_lists = laid_out(dq_tiles, "tiles_dq")
    kv_lists = laid_out(dkdv_tiles, "tiles_kv")
    q_tiles, kv_tiles = -(-q_len // dkdv_tiles[0]), -(-kv_len // dkdv_tiles[1])
    if lines:
        out.append(RoutingStep(f"transpose{tag}", "tile map turned around", (kv_lists,),
                               f"per key tile: byte map [{kv_tiles}, {q_tiles}] + spans",
                               2 * q_tiles * kv_tiles))
        out.append(RoutingStep("dq", "dQ kernel", (dq_lists, select.name), "dQ", 0))
        out.append(RoutingStep("dkdv", "dK/dV kernel", (f"transpose{tag}", select.name),
                               "dK, dV", 0))
        return tuple(out)
    if isinstance(node, Clusters):
        ck = node.centroids.shape[1]
        width = ck
    else:
        _, ck = _bucket_counts(node, q_len, kv_len)
        width = _list_width(node, q_len, kv_len, dkdv_tiles[0])[1]
    entries = q_tiles * width
    out.append(RoutingStep(f"transpose{tag}", "counting sort by key bucket", (kv_lists,),
                           f"CSR: pointers [{ck + 1}], query tiles [{entries}]",
                           entries * max(1, math.ceil(math.log2(max(entries, 2)))) + ck))
    out.append(RoutingStep("dq", "dQ kernel", (dq_lists,), "dQ", 0))
    out.append(RoutingStep("dkdv", "dK/dV kernel", (f"transpose{tag}", kv_lists), "dK, dV", 0))
    return tuple(out)


def _tile_map(name: str, source: str, q_len: int, kv_len: int, block_m: int,
              block_n: int) -> RoutingStep:
    q_tiles, kv_tiles = -(-q_len // block_m), -(-kv_len // block_n)
    return RoutingStep(name, "tiles the lines cross", (source,),
                       f"tile byte map [{q_tiles}, {kv_tiles}] + spans", 4 * q_tiles * kv_tiles)


def routing_dag(steps: tuple[RoutingStep, ...]) -> nx.DiGraph:
    """The steps as a networkx DAG ending in the ``attention`` node."""
    g = nx.DiGraph()
    for s in steps:
        g.add_node(s.name, step=s)
        for i in s.inputs:
            g.add_edge(i, s.name)
    for s in steps:
        if g.out_degree(s.name) == 0:  # the last step of each chain feeds the attention
            g.add_edge(s.name, "attention")
    assert nx.is_directed_acyclic_graph(g)
    return g


def kernel_routing_node(pattern: Pattern):
    """The routing node of a pattern the generated forward kernel runs (static segments
    plus selected tiles), or None when only the torch path runs it: one routing node
    and no per-head patterns."""
    nodes = {n for n in walk(pattern) if isinstance(n, DynamicPattern)}
    if len(nodes) != 1 or any(isinstance(n, PerHead) for n in walk(pattern)):
        return None
    node = next(iter(nodes))
    if isinstance(node, Clusters) and not cluster_kernel_ok(pattern, node):
        return None
    return node


def cluster_kernel_ok(pattern: Pattern, node) -> bool:
    """Clusters run sorted by cluster in the kernel when nothing else needs token order:
    nearest-centroid mode (a permutation; balanced clusters overlap), no static part
    outside the intersection, no documents, ALiBi, rel_bias or pair bias (softcap is fine:
    it reads no position)."""
    if node.balanced is not None or not isinstance(static_part(pattern), Empty):
        return False
    return not any(isinstance(n, (Documents, MaskTable, Alibi, RelBias, PairBias))
                   for n in walk(pattern))
