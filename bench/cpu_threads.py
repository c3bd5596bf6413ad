"""Does the CPU executor hold up on a shared machine? sparseforge's forward on four masks
(B=1, H=4, L=4096, D=64, fp32), quiet, then with another process keeping every core busy
(a torch matmul loop), then quiet again — with the executor's units on its worker pool
(the default) and, for comparison, the same units run one after another in the calling
thread with PyTorch's own intra-op threads. Prints one line per mode; the "ratio" is busy
over the better quiet spell. Run from the repository root:

    python bench/cpu_threads.py [--repeats 9]
"""

import argparse
import subprocess
import sys
import time

import torch

import sparseforge as sf
from sparseforge.cpu_bench import LOAD_SCRIPT, cases, timed
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = [torch.randn(1, 4, 4096, 64) for _ in range(3)]
    modes = {"worker pool": cpu_threads.run_units, "intra-op threads": inline}
    quiet = spell(modes, inputs, args.repeats)
    load = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT])
    try:
        time.sleep(2.0)
        busy = spell(modes, inputs, args.repeats)
    finally:
        load.kill()
        load.wait()
    again = spell(modes, inputs, args.repeats)
    print("cases:", ", ".join(name for name, _, _ in cases()))
    for mode in modes:
        ratios = [b / min(a, c) for a, b, c in zip(quiet[mode], busy[mode], again[mode])]
        print(f"{mode:17s} quiet {[round(x, 1) for x in quiet[mode]]} "
              f"{[round(x, 1) for x in again[mode]]} busy {[round(x, 1) for x in busy[mode]]} "
              f"ratio {[round(r, 2) for r in ratios]}")


if __name__ == "__main__":
    main()
