"""The kernels compile under Triton 3.6 too, the version the GPU machines carry (they
have torch 2.11 and nothing can be installed on them), not only under the Triton this
suite runs with.

``.ci/run`` makes a small virtual environment beside the project (``.ci/triton36``, with
the system site packages and ``triton==3.6.0`` on top); this test compiles a few template
variants there for sm_80 and sm_90, every kernel kind, and checks the same promises as
``test_compile.py``: no spills, HGMMA on sm_90. The planner's own 3.6 choices apply there
(``planner.tiles.backward_configs``). The full variant set under 3.6 is
``.ci/triton36/bin/python -m sparseforge.runtime.variants`` by hand."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_compiler

pytestmark = pytest.mark.xdist_group("triton36")

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("SPARSEFORGE_TRITON36_PYTHON", ROOT / ".ci" / "triton36" / "bin" / "python"))
# the D=128 big-tile kernels of every kind, two segments (its decode kernel crashed 3.6's
# ptxas with TMA descriptors) and a routed forward (the suite's time budget allows a few
# compiles; the full set is a manual run, see docs/performance.md)
VARIANTS = "one_segment,sorted_segments,routed_moba"


@pytest.fixture(scope="module")
def compiled36():
    if not PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PYTHON} is missing in CI: .ci/run must make the Triton 3.6 venv")
        pytest.skip("make the Triton 3.6 venv: python -m venv --system-site-packages "
                    ".ci/triton36 && .ci/triton36/bin/pip install triton==3.6.0")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    version = subprocess.run([str(PYTHON), "-c", "import triton; print(triton.__version__)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("3.6"), version
    proc = run_compiler([str(PYTHON), "-m", "sparseforge.runtime.variants", "--arch",
                         "sm_80,sm_90", "--variants", VARIANTS], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_variants_compile_under_triton36_without_spills(compiled36):
    kinds = {(r["variant"], r["arch"], r["template"]) for r in compiled36}
    for variant in VARIANTS.split(","):
        for arch in ("sm_80", "sm_90"):
            expected = ("forward",) if variant.startswith("routed") else (
                "forward", "backward_dq", "backward_dkdv", "decode")
            assert {(variant, arch, k) for k in expected} <= kinds
    for r in compiled36:
        assert r["spills"] == 0 and r["stack"] == 0, (
            f"{r['name']} on {r['arch']} under Triton 3.6 spills {r['stack']} bytes "
            f"({r['block_m']}x{r['block_n']}, {r['num_warps']} warps, {r['num_stages']} stages)")
        if r["arch"] == "sm_90" and r["template"] in ("forward", "backward_dq"):
            assert r["uses_wgmma"] == (r["block_m"] >= 64), r["name"]
        # bf16 at D=128: TMA descriptors on sm_90 in the forward and dQ (3.6's ptxas crashed
        # on a decode kernel with them; dK/dV never takes them)
        tma = r["arch"] == "sm_90" and r["template"] in ("forward", "backward_dq")
        assert r["uses_tma"] == tma, r["name"]
