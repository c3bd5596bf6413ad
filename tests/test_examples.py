"""The examples in examples/ run as documented (each in its own process, as a user would)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(p for p in (Path(__file__).parents[1] / "examples").glob("*.py")
                  if p.name != "aot_specs.py")  # a spec file, used by aot_build_and_load.py


#: the largest error an example may print: its results are compared in fp32 or bf16
ERROR_BOUND = 3e-2
#: what marks a line as reporting an error against a reference
_ERROR_WORDS = re.compile(r"error|diff|oracle|reference_attention|\|[^|]+ - [^|]+\|",
                          re.IGNORECASE)
#: a standalone number (not the 64 of fp64, not part of a name)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])")


def printed_errors(stdout: str) -> list[tuple[str, float]]:
    """(line, value) of every line reporting an error against a reference: the number
    after the last error word's following ':' or '=' if there is one, else the first
    number after that word."""
    out = []
    for line in stdout.splitlines():
        words = list(_ERROR_WORDS.finditer(line))
        if not words:
            continue
        rest = line[words[-1].end():]
        for sep in (":", "="):
            if sep in rest:
                rest = rest.split(sep, 1)[1]
                break
        number = _NUMBER.search(rest)
        if number:
            out.append((line, abs(float(number.group()))))
    return out


def test_printed_errors_are_read():
    text = ("max |error| vs the fp64 oracle: 3.5e-07\nkeys per query: 49\n"
            "dq: max |generated - fp64 oracle| = 1.20e-06\nmax abs difference vs x 0.5 (0.9 kept)\n"
            "L=1024 vs sf.reference_attention (fp64): 1.0e-06\n"
            "max |error| on the last 256 queries: 2e-07\n"
            "na2d + 6 extra tokens: max abs error vs masked SDPA 1.9e-06, lse (2, 28, 28, 4)")
    assert [v for _, v in printed_errors(text)] == [3.5e-07, 1.2e-06, 0.5, 1e-06, 2e-07, 1.9e-06]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    for line, value in printed_errors(proc.stdout):
        assert value <= ERROR_BOUND, f"{example.name}: {line}"
    if example.name == "aot_build_and_load.py":
        assert "triton.compile calls while loading: 0" in proc.stdout
        assert proc.stdout.count(": prebuilt") == 4
