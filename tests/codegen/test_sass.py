"""Kernel speed read from SASS (no GPU): the loop finder on known text, the default sm_90
forward against the Triton tutorial's FlashAttention (issue work per 1000 scores), and
the planner's tile cost table against what the compiler produces today."""

import json
import sys
from pathlib import Path

import pytest
import triton

from sparseforge.planner.tiles import COST_TABLE_PATH
from sparseforge.runtime.sass import Loop, full_tile_loop, tensor_core_loops
from tests.helpers import run_compiler

pytestmark = pytest.mark.xdist_group("compile")

ROOT = Path(__file__).resolve().parents[2]

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   FMNMX R2, R3, R4, !PT ;
        /*0030*/                   MUFU.EX2 R5, R6 ;
        /*0040*/              @P0  BRA `(.L_x_0) ;
.L_x_1:
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0060*/                   ISETP.GE.AND P1, PT, R7, R8, PT ;
        /*0070*/                   FSEL R9, R10, -INF , P1 ;
        /*0080*/                   FFMA R11, R12, R13, R14 ;
        /*0090*/              @P1  BRA `(.L_x_1) ;
.L_x_2:
        /*00a0*/                   IADD3 R1, R1, 0x1, RZ ;
.L_x_3:
        /*00b0*/                   IMAD R2, R2, 0x2, RZ ;
        /*00c0*/              @P2  BRA `(.L_x_3) ;
        /*00d0*/              @P3  BRA `(.L_x_2) ;
        /*00e0*/                   EXIT ;
"""


def test_loop_finder_reads_innermost_tensor_core_loops():
    loops = tensor_core_loops(SASS)
    # .L_x_3 is innermost but has no HGMMA; .L_x_2 holds another loop
    assert [(loop.start, loop.end, loop.instructions) for loop in loops] == [
        (0x10, 0x40, 4), (0x50, 0x90, 5)]
    assert loops[1].counts == {"HGMMA": 1, "ISETP": 1, "FSEL": 1, "FMUL/FFMA/FADD": 1}
    full = full_tile_loop(loops)
    assert full is loops[0]
    assert full.work(num_warps=8, block_m=128, block_n=128) == pytest.approx(4 * 8 / 16384 * 1000)
    assert full_tile_loop([]) is None
    assert Loop(0, 1, 10, {}).work(4, 64, 64) == pytest.approx(10 * 4 / 4096 * 1000)


def _run(code: str) -> dict:
    proc = run_compiler([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_forward_reports():
    """The default sm_90 forward of sliding_window(1024) at L=8192, bf16, D=64 and 128."""
    return _run("""
import json, sparseforge as sf
from sparseforge.runtime.sass import kernel_report
out = {}
for d in (64, 128):
    p = sf.plan(sf.sliding_window(1024), q_len=8192, kv_len=8192, head_dim=d, dtype="bfloat16",
                target="sm_90")
    (r,) = kernel_report(p, archs=("sm_90",), kinds=("forward",))
    out[d] = r.to_dict()
print(json.dumps(out))
""")


# the tutorial's TMA forward at its best configuration, Triton 3.9, sm_90 (docs/performance.md)
TUTORIAL_FORWARD = {"64": 231.0, "128": 254.0}


@pytest.mark.parametrize("d", ["64", "128"])
def test_default_sm90_forward_is_within_10_percent_of_the_tutorial(default_forward_reports, d):
    r = default_forward_reports[d]
    assert (r["block_m"], r["block_n"], r["num_warps"]) == (128, 128, 8)
    assert r["spill_bytes"] == 0 and r["hgmma"] and r["tma"]  # TMA descriptors on sm_90
    assert r["full_tile_work"] <= 1.10 * TUTORIAL_FORWARD[d], r
    # the partial-tile loops exist too (a window has both kinds of tile) and cost more
    assert len(r["loop_work"]) == 3 and max(r["loop_work"]) > r["full_tile_work"]


def test_cost_table_is_spill_free_and_matches_the_compiler():
    table = json.loads(COST_TABLE_PATH.read_text())
    entries = table["entries"]
    assert {e["arch"] for e in entries} == {"sm_80", "sm_90"}
    assert all(e["spill_bytes"] == 0 for e in entries), [e for e in entries if e["spill_bytes"]]
    assert all(0 < e["full"] < e["partial"] for e in entries)
    # one entry recompiled now: the committed numbers are what this Triton produces
    entry = next(e for e in entries if (e["arch"], e["head_dim"], e["block_m"], e["block_n"])
                 == ("sm_90", 128, 128, 128))
    fresh = _run(f"""
import json
from sparseforge.aot.tile_costs import measure
from sparseforge.planner.tiles import TileConfig
print(json.dumps(measure("sm_90", 128, TileConfig(128, 128, {entry['num_warps']}, {entry['num_stages']}))))
""")
    assert table["triton"] == triton.__version__, "regenerate: python -m sparseforge.aot.tile_costs"
    assert fresh == entry


def test_wgmma_and_tma_read_from_ptx_equal_the_sass():
    """``compile.resource_usage`` reads wgmma and TMA use from the PTX (disassembling
    every build cost 0.85 s a kernel); the SASS of kernels with each combination (sm_90
    forward: both; sm_90 dK/dV: wgmma only; sm_80: neither) says the same."""
    flags = _run("""
import json, sparseforge as sf
from sparseforge.runtime.binary_cache import cached_binary
from sparseforge.runtime.sass import kernel_report
out = []
for arch in ("sm_80", "sm_90"):
    p = sf.plan(sf.sliding_window(256), q_len=1024, kv_len=1024, head_dim=64, dtype="bfloat16",
                target=arch)
    for r in kernel_report(p, archs=(arch,), kinds=("forward", "backward_dkdv")):
        info = cached_binary(p, 0, arch, r.kind)[0].info
        out.append([arch, r.kind, r.hgmma, r.tma, info.uses_wgmma, info.uses_tma])
print(json.dumps(out))
""")
    assert [row[:4] for row in flags] == [["sm_80", "forward", False, False],
                                          ["sm_80", "backward_dkdv", False, False],
                                          ["sm_90", "forward", True, True],
                                          ["sm_90", "backward_dkdv", True, False]]
    for arch, kind, hgmma, tma, ptx_wgmma, ptx_tma in flags:
        assert (ptx_wgmma, ptx_tma) == (hgmma, tma), (arch, kind)
