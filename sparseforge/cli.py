"""The ``sparseforge`` command line (typer)."""

from __future__ import annotations

import json
import shutil

import typer

app = typer.Typer(help="sparseforge: compile sparse attention patterns to Triton kernels.",
                  no_args_is_help=True, add_completion=False)
cache_app = typer.Typer(help="Inspect or clear the kernel cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.command()
def demo(length: int = typer.Option(4096, help="sequence length"),
         window: int = typer.Option(256, help="sliding window size"),
         sinks: int = typer.Option(4, help="attention sinks"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Sliding window + sinks on CPU: the plan, time vs dense SDPA, error vs the oracle."""
    from .demo import run_demo

    r = run_demo(length=length, window=window, n_sinks=sinks)
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    typer.echo(r["plan"])
    typer.echo("")
    typer.echo(f"sparseforge (CPU plan execution) {r['sparseforge_s'] * 1e3:9.2f} ms")
    typer.echo(f"SDPA with the dense bool mask    {r['sdpa_dense_mask_s'] * 1e3:9.2f} ms")
    typer.echo(f"speedup                          {r['speedup']:9.2f}x")
    typer.echo(f"max |error| vs fp64 oracle       {r['max_abs_error']:9.2e}")


@app.command("plan")
def plan_cmd(pattern: str = typer.Argument(..., help="pattern expression, e.g. "
                                           "'sliding_window(256) | sinks(4)'"),
             q_len: int = typer.Option(4096), kv_len: int = typer.Option(None),
             head_dim: int = typer.Option(128), dtype: str = typer.Option("bfloat16"),
             target: str = typer.Option("sm_90"), png: str = typer.Option(None, help="write a picture"),
             as_json: bool = typer.Option(False, "--json")):
    """Plan a pattern expression and explain it (tiles, full/partial, utilisation)."""
    from . import plan as make_plan
    from .ir.patterns_parse import parse_pattern

    p = make_plan(parse_pattern(pattern), q_len=q_len, kv_len=kv_len or q_len,
                  head_dim=head_dim, dtype=dtype, target=target)
    if png:
        p.save_png(png)
    if as_json:
        k = p.stats[0]
        typer.echo(json.dumps({"pattern": repr(p.pattern), "block_m": p.block_m,
                               "block_n": p.block_n, "visited": k.visited, "full": k.full,
                               "utilisation": k.utilisation, "density": k.density}))
    else:
        typer.echo(p.explain())


@app.command()
def bench(length: int = typer.Option(4096), repeats: int = typer.Option(5),
          flex: bool = typer.Option(True, help="also time compiled FlexAttention")):
    """CPU benchmark vs SDPA (and FlexAttention), plus warm dispatch overhead."""
    from .benchmarks import main as run

    run(length=length, repeats=repeats, with_flex=flex)


@cache_app.command("ls")
def cache_ls():
    """List cached kernel sources."""
    from .runtime.cache import kernel_dir

    for path in sorted(kernel_dir().glob("*.py")):
        typer.echo(f"{path.stat().st_size:8d}  {path.name}")


@cache_app.command("clear")
def cache_clear():
    """Delete the kernel source cache."""
    from .runtime.cache import kernel_dir

    d = kernel_dir()
    shutil.rmtree(d)
    typer.echo(f"removed {d}")


if __name__ == "__main__":
    app()
