"""Generate the planner's tile cost table from compiled SASS (no GPU needed).

    python -m sparseforge.aot.tile_costs            # rewrites sparseforge/planner/tile_costs.json

For every 16-bit GPU tile candidate of the planner (``planner/tiles.py``), per arch and
padded head dim, it compiles the forward kernel of ``sliding_window(1024)`` at
L = 8192 in bf16 (a pattern with both full and partial tiles) and reads, from the SASS
(``runtime/sass.py``), the issue work of the full-tile loop and the mean of the partial
loops: warp-instructions per loop iteration per 1000 scores. The planner prices a
schedule with them (``planner.tiles.estimated_cost``), so a tile shape is chosen by
what it costs on the target, not by how well it fills with allowed pairs alone.
Registers and spill bytes are kept beside the costs for people.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import triton

from ..ir.nodes import sliding_window
from ..planner.plan import plan
from ..planner.tiles import COST_TABLE_PATH, gpu_candidates
from ..runtime.sass import kernel_report

LENGTH = 8192
WINDOW = 1024


def measure(arch: str, head_dim: int, config) -> dict:
    """One table entry: the candidate's forward kernel compiled for ``arch``."""
    p = plan(sliding_window(WINDOW), q_len=LENGTH, kv_len=LENGTH, head_dim=head_dim,
             dtype="bfloat16", target=arch, block_m=config.block_m, block_n=config.block_n)
    p = dataclasses.replace(p, config=dataclasses.replace(
        p.config, num_warps=config.num_warps, num_stages=config.num_stages))
    report, = kernel_report(p, archs=(arch,), kinds=("forward",))
    partial = [w for w in report.loop_work if w != report.full_tile_work] or [report.full_tile_work]
    return dict(arch=arch, head_dim=head_dim, block_m=config.block_m, block_n=config.block_n,
                num_warps=config.num_warps, num_stages=config.num_stages,
                full=report.full_tile_work, partial=round(sum(partial) / len(partial), 1),
                registers=report.registers, spill_bytes=report.spill_bytes)


def generate() -> dict:
    entries = [measure(arch, d, cfg) for (arch, d), configs in sorted(gpu_candidates().items())
               for cfg in configs]
    return {"generated_by": "python -m sparseforge.aot.tile_costs", "triton": triton.__version__,
            "pattern": f"sliding_window({WINDOW}), L={LENGTH}, bfloat16, forward",
            "unit": "warp-instructions per loop iteration per 1000 scores", "entries": entries}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=COST_TABLE_PATH, help="where to write the table")
    args = parser.parse_args(argv)
    table = generate()
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(table['entries'])} entries to {args.out}")


if __name__ == "__main__":
    main()
