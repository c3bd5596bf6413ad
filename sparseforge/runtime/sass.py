"""What a compiled kernel costs, read from its SASS: no GPU needed.

A FlashAttention-style kernel spends its time in one loop: the walk over full tiles,
where every score is computed with no mask arithmetic. How many instructions that loop
issues per score is a good static measure of its speed on a given tile shape (the
tensor cores do the same work whatever the code around them does; everything else in
the loop is issue slots the warps spend on it). This module finds that loop:

- ``nvdisasm -c`` (shipped in Triton's wheel) prints the SASS with branch labels;
- a loop is a back-edge branch (BRA to a label at a lower or equal address), an
  innermost loop one that holds no other;
- tensor-core loops are innermost loops with HGMMA (sm_90 wgmma) or HMMA (mma.sync);
- the full-tile loop is the leanest of them (the partial-tile loops add the predicate).

Its issue work is ``instructions x num_warps / (BLOCK_M x BLOCK_N) x 1000``:
warp-instructions per loop iteration per 1000 scores. ``kernel_report`` reads it, with
registers, spills, shared memory and HGMMA/TMA use, for every kernel of a plan; the
planner's tile cost table (``planner/tile_costs.json``, from ``bench/tile_costs.py``)
is made of these numbers.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

from ..codegen.render import kind_config
from ..planner.plan import Plan
from .binary_cache import cached_binary
from .compile import nvidia_tool

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+`\((\.L_x_\d+)\)")
#: instruction classes counted per loop (by opcode prefix)
OPCODE_CLASSES = {
    "HGMMA": ("HGMMA",), "HMMA": ("HMMA",), "MUFU": ("MUFU",), "FMNMX": ("FMNMX",),
    "LDG": ("LDG",), "LDGSTS": ("LDGSTS",), "TMA": ("UTMALDG", "UBLKCP"),
    "BAR/SYNCS": ("BAR", "SYNCS"), "int addr": ("IMAD", "IADD3", "LEA"),
    "FMUL/FFMA/FADD": ("FMUL", "FFMA", "FADD"), "FSEL": ("FSEL",), "ISETP": ("ISETP",),
    "STL/LDL": ("STL", "LDL"),
}


@dataclass(frozen=True)
class Loop:
    """One innermost tensor-core loop: its address range and instruction counts."""

    start: int
    end: int
    instructions: int
    counts: dict

    def work(self, num_warps: int, block_m: int, block_n: int) -> float:
        """Warp-instructions issued per iteration per 1000 scores of a tile."""
        return self.instructions * num_warps / (block_m * block_n) * 1000


def disassemble(cubin: bytes) -> str:
    """The cubin's SASS with branch labels (``nvdisasm -c``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True,
                              text=True, check=True).stdout


def _instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, opcode) of every instruction, and each label's address."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        address, text = int(match.group(1), 16), match.group(2)
        for name in pending:
            labels[name] = address
        pending = []
        body = text.split(None, 1)[1] if text.startswith("@") else text  # drop the predicate
        instructions.append((address, body))
    return instructions, labels


def tensor_core_loops(sass: str) -> list[Loop]:
    """Innermost loops holding HGMMA or HMMA, in address order."""
    instructions, labels = _instructions(sass)
    edges = sorted({(labels[m.group(1)], address) for address, text in instructions
                    for m in _BRANCH.finditer(text)
                    if m.group(1) in labels and labels[m.group(1)] <= address})
    loops = []
    for lo, hi in edges:
        if any(e != (lo, hi) and lo <= e[0] and e[1] <= hi for e in edges):
            continue  # holds another loop: not innermost
        opcodes = [text.split()[0].split(".")[0] for address, text in instructions
                   if lo <= address <= hi]
        counts = collections.Counter()
        for op in opcodes:
            for name, prefixes in OPCODE_CLASSES.items():
                if op in prefixes:
                    counts[name] += 1
        if counts["HGMMA"] or counts["HMMA"]:
            loops.append(Loop(lo, hi, len(opcodes), dict(counts)))
    return loops


def full_tile_loop(loops: list[Loop]) -> Loop | None:
    """The leanest tensor-core loop: the walk over full tiles (no predicate)."""
    return min(loops, key=lambda loop: loop.instructions, default=None)


@dataclass(frozen=True)
class KernelReport:
    """What one compiled kernel uses and issues. ``full_tile_work``: warp-instructions
    per full-tile iteration per 1000 scores (None: no tensor-core loop found);
    ``loop_work``: the same for every tensor-core loop, in address order."""

    name: str
    kind: str
    arch: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # stack + local bytes per thread
    shared_memory: int
    hgmma: bool
    tma: bool
    full_tile_work: float | None
    loop_work: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def binary_report(cubin: bytes, name: str, kind: str, arch: str, block_m: int, block_n: int,
                  num_warps: int, num_stages: int, registers: int, spill_bytes: int,
                  shared_memory: int) -> KernelReport:
    """The report of a compiled kernel (its resource counts from cuobjdump)."""
    sass = disassemble(cubin)
    loops = tensor_core_loops(sass)
    full = full_tile_loop(loops)
    work = tuple(round(loop.work(num_warps, block_m, block_n), 1) for loop in loops)
    return KernelReport(name, kind, arch, block_m, block_n, num_warps, num_stages, registers,
                        spill_bytes, shared_memory, "HGMMA" in sass,
                        any(op in sass for op in OPCODE_CLASSES["TMA"]),
                        None if full is None else round(full.work(num_warps, block_m, block_n), 1),
                        work)


def kernel_report(plan: Plan, archs=("sm_90",), kinds=None) -> list[KernelReport]:
    """Compile every kernel of ``plan`` for ``archs`` (through the binary cache) and
    report each: registers, spills, shared memory, HGMMA/TMA use and the full-tile issue
    work. ``kinds``: kernel kinds to report (default: forward, and the backward pair for
    a static pattern)."""
    if kinds is None:
        kinds = ("forward",) if plan.routing_steps else ("forward", "backward_dq", "backward_dkdv")
    reports = []
    for arch in archs:
        for kind in kinds:
            cfg = kind_config(plan, kind)
            for index in range(len(plan.kernels)):
                binary, _ = cached_binary(plan, index, arch, kind)
                info = binary.info
                reports.append(binary_report(binary.cubin, info.name, kind, arch, cfg.block_m,
                                             cfg.block_n, cfg.num_warps, cfg.num_stages,
                                             info.registers, info.spills + info.stack,
                                             info.shared_memory))
    return reports


def report_table(reports: list[KernelReport]) -> str:
    """The reports as a fixed-width table for people."""
    head = (f"{'kernel':44} {'arch':6} {'tile':>9} {'warps':>5} {'regs':>4} {'spill':>5} "
            f"{'smem KiB':>8} {'HGMMA':>5} {'TMA':>3} {'full-tile work':>14}")
    lines = [head, "-" * len(head)]
    for r in reports:
        work = "-" if r.full_tile_work is None else f"{r.full_tile_work:.0f}"
        lines.append(f"{r.name[:44]:44} {r.arch:6} {f'{r.block_m}x{r.block_n}':>9} "
                     f"{r.num_warps:>5} {r.registers:>4} {r.spill_bytes:>5} "
                     f"{r.shared_memory / 1024:>8.1f} {'yes' if r.hgmma else 'no':>5} "
                     f"{'yes' if r.tma else 'no':>3} {work:>14}")
    lines.append("full-tile work: warp-instructions issued per iteration of the full-tile loop "
                 "per 1000 scores (lower is faster)")
    return "\n".join(lines)
