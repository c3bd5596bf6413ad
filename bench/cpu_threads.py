"""Does the CPU executor hold up on a shared machine, and what bounds it? sparseforge's
forward on four masks (B=1, H=4, L=4096, D=64, fp32), quiet, then with another process
keeping every core busy (a 2-thread torch matmul loop), then quiet again, in three modes:

- ``worker pool``: the default, the executor's units on ``torch.get_num_threads()``
  single-threaded workers;
- ``pool, 2x threads``: the same units on twice as many workers (more runnable threads
  than cores: under a fair scheduler it takes more than half the cores from the load);
- ``intra-op threads``: the units one after another in the calling thread, each using
  PyTorch's own intra-op threads.

It also times the forward quiet on one thread: ``scaling`` = one-thread time over the
default quiet time. Under a fair scheduler the default mode's busy/quiet ratio cannot be
below about ``scaling`` (its threads get one core's worth between them, and one core's
worth is the one-thread time), which is why a faster parallel executor shows a larger
busy/quiet ratio. Each "ratio" is busy over the better quiet spell. Run from the
repository root:

    python bench/cpu_threads.py [--repeats 9] [--rounds 2] [--out bench/results/cpu_threads.json]
"""

import argparse
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import sparseforge as sf
from sparseforge.benchmarks import save_result
from sparseforge.cpu_bench import LOAD_SCRIPT, cases, machine_speed, timed
from sparseforge.runtime import cpu_flash, cpu_threads


def inline(units):
    for unit in units:
        unit()


def spell(modes, inputs, repeats):
    out = {}
    for mode, runner in modes.items():
        cpu_flash.run_units = runner
        out[mode] = [timed(lambda p=p: sf.attention(*inputs, p), repeats)["median_ms"]
                     for _, p, _ in cases()]
    cpu_flash.run_units = cpu_threads.run_units
    return out


def one_thread(inputs, repeats):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [timed(lambda p=p: sf.attention(*inputs, p), repeats)["median_ms"]
                for _, p, _ in cases()]
    finally:
        torch.set_num_threads(threads)


def one_round(modes, inputs, repeats):
    quiet = spell(modes, inputs, repeats)
    single = one_thread(inputs, repeats)
    load = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT])
    try:
        time.sleep(2.0)
        busy = spell(modes, inputs, repeats)
    finally:
        load.kill()
        load.wait()
    again = spell(modes, inputs, repeats)
    rows = {}
    for mode in modes:
        best = [min(a, c) for a, c in zip(quiet[mode], again[mode])]
        rows[mode] = {"quiet_ms": quiet[mode], "quiet_again_ms": again[mode],
                      "busy_ms": busy[mode],
                      "busy_over_quiet": [b / q for b, q in zip(busy[mode], best)]}
    default = [min(a, c) for a, c in zip(quiet["worker pool"], again["worker pool"])]
    return {"one_thread_quiet_ms": single,
            "scaling": [s / q for s, q in zip(single, default)], "modes": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="write the rounds as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = [torch.randn(1, 4, 4096, 64) for _ in range(3)]
    threads = torch.get_num_threads()
    modes = {"worker pool": cpu_threads.run_units,
             "pool, 2x threads": partial(cpu_threads.run_units, workers=2 * threads),
             "intra-op threads": inline}
    before = machine_speed()
    rounds = [one_round(modes, inputs, args.repeats) for _ in range(args.rounds)]
    names = [name for name, _, _ in cases()]
    print("cases:", ", ".join(names), f"({threads} threads)")
    for i, r in enumerate(rounds):
        print(f"round {i}: one thread {[round(x, 1) for x in r['one_thread_quiet_ms']]} "
              f"scaling {[round(x, 2) for x in r['scaling']]}")
        for mode, row in r["modes"].items():
            print(f"  {mode:17s} quiet {[round(x, 1) for x in row['quiet_ms']]} "
                  f"{[round(x, 1) for x in row['quiet_again_ms']]} "
                  f"busy {[round(x, 1) for x in row['busy_ms']]} "
                  f"ratio {[round(x, 2) for x in row['busy_over_quiet']]}")
    if args.out:
        median = {mode: [statistics.median(r["modes"][mode]["busy_over_quiet"][i]
                                           for r in rounds) for i in range(len(names))]
                  for mode in modes}
        save_result({"benchmark": "cpu_threads", "cases": names, "threads": threads,
                     "shape": "B=1, H=4, L=4096, D=64, fp32, forward", "repeats": args.repeats,
                     "busy_load": LOAD_SCRIPT, "machine_matmul_ms_before": before,
                     "machine_matmul_ms_after": machine_speed(), "rounds": rounds,
                     "median_busy_over_quiet": median},
                    str(Path(args.out).parent), Path(args.out).stem)


if __name__ == "__main__":
    main()
