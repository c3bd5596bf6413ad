"""``sparseforge build``: compile every kernel a spec file needs, for each GPU target,
on a machine with no GPU, into a directory that ``sf.load_kernels`` loads.

The output directory holds, per kernel and target, the cubin and Triton's metadata, the
rendered source (``src/``), ``manifest.json`` (docs/aot.md: one entry per compiled
kernel with name, arch, kind, cubin path, registers, spills, shared memory, wgmma use,
source and file hashes) and ``report.md`` for people.

Kernels are compiled in spawned worker processes: Triton can only cross-compile in a
process that imported it with the interpreter off, and compiles are CPU-bound. Each
worker goes through the binary cache, so rebuilding an unchanged spec is nearly free
and parallel builds of one kernel compile it once.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from .._env import patched_environ
from .._version import __version__
from ..codegen.templates import TEMPLATE_VERSION
from ..planner.tiles import DECODE_MAX_Q
from ..runtime.binaries import KernelBinary, kernel_key
from ..runtime.binary_cache import cached_binary
from ..runtime.cache import write_if_different
from ..runtime.compile import parse_arch, plan_target
from ..runtime.prebuilt import MANIFEST, MANIFEST_FORMAT
from ..runtime.sass import kernel_report
from ..runtime.sources import rendered
from .spec import BuildSpec


@dataclass(frozen=True)
class BuildJob:
    key: str
    spec: BuildSpec  # the first spec that needs this kernel (it is rebuilt from it)
    arch: str
    kernel_index: int
    name: str
    kind: str = "forward"  # forward, backward_dq or backward_dkdv


def spec_kinds(spec: BuildSpec) -> tuple[str, ...]:
    """The kernel kinds a spec needs: forward, the backward pair for training, and the
    split-KV decode kernel when its queries are decode-short (sf.attention picks it then)."""
    kinds = ("forward",)
    if spec.backward:
        kinds += ("backward_dq", "backward_dkdv")
    if spec.q_len <= DECODE_MAX_Q:
        kinds += ("decode",)
    return kinds


def plan_jobs(specs: list[BuildSpec], archs: list[str]) -> tuple[dict[str, BuildJob], dict]:
    """Distinct kernels to compile (by key) and, per spec, the keys it uses."""
    jobs: dict[str, BuildJob] = {}
    uses: dict[str, list[str]] = {}
    for spec in specs:
        uses[spec.name] = []
        for arch in archs:
            p = spec.plan(plan_target(arch))
            for kind in spec_kinds(spec):
                for index in range(len(p.kernels)):
                    src = rendered(p, index, kind)
                    key = kernel_key(src, arch)
                    jobs.setdefault(key, BuildJob(key, spec, arch, index, src.name, kind))
                    uses[spec.name].append(key)
    return jobs, uses


def _build_job(job: BuildJob) -> tuple[KernelBinary, float, bool, str]:
    """Worker: (binary, seconds, compiled now?, rendered source)."""
    torch.set_num_threads(1)
    p = job.spec.plan(plan_target(job.arch))
    t = time.perf_counter()
    binary, built = cached_binary(p, job.kernel_index, job.arch, job.kind)
    return binary, time.perf_counter() - t, built, rendered(p, job.kernel_index, job.kind).source


def _compiler_environment():
    """Spawned workers copy this environment: Triton must import there with the
    interpreter off (it cannot cross-compile otherwise)."""
    fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated
    return patched_environ({"TRITON_INTERPRET": None, "TRITON_DEFAULT_FP_FUSION": fusion})


def sass_report(plan, archs) -> list:
    """``runtime.sass.kernel_report`` for ``plan`` on ``archs``, compiled in a spawned
    process with Triton's interpreter off (a process that imported Triton with
    TRITON_INTERPRET=1 cannot cross-compile)."""
    with _compiler_environment(), ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(kernel_report, plan, tuple(archs)).result()


def build(specs: list[BuildSpec], archs: list[str], out: str | os.PathLike, *,
          workers: int | None = None,
          on_kernel: Callable[[dict], None] | None = None,
          on_start: Callable[[int], None] | None = None) -> dict:
    """Compile every kernel of ``specs`` for ``archs`` into ``out``; returns the manifest.

    ``on_start(n)`` is told how many kernels will be built, ``on_kernel(entry)`` is
    called as each finishes (the CLI draws its progress bar with them).
    """
    for arch in archs:
        parse_arch(arch)
    if not archs:
        raise ValueError("archs: expected at least one target such as sm_90")
    out = Path(out)
    (out / "src").mkdir(parents=True, exist_ok=True)
    jobs, uses = plan_jobs(specs, list(archs))
    if on_start:
        on_start(len(jobs))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    specs_of: dict[str, list[str]] = {}
    for name, keys in uses.items():
        for key in keys:
            specs_of.setdefault(key, []).append(name)
    started = time.perf_counter()
    entries = []
    with _compiler_environment(), ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_build_job, job): job for job in jobs.values()}
        for future in as_completed(futures):
            binary, seconds, built, source = future.result()
            entry = binary.write(out)
            write_if_different(out / "src" / f"{binary.info.name}.py", source)
            entry.update(source=f"src/{binary.info.name}.py", specs=sorted(set(specs_of[binary.key])),
                         build_seconds=round(seconds, 3), compiled=built)
            entries.append(entry)
            if on_kernel:
                on_kernel(entry)
    entries.sort(key=lambda e: (e["name"], e["arch"]))
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sparseforge": __version__, "triton": triton.__version__, "torch": torch.__version__,
        "template_version": TEMPLATE_VERSION, "archs": list(archs),
        "build_seconds": round(time.perf_counter() - started, 3), "workers": workers,
        "specs": [dict(s.to_dict(), kernels=sorted(set(uses[s.name]))) for s in specs],
        "kernels": entries,
    }
    write_if_different(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    write_if_different(out / "report.md", render_report(manifest))
    return manifest


def render_report(manifest: dict) -> str:
    """The manifest as a page people read: what was built and what each kernel uses."""
    lines = [f"# sparseforge build report ({manifest['created']})", "",
             f"sparseforge {manifest['sparseforge']}, Triton {manifest['triton']}, torch "
             f"{manifest['torch']}; targets {', '.join(manifest['archs'])}; "
             f"{len(manifest['kernels'])} kernels in {manifest['build_seconds']:.1f} s "
             f"({manifest['workers']} workers).", "",
             "| kernel | kind | arch | tile | warps/stages | registers | spills (B) | smem (KiB) "
             "| wgmma | TMA | build (s) | specs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in manifest["kernels"]:
        lines.append(
            f"| `{k['name']}` | {k['kind']} | {k['arch']} | {k['block_m']}x{k['block_n']} | "
            f"{k['num_warps']}/{k['num_stages']} | {k['registers']} | {k['spills'] + k['stack']} | "
            f"{k['shared_memory'] / 1024:.1f} | {'yes' if k['uses_wgmma'] else 'no'} | "
            f"{'yes' if k['uses_tma'] else 'no'} | "
            f"{k['build_seconds']:.2f}{'' if k['compiled'] else ' (cached)'} | {', '.join(k['specs'])} |")
    spills = [k["name"] for k in manifest["kernels"] if k["spills"] or k["stack"]]
    lines += ["", f"Kernels with register spills: {', '.join(spills) if spills else 'none'}.", ""]
    return "\n".join(lines)
