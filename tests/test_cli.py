"""The CLI runs end to end (not only --help)."""

import json

import torch
from typer.testing import CliRunner

from sparseforge.cli import app

runner = CliRunner()


def test_demo_runs_and_is_exact():
    # FlexAttention's compile is exercised in tests/test_cpu_bench.py (marked slow)
    result = runner.invoke(app, ["demo", "--length", "1024", "--window", "128", "--no-flex",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["max_abs_error"] < 1e-5
    assert "utilisation" in report["plan"]
    assert report["sparseforge_ms"] > 0 and report["sdpa_dense_mask_ms"] > 0


def test_plan_command(tmp_path):
    png = tmp_path / "p.png"
    result = runner.invoke(app, ["plan", "sliding_window(256) | sinks(4)", "--q-len", "8192",
                                 "--png", str(png), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["visited"] > 0 and 0 < out["utilisation"] <= 1
    assert png.exists()


def test_plan_command_rejects_code():
    result = runner.invoke(app, ["plan", "__import__('os').system('true')"])
    assert result.exit_code == 2
    assert "unknown constructor" in result.output or "unsupported" in result.output


SPEC = """
import sparseforge as sf
SPECS = [sf.BuildSpec("win", sf.sliding_window(64) | sf.sinks(2), 512, 512, 32, dtype="float16"),
         sf.BuildSpec("docs", sf.causal(), 300, 300, 64)]
"""


def test_plan_spec_file(tmp_path):
    spec = tmp_path / "specs.py"
    spec.write_text(SPEC)
    png = tmp_path / "p.png"
    result = runner.invoke(app, ["plan", f"{spec}:win", "--arch", "sm_80", "--png", str(png), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["name"] == "win" and out["target"] == "sm_80" and png.exists()
    everything = runner.invoke(app, ["plan", str(spec)])
    assert everything.exit_code == 0 and "== win" in everything.output and "== docs" in everything.output
    missing = runner.invoke(app, ["plan", f"{spec}:nope"])
    assert missing.exit_code == 2 and "no spec named 'nope'" in missing.output


def test_build_end_to_end(tmp_path):
    spec = tmp_path / "specs.py"
    spec.write_text(SPEC)
    out = tmp_path / "kernels"
    result = runner.invoke(app, ["build", f"{spec}:win", "--arch", "sm_80", "--out", str(out),
                                 "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output[result.output.index("{"):])
    assert [k["arch"] for k in manifest["kernels"]] == ["sm_80"]
    assert (out / manifest["kernels"][0]["cubin"]).exists() and (out / "report.md").exists()
    bad = runner.invoke(app, ["build", str(spec), "--arch", "sm_75", "--out", str(out)])
    assert bad.exit_code == 2 and "'sm_XX' with XX >= 80" in bad.output


def test_cache_ls_verify_and_clear(tmp_path, monkeypatch):
    import sparseforge as sf
    from sparseforge.runtime import cache, sources

    # a cache of its own: `cache clear` removes the directory, and the session's cache is
    # shared with the other xdist worker, which may be writing a binary into it right now
    own = tmp_path / "cache"
    own.mkdir(mode=0o700)
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(own))
    cache.clear_memory_cache()
    sources.kernel_function.cache_clear()
    sf.attention(*(torch.randn(1, 1, 40, 16) for _ in range(3)), sf.causal(), backend="triton")
    listing = runner.invoke(app, ["cache", "ls", "--json"])
    assert listing.exit_code == 0 and json.loads(listing.output)["entries"]
    assert runner.invoke(app, ["cache", "verify"]).exit_code == 0
    from sparseforge.runtime.cache import kernel_dir

    victim = sorted(kernel_dir().glob("*.py"))[0]
    victim.write_text(victim.read_text() + "\n# edited\n")
    damaged = runner.invoke(app, ["cache", "verify", "--json"])
    assert damaged.exit_code == 1 and json.loads(damaged.output)[0]["entry"] == victim.name
    assert runner.invoke(app, ["cache", "verify", "--remove"]).exit_code == 1
    assert runner.invoke(app, ["cache", "verify"]).exit_code == 0
    assert runner.invoke(app, ["cache", "clear"]).exit_code == 0


def test_plan_sass_reports_every_kernel():
    # compiles the plan's forward, dQ and dK/dV kernels for sm_90 (no GPU) and reads them
    result = runner.invoke(app, ["plan", "causal()", "--q-len", "1024", "--head-dim", "64",
                                 "--arch", "sm_90", "--sass", "--json"])
    assert result.exit_code == 0, result.output
    sass = json.loads(result.output)["sass"]
    assert [r["kind"] for r in sass] == ["forward", "backward_dq", "backward_dkdv"]
    for r in sass:
        assert r["arch"] == "sm_90" and r["hgmma"] and r["spill_bytes"] == 0
        assert 0 < r["full_tile_work"] <= min(r["loop_work"]) + 1e-6
    bad = runner.invoke(app, ["plan", "causal()", "--arch", "cpu", "--sass"])
    assert bad.exit_code == 2 and "arch='cpu'" in bad.output
