"""Tiles visited by sparseforge's kernels against the blocks of FlexAttention's
``BlockMask``, for every mask of the Flex corpus (``tests/flex/corpus.py``).

    python bench/flex_corpus_tiles.py [--scale 64] [--out bench/results/flex_corpus_tiles.json]

At ``--scale 64`` the corpus runs at lengths 1856 to 4224 (documents of 1152 to 2304
tokens, windows of 512 to 1536). For each mask, on the first batch row, summed over its
two heads:

* Flex: ``create_block_mask(mask_mod, 2, 2, Lq, Lkv)`` (128 x 128 blocks): the blocks it
  visits (``kv_num_blocks + full_kv_num_blocks``) and those it runs without the mask
  (``full_kv_num_blocks``);
* sparseforge: ``sf.plan(sf.from_mask_mod(mask_mod), ...)`` on sm_90 with 128 x 128
  tiles (the same grid as Flex; a mask table needs key tiles of 64, so its 128 x 64
  tiles count half a block each), its tile statistics (``plan.stats``: the tiles the
  generated forward kernel walks, with document ids and mask tables applied as the
  kernels apply them per tile), and the plan's own tile choice in work units of
  128 x 128 blocks.

Nothing here runs a kernel: these are counts, the same on any machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import torch
import triton
from torch.nn.attention import flex_attention as flex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the corpus lives in tests/

import sparseforge as sf  # noqa: E402
from tests.flex.corpus import B, H, mask_corpus  # noqa: E402

FLEX_BLOCK = 128


def flex_counts(entry) -> tuple[int, int]:
    """(visited, full) blocks of Flex's BlockMask on batch row 0, summed over heads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = flex.create_block_mask(entry.mask_mod, B, H, entry.q_len, entry.kv_len,
                                      device="cpu")
    partial = int(mask.kv_num_blocks[0].sum())
    full = int(mask.full_kv_num_blocks[0].sum()) if mask.full_kv_num_blocks is not None else 0
    return partial + full, full


def plan_counts(plan) -> tuple[int, int, int]:
    """(visited, full, useful pairs) of a plan's kernels, summed over the heads each serves."""
    visited = full = useful = 0
    for kernel, stats in zip(plan.kernels, plan.stats):
        heads = H if kernel.heads is None else len(kernel.heads)
        visited += stats.visited * heads
        full += stats.full * heads
        useful += stats.useful_pairs * heads
    return visited, full, useful


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "flex_corpus_tiles.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'mask':28s} {'Lq':>5s} {'Lkv':>5s} | {'Flex':>5s} {'full':>5s} | "
          f"{'sf 128':>6s} {'full':>5s} | {'sf plan':>8s} {'tile':>7s} | recognised as")
    for name, entry in mask_corpus(args.scale).items():
        pattern = sf.from_mask_mod(entry.mask_mod, **entry.keywords)
        try:
            same_grid = sf.plan(pattern, q_len=entry.q_len, kv_len=entry.kv_len, head_dim=64,
                                target="sm_90", block_m=FLEX_BLOCK, block_n=FLEX_BLOCK)
        except ValueError:  # mask tables need key tiles of at most 64: count 128 x 64 tiles
            same_grid = sf.plan(pattern, q_len=entry.q_len, kv_len=entry.kv_len, head_dim=64,
                                target="sm_90", block_m=FLEX_BLOCK, block_n=FLEX_BLOCK // 2)
        chosen = sf.plan(pattern, q_len=entry.q_len, kv_len=entry.kv_len, head_dim=64,
                         target="sm_90")
        f_visited, f_full = flex_counts(entry)
        s_visited, s_full, useful = plan_counts(same_grid)
        halves = FLEX_BLOCK // same_grid.block_n  # 128 x 64 tiles: two per Flex block
        s_visited, s_full = s_visited / halves, s_full / halves
        c_visited, c_full, _ = plan_counts(chosen)
        c_blocks = c_visited * chosen.block_m * chosen.block_n / FLEX_BLOCK ** 2
        row = {"mask": name, "q_len": entry.q_len, "kv_len": entry.kv_len,
               "pattern": repr(pattern), "useful_pairs": useful,
               "flex_blocks": f_visited, "flex_full_blocks": f_full,
               "sparseforge_tiles_128": s_visited, "sparseforge_full_tiles_128": s_full,
               "same_grid_tile": [same_grid.block_m, same_grid.block_n],
               "sparseforge_plan_tile": [chosen.block_m, chosen.block_n],
               "sparseforge_plan_tiles": c_visited, "sparseforge_plan_full_tiles": c_full,
               "sparseforge_plan_work_in_128_blocks": c_blocks,
               "tiles_128_over_flex_blocks": s_visited / f_visited if f_visited else None}
        rows.append(row)
        tile = f"{chosen.block_m}x{chosen.block_n}"
        print(f"{name:28s} {entry.q_len:5d} {entry.kv_len:5d} | {f_visited:5d} {f_full:5d} | "
              f"{s_visited:6g} {s_full:5g} | {c_blocks:8.1f} {tile:>7s} | {row['pattern'][:60]}")
    equal = sum(r["sparseforge_tiles_128"] == r["flex_blocks"] for r in rows)
    fewer = sum(r["sparseforge_tiles_128"] < r["flex_blocks"] for r in rows)
    print(f"{equal} of {len(rows)} masks visit as many 128 x 128 tiles as Flex, {fewer} fewer, "
          f"{len(rows) - equal - fewer} more")
    result = {"device": "none: counts from plans and block masks, no kernel run (computed on "
                        f"{platform.machine()} CPU)",
              "what": "tiles visited (counts, no kernel run): sparseforge plan stats on sm_90 vs "
                      "Flex create_block_mask blocks, batch row 0, summed over heads",
              "scale": args.scale, "torch": torch.__version__, "triton": triton.__version__,
              "sparseforge": sf.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
