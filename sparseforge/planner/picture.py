"""Plan pictures: which tiles kernel 0 visits, full or partial, and where it fits the
pairs themselves.

A problem of up to ``max_tokens`` rows and columns is drawn token by token (the mask
from ``semantics.pair_mask``) with the tiles over it; a larger one at tile resolution
(one cell per tile, from the plan's visit matrices), so a 32k x 32k plan draws in well
under a second instead of evaluating a billion pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ir.routing import is_dynamic
from ..semantics import pair_mask

#: tile classes, as drawn: skipped, partial (predicate applied), full (no mask)
_SKIPPED, _PARTIAL, _FULL = 0, 1, 2


def tile_classes(plan) -> np.ndarray:
    """``[Tq, Tk]`` tile classes of kernel 0 (original order, or the tiled layout's run
    order): skipped, partial or full."""
    sched = plan.schedules[0][0]
    return np.where(sched.full, _FULL, np.where(sched.visit, _PARTIAL, _SKIPPED))


def save_png(plan, path, *, max_tokens: int = 1024) -> None:
    """Draw kernel 0's tiles (and its mask when the problem is at most ``max_tokens``)."""
    import matplotlib  # optional heavy dependency: only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    kernel = plan.kernels[0]
    bm, bn = plan.block_m, plan.block_n
    tokens = (plan.q_len <= max_tokens and plan.kv_len <= max_tokens
              and not is_dynamic(kernel.pattern) and kernel.groups == 1)
    classes = tile_classes(plan) if kernel.groups == 1 else None
    rows, cols = (plan.q_len, plan.kv_len) if tokens else (classes.shape if classes is not None
                                                          else (1, 1))
    fig, ax = plt.subplots(figsize=(7, 7 * max(rows, 1) / max(cols, 1) + 0.6))
    colours = ListedColormap(["white", "tab:orange", "tab:green"])
    if tokens:
        i = torch.arange(plan.q_len)[:, None]
        j = torch.arange(plan.kv_len)[None, :]
        mask = pair_mask(kernel.pattern, i, j, plan.q_len, plan.kv_len)
        while mask.dim() > 2:
            mask = mask[0]
        ax.imshow(mask.numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1.6)
        if classes is not None:
            cells = np.kron(classes, np.ones((bm, bn)))[:plan.q_len, :plan.kv_len]
            ax.imshow(np.ma.masked_equal(cells, _SKIPPED), cmap=colours, vmin=0, vmax=2,
                      alpha=0.3, interpolation="nearest")
        for x in range(0, plan.kv_len + 1, bn):
            ax.axvline(x - 0.5, color="tab:blue", lw=0.3)
        for y in range(0, plan.q_len + 1, bm):
            ax.axhline(y - 0.5, color="tab:blue", lw=0.3)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        title = "mask in grey; green: full tiles, orange: partial tiles, white: skipped"
    elif classes is not None:
        ax.imshow(classes, cmap=colours, vmin=0, vmax=2, interpolation="nearest")
        ax.set_xlabel(f"key tile ({bn} keys)")
        ax.set_ylabel(f"query tile ({bm} rows)")
        title = "one cell per tile: green full, orange partial, white skipped"
    else:
        title = f"dilation groups ({kernel.groups}) are tiled as strided views: not drawn"
    if is_dynamic(kernel.pattern):
        title += "\n(the static part's tiles; routed tiles are chosen at run time)"
    ax.set_title(f"{kernel.pattern!r}\n{title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
