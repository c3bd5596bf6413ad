"""A shard layout drawn: who holds which block, and what each rank receives from whom."""

from __future__ import annotations

import numpy as np


def save_png(layout, path) -> None:
    """Top: the sequence's blocks coloured by owning rank, with each rank's work. Below,
    one row per rank: its own blocks (its colour), the blocks it receives (its colour,
    faint) and those it never sees (white); the bytes a ring would move are the
    whole row outside its own blocks."""
    import matplotlib  # optional heavy dependency: only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, to_rgba

    world, n = layout.world_size, layout.n_blocks
    owner = np.asarray(layout.owner)
    palette = [to_rgba(plt.get_cmap("tab10")(r % 10)) for r in range(world)]
    grid = np.ones((world, n, 4))
    for r in range(world):
        grid[r, owner == r] = palette[r]
        for s in range(world):
            for b in layout.needs[r][s]:
                grid[r, b] = (*palette[s][:3], 0.35)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 1.2 + 0.35 * world),
                                      height_ratios=[1, max(world, 2)], sharex=True)
    top.imshow(owner[None], cmap=ListedColormap(palette), vmin=0, vmax=world - 1,
               aspect="auto", interpolation="nearest")
    top.set_yticks([])
    top.set_title(f"{layout.kind} layout of {layout.seq_len} tokens ({n} blocks of "
                  f"{layout.block}) over {world} ranks; work max/mean {layout.balance:.3f}\n"
                  f"{layout.pattern!r}", fontsize=8)
    bottom.imshow(grid, aspect="auto", interpolation="nearest")
    bottom.set_yticks(range(world))
    bottom.set_yticklabels([f"rank {r}: receives {layout.received_tokens(r)} "
                            f"(ring {layout.ring_tokens(r)})" for r in range(world)], fontsize=7)
    bottom.set_xlabel("block (solid: held; faint: received from the rank of that colour; "
                      "white: never sent)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
