"""Human-readable plan report: what is visited, what is full, and how well tiles are used."""

from __future__ import annotations

from .symbolic import to_triton


def explain(plan) -> str:
    cfg = plan.config
    lines = [
        f"pattern     {plan.pattern!r}",
        f"problem     Lq={plan.q_len} Lkv={plan.kv_len} D={plan.head_dim} "
        f"(padded {plan.padded_head_dim}) {plan.dtype} target={plan.target}",
        f"tiles       BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} num_warps={cfg.num_warps} "
        f"num_stages={cfg.num_stages}",
    ]
    for n, k in enumerate(plan.kernels):
        st = plan.stats[n]
        heads = "all heads" if k.heads is None else f"heads {list(k.heads)}"
        perm = ("none" if k.groups == 1 else
                f"dilation groups: {k.groups} strided views (token t of group g = g + t*{k.groups})")
        lines += [
            f"kernel {n}    {heads}: {k.pattern!r}",
            f"  permutation  {perm}",
            f"  schedule     {k.schedule} ({len(k.walked_segments)} segment(s) per query tile, "
            "bounds computed in-kernel: no index tensor)"
            + ("; document ids read per partial tile" if k.has_documents else ""),
        ]
        if k.score.any:
            mods = [name for name, on in (("alibi", k.score.alibi),
                                          (f"rel_bias (R={k.score.rel_radius})", k.score.rel_bias),
                                          ("softcap", k.score.softcap)) if on]
            lines.append(f"  scores       {', '.join(mods)} on every visited pair (values are "
                         "run-time arguments)")
        for s, seg in enumerate(k.walked_segments):
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
    return "\n".join(lines)
