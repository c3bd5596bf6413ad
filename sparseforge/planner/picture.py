"""Plan pictures: the mask with the tile grid over it, visited tiles shaded by kind."""

from __future__ import annotations

import numpy as np


def save_png(plan, path, *, max_tokens: int = 1024) -> None:
    """Draw kernel 0's mask (first ``max_tokens`` rows/cols) and its tile classification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..reference import dense_mask

    kernel = plan.kernels[0]
    lq, lkv = min(plan.q_len, max_tokens), min(plan.kv_len, max_tokens)
    mask = dense_mask(kernel.pattern, plan.q_len, plan.kv_len)
    while mask.dim() > 2:
        mask = mask[0]
    mask = mask[:lq, :lkv].numpy()
    fig, ax = plt.subplots(figsize=(7, 7 * max(lq, 1) / max(lkv, 1) + 0.6))
    ax.imshow(mask, cmap="Greys", interpolation="nearest", vmin=0, vmax=1.6)
    bm, bn = plan.block_m, plan.block_n
    if kernel.groups == 1:
        sched = plan.schedules[0][0]
        visit, full = sched.visit, sched.full
        for m, n in zip(*np.nonzero(visit)):
            if m * bm >= lq or n * bn >= lkv:
                continue
            colour = "tab:green" if full[m, n] else "tab:orange"
            ax.add_patch(Rectangle((n * bn - 0.5, m * bm - 0.5), bn, bm, fill=True, alpha=0.25,
                                   color=colour, lw=0))
        title = "green: full tiles, orange: partial tiles, white: skipped"
    else:
        title = f"dilation groups ({kernel.groups}) are tiled as strided views; mask shown"
    for x in range(0, lkv + 1, bn):
        ax.axvline(x - 0.5, color="tab:blue", lw=0.3)
    for y in range(0, lq + 1, bm):
        ax.axhline(y - 0.5, color="tab:blue", lw=0.3)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(f"{kernel.pattern!r}\n{title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
