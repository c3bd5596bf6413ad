"""The examples in examples/ run as documented (each in its own process, as a user would)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(p for p in (Path(__file__).parents[1] / "examples").glob("*.py")
                  if p.name != "aot_specs.py")  # a spec file, used by aot_build_and_load.py


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    if example.name == "aot_build_and_load.py":
        assert "triton.compile calls while loading: 0" in proc.stdout
        assert proc.stdout.count(": prebuilt") == 4
