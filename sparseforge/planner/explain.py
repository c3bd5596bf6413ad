"""Human-readable plan report: what is visited, what is full, and how well tiles are used."""

from __future__ import annotations

import networkx as nx

from ..ir.routing import VerticalSlash
from .flex_blocks import flex_blocks
from .routing_steps import (
    backward_steps,
    has_routed_decode,
    kernel_routing_node,
)
from .symbolic import to_triton


def explain(plan) -> str:
    cfg = plan.config
    lq, lkv = plan.lengths
    run = "" if plan.layout is None else f" (run on {plan.q_len} x {plan.kv_len} tiled tokens)"
    value = ("" if plan.value_dim == plan.head_dim else
             f" Dv={plan.value_dim} (padded {plan.padded_value_dim})")
    lines = [
        f"pattern     {plan.pattern!r}",
        f"problem     Lq={lq} Lkv={lkv}{run} D={plan.head_dim} "
        f"(padded {plan.padded_head_dim}){value} {plan.dtype} target={plan.target}",
        f"tiles       BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} num_warps={cfg.num_warps} "
        f"num_stages={cfg.num_stages}",
    ]
    lines += _tile_choice_lines(plan)
    for n, k in enumerate(plan.kernels):
        st = plan.stats[n]
        heads = "all heads" if k.heads is None else f"heads {list(k.heads)}"
        perm = ("none" if k.groups == 1 else
                f"dilation groups: {k.groups} strided views (token t of group g = g + t*{k.groups})")
        if plan.layout is not None:
            qt, kt = plan.layout
            perm = (f"N-D tiles over grid {'x'.join(map(str, qt.shape))}: query tiles "
                    f"{_box(qt, cfg.block_m)}, key tiles {_box(kt, cfg.block_n)}, "
                    f"{qt.groups} dilation group(s) contiguous (Q, K, V gathered, output scattered)")
        lines += [
            f"kernel {n}    {heads}: {k.pattern!r}",
            f"  permutation  {perm}",
            f"  schedule     {k.schedule} ({_walk_text(k.walked_segments)} per query tile, "
            "bounds computed in-kernel: no index tensor)"
            + ("; document ids read per partial tile" if k.has_documents else ""),
        ]
        if k.narrowed_by_data:
            lines.append("  data ranges  segments of the pattern without its document ids / mask "
                         "tables, clamped per tile to the tiles that data allows and its full "
                         "tiles (computed once per data tensor)")
        if k.score.any:
            mods = [name for name, on in (("alibi", k.score.alibi),
                                          (_rel_bias_text(k.score), k.score.rel_bias),
                                          ("softcap", k.score.softcap)) if on]
            lines.append(f"  scores       {', '.join(mods)} on every visited pair (values are "
                         "run-time arguments)")
        for s, seg in enumerate(k.kernel_segments("walked_segments")):
            if seg.lets:  # N-D bounds: long closed forms over named intermediates
                family = f", {seg.runs} runs walked in a loop" if seg.runs > 1 else ""
                lines.append(f"  segment {s}    closed form over {len(seg.lets)} intermediates"
                             f"{family} (see the rendered kernel)")
                continue
            lines.append(f"  segment {s}    visit [{to_triton(seg.lo)}, {to_triton(seg.hi)})")
            lines.append(f"               full  [{to_triton(seg.full_lo)}, {to_triton(seg.full_hi)})")
        dense = st.q_tiles * st.kv_tiles
        lines += [
            f"  tiles        {st.visited} visited of {dense} ({100 * st.visited / max(1, dense):.1f}%)"
            f": {st.full} full (no mask), {st.partial} partial (predicate)",
            f"  density      {st.density:.4f} of the Lq x Lkv pairs are allowed",
            f"  utilisation  {st.utilisation:.3f} (useful pairs {st.useful_pairs} / computed "
            f"{st.computed_pairs})",
        ]
    if plan.routing_steps:
        lines += _routing_lines(plan)
        if kernel_routing_node(plan.pattern) is not None:
            lines.append(f"routed      the forward kernel walks the segments above (the static "
                         f"part {plan.kernels[0].static_mask!r}; tiles, density and utilisation "
                         "count it only), then per query tile the kv tiles its rows' selected "
                         "buckets or lines cross, each tile once")
            lines += _backward_lines(plan)
        else:
            lines.append("routed      no generated kernel (balanced clusters, two routing nodes or "
                         "per-head patterns): torch ops run it (dense per row chunk); the kernels "
                         "above cover its static envelope")
        lines.append("flex        (no BlockMask comparison: the mask is decided from q and k at "
                     "run time)")
        return "\n".join(lines)
    flex = flex_blocks(plan.pattern, lq, lkv)
    if flex is None:
        lines.append("flex        (BlockMask comparison skipped: mask too large to evaluate densely)")
    else:
        mine = plan.stats[0].utilisation if len(plan.kernels) == 1 else None
        ratio = (f"; this plan's is {mine / flex.utilisation:.1f}x that" if mine and flex.utilisation
                 else "")
        lines.append(f"flex        FlexAttention BlockMask ({flex.block}x{flex.block}, original order): "
                     f"{flex.visited} blocks visited, {flex.full} full, utilisation "
                     f"{flex.utilisation:.3f}{ratio}")
    return "\n".join(lines)


def _tile_choice_lines(plan) -> list[str]:
    """Why these tiles: every priced candidate's estimated cost, cheapest first, and what
    the price is made of (issue work from compiled SASS, or a rule of thumb)."""
    if len(plan.tile_choices) < 2:
        return []
    chosen = min(plan.tile_choices, key=lambda c: c.cost)
    lines = ["  why         cheapest estimated issue work of the candidates (thousands of "
             "warp-instructions; full/partial tile work per 1k scores from compiled SASS)"]
    for c in sorted(plan.tile_choices, key=lambda c: c.cost):
        cfg = c.config
        work = ("no SASS price" if cfg.full_work is None
                else f"full {cfg.full_work:.0f}, partial {cfg.partial_work:.0f}")
        mark = "<- chosen" if c is chosen else ""
        layout = " tiled" if c.tiled else ""
        tile = f"{cfg.block_m}x{cfg.block_n} {cfg.num_warps}w{layout}"
        lines.append(f"              {tile:16} {c.cost:12.1f}  ({work}) {mark}".rstrip())
    return lines


def _walk_text(segments) -> str:
    """How many ranges a kernel walks: a lone segment family is one loop over its runs."""
    if len(segments) == 1 and segments[0].runs > 1:
        return f"1 segment of {segments[0].runs} runs"
    return f"{len(segments)} segment(s)"


def _box(tiling, block: int) -> str:
    """A kernel tile of ``block`` tokens as an N-D box."""
    ratio = block // tiling.tile_size
    return "x".join(map(str, tiling.tile[:-1] + (tiling.tile[-1] * ratio,)))


def _rel_bias_text(score) -> str:
    grid = score.rel_grid
    if grid is None:
        return f"rel_bias (token offsets, R={score.rel_radius})"
    extents = "x".join(str(2 * h + 1) for h in grid.halves)
    how = "clipped per dimension" if grid.clipped else "inside the windows: one difference per pair"
    return f"rel_bias (window offsets {extents} on grid {'x'.join(map(str, grid.shape))}, {how})"


def _backward_lines(plan) -> list[str]:
    """How a routed plan with a kernel trains: its generated backward's steps (the
    forward's selection laid out for the backward's tiles and transposed for dK/dV)."""
    node = kernel_routing_node(plan.pattern)
    dq, dkdv = plan.backward_dq, plan.backward_dkdv
    steps = backward_steps(plan.routing_steps, node, plan.q_len, plan.kv_len,
                           (plan.block_m, plan.block_n), (dq.block_m, dq.block_n),
                           (dkdv.block_m, dkdv.block_n))
    turned = ("per key tile the query tiles its map marks" if isinstance(node, VerticalSlash)
              else "per key bucket the query tiles that selected it")
    decode = ("the split-KV decode kernel walks each routing head's selected tiles per split"
              if has_routed_decode(plan.pattern) else "the forward kernel")
    lines = [f"backward    generated, on the forward's selection (no gradient flows through "
             f"the routing): dQ {dq.block_m}x{dq.block_n} walks the static segments and "
             f"each query tile's selected tiles; dK/dV {dkdv.block_m}x{dkdv.block_n} walks the "
             f"static part's inverted bounds, then {turned}, each once; deterministic, no "
             f"atomics; decode (1-16 new tokens): {decode}"]
    for s in steps:
        lines.append(f"  {s.name:10s} {s.op:32s} <- {', '.join(s.inputs):18s} -> {s.output}"
                     + (f" ({s.work} ops)" if s.work else ""))
    return lines


def _routing_lines(plan) -> list[str]:
    """The routing pre-kernel DAG, in dependency order, with each step's work."""
    dag = plan.routing_dag
    steps = {s.name: s for s in plan.routing_steps}
    total = sum(s.work for s in plan.routing_steps)
    lines = [f"routing     {len(plan.routing_steps)} pre-kernel(s), DAG {dag.number_of_nodes()} nodes / "
             f"{dag.number_of_edges()} edges, {total} ops per (batch, head); generated "
             "pre-kernels on CUDA (or the interpreter with backend='triton'; topk_keys "
             "selects and clusters sort with device torch ops), the torch reference on the "
             "torch backend"]
    for name in nx.topological_sort(dag):
        if name in steps:
            s = steps[name]
            lines.append(f"  {s.name:10s} {s.op:32s} <- {', '.join(s.inputs):18s} -> {s.output} "
                         f"({s.work} ops)")
    lines.append(f"  attention  <- {', '.join(n for n in dag.predecessors('attention'))}")
    return lines
