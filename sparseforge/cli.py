"""The ``sparseforge`` command line (typer)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import benchmarks, cpu_bench
from .aot.build import build as run_build
from .aot.build import sass_report
from .aot.spec import load_spec_file, select_specs, split_spec_argument
from .demo import run_demo
from .ir.patterns_parse import parse_pattern
from .planner.plan import plan as make_plan
from .runtime.binary_cache import binary_dir, verify_cache
from .runtime.cache import kernel_dir
from .runtime.compile import parse_arch
from .runtime.sass import report_table

app = typer.Typer(help="sparseforge: compile sparse attention patterns to Triton kernels.",
                  no_args_is_help=True, add_completion=False)
cache_app = typer.Typer(help="List, verify or clear the kernel cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.command()
def demo(length: int = typer.Option(4096, help="sequence length"),
         window: int = typer.Option(256, help="sliding window size"),
         sinks: int = typer.Option(4, help="attention sinks"),
         flex: bool = typer.Option(True, help="also time compiled FlexAttention"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Sliding window + sinks on CPU: the plan, time vs dense SDPA and compiled
    FlexAttention, error vs the oracle."""
    r = run_demo(length=length, window=window, n_sinks=sinks, with_flex=flex)
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    typer.echo(r["plan"])
    typer.echo("")
    typer.echo(f"sparseforge (CPU executor)       {r['sparseforge_ms']:9.2f} ms")
    typer.echo(f"SDPA with the dense bool mask    {r['sdpa_dense_mask_ms']:9.2f} ms"
               f"   ({r['speedup_vs_sdpa']:.2f}x slower than sparseforge)")
    if "flex_compiled_ms" in r:
        typer.echo(f"FlexAttention, torch.compile'd  {r['flex_compiled_ms']:9.2f} ms"
                   f"   ({r['speedup_vs_flex']:.2f}x slower; its first call with compile: "
                   f"{r['flex_first_call_ms'] / 1e3:.1f} s)")
    elif flex:
        typer.echo(f"FlexAttention                    {r['flex_status']}")
    typer.echo(f"max |error| vs fp64 oracle       {r['max_abs_error']:9.2e}")
    typer.echo("(median of 5 calls each, on this machine's CPU)")


@contextlib.contextmanager
def _user_errors():
    """Bad input is a one-line message and exit status 2, not a traceback."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _plan_summary(p, name: str | None = None) -> dict:
    kernels = [{"pattern": repr(k.pattern), "heads": None if k.heads is None else list(k.heads),
                "schedule": k.schedule, "groups": k.groups, "visited": st.visited, "full": st.full,
                "partial": st.partial, "density": st.density, "utilisation": st.utilisation}
               for k, st in zip(p.kernels, p.stats)]
    first = kernels[0]
    return {"name": name, "pattern": repr(p.pattern), "q_len": p.q_len, "kv_len": p.kv_len,
            "head_dim": p.head_dim, "dtype": p.dtype, "target": p.target, "block_m": p.block_m,
            "block_n": p.block_n, "num_warps": p.config.num_warps,
            "num_stages": p.config.num_stages, "visited": first["visited"], "full": first["full"],
            "utilisation": first["utilisation"], "density": first["density"], "kernels": kernels}


@app.command("plan")
def plan_cmd(target: str = typer.Argument(..., metavar="SPEC_FILE[:NAME] | PATTERN",
                                          help="a spec file (optionally one spec of it), or a "
                                          "pattern expression such as 'sliding_window(256) | sinks(4)'"),
             arch: str = typer.Option("sm_90", help="target to plan for: sm_80, sm_90, cpu"),
             q_len: int = typer.Option(4096, help="query length (pattern expressions only)"),
             kv_len: int = typer.Option(None, help="key length (default: q_len)"),
             head_dim: int = typer.Option(128, help="head dim (pattern expressions only)"),
             dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
             png: Path = typer.Option(None, help="write a picture of the mask and tile grid "
                                      "(one file per spec: NAME is added to the file name)"),
             as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
             sass: bool = typer.Option(False, "--sass", help="compile the plan's kernels for "
                                       "--arch and report registers, spills, shared memory, "
                                       "HGMMA/TMA use and full-tile issue work (no GPU needed)")):
    """Explain how a spec file's layers (or one pattern) are tiled.

    Prints tiles visited, full vs partial tiles, density and tile utilisation per kernel
    and why the tiles were chosen; --png draws the mask and the tile grid; --sass reads
    the compiled kernels' SASS."""
    with _user_errors():
        plans = _plans_for(target, arch, q_len, kv_len, head_dim, dtype)
        if sass:
            parse_arch(arch)
            reports = {name: sass_report(p, (arch,)) for name, p in plans}
    for name, p in plans:
        if png:
            path = png if len(plans) == 1 else png.with_name(f"{png.stem}_{name}{png.suffix}")
            p.save_png(path)
    if as_json:
        out = [dict(_plan_summary(p, name),
                    **({"sass": [r.to_dict() for r in reports[name]]} if sass else {}))
               for name, p in plans]
        typer.echo(json.dumps(out[0] if len(out) == 1 else out, indent=1))
        return
    for name, p in plans:
        if name:
            typer.echo(f"== {name}")
        typer.echo(p.explain())
        if sass:
            typer.echo("")
            typer.echo(report_table(reports[name]))
        typer.echo("")


def _plans_for(target, arch, q_len, kv_len, head_dim, dtype) -> list:
    path, name = split_spec_argument(target)
    if path.suffix == ".py" or path.is_file():
        specs = select_specs(load_spec_file(path), name, str(path))
        return [(s.name, s.plan(arch)) for s in specs]
    return [(None, make_plan(parse_pattern(target), q_len=q_len, kv_len=kv_len or q_len,
                             head_dim=head_dim, dtype=dtype, target=arch))]


@app.command()
def build(spec_file: Path = typer.Argument(..., metavar="SPEC_FILE[:NAME]",
                                           help="Python file defining SPECS = [sf.BuildSpec(...)]"),
          arch: str = typer.Option("sm_80,sm_90", help="comma-separated GPU targets"),
          out: Path = typer.Option(..., "--out", "-o", help="output directory"),
          workers: int = typer.Option(None, help="parallel compile processes (default: CPUs)"),
          as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON")):
    """Compile a spec file's kernels for GPU targets (no GPU needed).

    Writes cubins, manifest.json (registers, spills, shared memory, wgmma use, hashes)
    and report.md to --out. Load them at run time with sf.load_kernels(OUT) or the
    environment variable SPARSEFORGE_KERNELS=OUT."""
    path, name = split_spec_argument(str(spec_file))
    archs = [a.strip() for a in arch.split(",") if a.strip()]
    with _user_errors():
        specs = select_specs(load_spec_file(path), name, str(path))
        for a in archs:
            parse_arch(a)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=_stderr_console(), transient=as_json)
    with progress:
        task = progress.add_task("compiling", total=None)
        manifest = run_build(
            specs, archs, out, workers=workers,
            on_start=lambda n: progress.update(task, total=n),
            on_kernel=lambda e: progress.update(task, advance=1,
                                                description=f"{e['name'][:40]} {e['arch']}"))
    if as_json:
        typer.echo(json.dumps(manifest, indent=1))
        return
    typer.echo((out / "report.md").read_text())
    typer.echo(f"wrote {len(manifest['kernels'])} kernels, manifest and report to {out}")


def _stderr_console():
    return Console(stderr=True)


@app.command()
def bench(length: int = typer.Option(4096, help="sequence length of the CPU attention bench"),
          repeats: int = typer.Option(5),
          flex: bool = typer.Option(True, help="also time compiled FlexAttention"),
          busy: bool = typer.Option(True, help="re-time sparseforge with every core kept busy"),
          attention: bool = typer.Option(True, help="run the CPU attention bench"),
          build: bool = typer.Option(True, help="time cold kernel builds (empty caches)")):
    """Benchmarks on this machine; JSON goes to bench/results/.

    CPU attention (sliding window, causal, 2-D neighbourhood, documents: sparseforge vs
    dense SDPA vs compiled FlexAttention, forward and forward+backward), cold build time
    per kernel for sm_80/sm_90, and the warm dispatch overhead of sf.attention."""
    if attention:
        result = cpu_bench.run(length=length, repeats=repeats, with_flex=flex, busy=busy)
        typer.echo(cpu_bench.table(result))
        typer.echo(f"warm dispatch overhead {result['dispatch_overhead_us']:.1f} us (best of "
                   f"{len(result['dispatch_overhead_loops_us'])} loops); "
                   "JSON: bench/results/cpu_attention.json")
    if build:
        typer.echo(json.dumps(benchmarks.build_and_dispatch(), indent=1))


@cache_app.command("ls")
def cache_ls(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """List cached kernel sources and compiled binaries."""
    root, bins = kernel_dir(), binary_dir()
    rows = [{"kind": "source", "file": p.name, "bytes": p.stat().st_size}
            for p in sorted(root.glob("*.py"))] if root else []
    rows += [{"kind": "binary", "file": p.name, "bytes": p.stat().st_size}
             for p in sorted(bins.glob("*.cubin"))] if bins else []
    if as_json:
        typer.echo(json.dumps({"directory": str(root), "entries": rows}, indent=1))
        return
    typer.echo(f"cache {root if root else '(read-only: memory only)'}")
    for r in rows:
        typer.echo(f"{r['kind']:7s} {r['bytes']:9d}  {r['file']}")


@cache_app.command("verify")
def cache_verify(remove: bool = typer.Option(False, "--remove", help="delete damaged entries"),
                 as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Check every cache entry against its hash (exit status 1 if any is damaged).

    Damaged entries are never used either way: they are rebuilt on next use."""
    problems = verify_cache(remove=remove)
    if as_json:
        typer.echo(json.dumps([{"entry": e, "problem": p} for e, p in problems], indent=1))
    else:
        for entry, problem in problems:
            typer.echo(f"DAMAGED {entry}: {problem}{' (removed)' if remove else ''}")
        typer.echo(f"{len(problems)} damaged entries")
    raise typer.Exit(1 if problems else 0)


@cache_app.command("clear")
def cache_clear():
    """Delete the kernel cache (sources and binaries) of this Triton version."""
    d = kernel_dir()
    if d is None:
        typer.echo("cache is read-only: nothing to clear")
        return
    shutil.rmtree(d)
    typer.echo(f"removed {d}")


if __name__ == "__main__":
    app()
