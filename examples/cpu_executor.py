"""The CPU executor on four masks: exactness (forward and gradients against the fp64
oracle), time beside dense SDPA, and what the executor's programs compute.

    python examples/cpu_executor.py [--length 1024] [--png cpu_programs.png]

Each program cuts the tile schedule into batches of query tiles that see one window of
kv tiles (prefixes for causal and documents, a moving band for sliding windows), and
each window into pieces: full tiles with no mask, masked edges (one shared mask for a
band), causal diagonals in the fused kernel's causal mode. ``--png`` draws them.
"""

import argparse

import numpy as np
import torch

import sparseforge as sf
from sparseforge.cpu_bench import timed
from sparseforge.runtime import cpu_program, dispatch


def masks(length: int):
    lengths = [length // 2, length // 4, length * 5 // 32]
    lengths.append(length - sum(lengths))
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    side = int(length ** 0.5)
    return {"sliding_window(256)": sf.sliding_window(256), "causal()": sf.causal(),
            f"neighborhood(({side}, {side}), 7)": sf.neighborhood((side, side), 7),
            f"documents({'+'.join(map(str, lengths))})": sf.documents(ids)}


def times(q, k, v, pattern, n):
    """Median ms of sparseforge and of dense SDPA with the boolean mask."""
    mask = sf.dense_mask(pattern, n, n).reshape(n, n)
    ours = timed(lambda: sf.attention(q, k, v, pattern), 3)["median_ms"]
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                 3)["median_ms"]
    return ours, sdpa


def program_of(pattern, length):
    """The first kernel's program (of its first dilation group and batch row)."""
    plan = sf.plan(pattern, q_len=length, kv_len=length, head_dim=64, dtype="float32", target="cpu")
    compiled = dispatch.compile_pattern(pattern)
    (_, program), *_ = cpu_program.programs(plan, 0, 0, plan.kernels[0],
                                            compiled.head_patterns[0], plan.schedules[0][0])
    return plan, program


def describe(program) -> str:
    pieces = [p for b in program.batches for w in b.windows for p in w.pieces]
    bands = sum(any(w.step > 0 for w in b.windows) for b in program.batches)
    return (f"{len(program.batches)} batches ({bands} with a band), "
            f"{len(pieces)} kernel calls: {sum(p.allowed is None and not p.causal for p in pieces)} "
            f"unmasked, {sum(p.causal for p in pieces)} causal-mode, "
            f"{sum(p.allowed is not None for p in pieces)} masked")


def draw(programs, path):
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    fig, axes = plt.subplots(1, len(programs), figsize=(4 * len(programs), 4.2))
    for ax, (name, program) in zip(np.atleast_1d(axes), programs.items()):
        grid = np.zeros((program.q_tiles, program.kv_tiles))
        for b in program.batches:
            for window, piece in ((w, p) for w in b.windows for p in w.pieces):
                kind = 3 if piece.causal else 2 if piece.allowed is not None else 1
                for i in range(b.count):
                    lo = window.start + window.step * i + piece.col
                    cols = np.arange(max(lo, 0), min(lo + piece.width, program.kv_tiles))
                    if piece.causal:  # the kernel skips the tiles above the diagonal
                        cols = cols[cols - lo <= i]
                    grid[b.first + i, cols] = kind
            ax.axhline(b.first - 0.5, color="black", linewidth=0.6)
        ax.imshow(grid, cmap=ListedColormap(["white", "#4daf4a", "#ff7f00", "#377eb8"]),
                  vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("kv tile")
        ax.set_ylabel("query tile")
    fig.suptitle("CPU programs: green no mask, orange masked edge, blue causal mode; "
                 "lines: batches", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--png", help="draw the programs to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.length
    programs = {}
    for name, pattern in masks(n).items():
        q, k, v = (torch.randn(1, 4, n, 64, requires_grad=True) for _ in range(3))
        out = sf.attention(q, k, v, pattern)
        out.square().sum().backward()
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = sf.reference_attention(*leaves, pattern)
        ref.square().sum().backward()
        grad_err = max((a.grad.double() - b.grad).abs().max().item() for a, b in zip((q, k, v), leaves))
        ours, sdpa = times(q.detach(), k.detach(), v.detach(), pattern, n)
        plan, program = program_of(pattern, n)
        if plan.layout is None:
            programs[name] = program
        print(f"{name}: sparseforge {ours:.1f} ms, dense SDPA {sdpa:.1f} ms; "
              f"max |error| vs the fp64 oracle: {(out.double() - ref).abs().max().item():.1e}; "
              f"gradient error: {grad_err:.1e}")
        print(f"  program: {describe(program)}")
    if args.png:
        draw(programs, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
