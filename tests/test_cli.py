"""The CLI runs end to end (not only --help)."""

import json

from typer.testing import CliRunner

from sparseforge.cli import app

runner = CliRunner()


def test_demo_runs_and_is_exact():
    result = runner.invoke(app, ["demo", "--length", "1024", "--window", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["max_abs_error"] < 1e-5
    assert "utilisation" in report["plan"]


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
    assert result.exit_code != 0
    assert "unknown constructor" in str(result.exception) or "unsupported" in str(result.exception)


def test_cache_ls_and_clear():
    assert runner.invoke(app, ["cache", "ls"]).exit_code == 0
    assert runner.invoke(app, ["cache", "clear"]).exit_code == 0
