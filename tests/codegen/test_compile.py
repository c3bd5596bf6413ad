"""Every template variant, as each kernel kind (forward, backward dQ, backward dK/dV),
compiles to cubin for sm_80 and sm_90 on this CPU-only machine, with no register
spills, and sm_90 bf16/fp16 kernels use wgmma (HGMMA in SASS) where their tiles allow."""

import json
import sys

import pytest

from sparseforge.codegen.render import KINDS
from sparseforge.runtime.variants import variant_kinds, variant_specs
from tests.helpers import run_compiler

# one xdist worker runs this module: its session-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("compile")

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="session")
def compiled():
    proc = run_compiler([sys.executable, "-m", "sparseforge.runtime.variants", "--arch",
                         ",".join(ARCHS)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(r["variant"], r["arch"], r["template"]): r for r in json.loads(proc.stdout)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant, kind", [(v, kind) for v in variant_specs()
                                           for kind in variant_kinds(v)])
def test_variant_compiles_without_spills(compiled, variant, arch, kind):
    info = compiled[(variant, arch, kind)]
    assert info["kind"] == KINDS[kind].family
    assert info["cubin_size"] > 0
    assert info["spills"] == 0 and info["stack"] == 0, (
        f"{info['name']} on {arch} spills: local={info['spills']} stack={info['stack']} bytes "
        f"(BLOCK_M={info['block_m']} BLOCK_N={info['block_n']} warps={info['num_warps']})")
    assert 0 < info["registers"] <= 255
    assert info["shared_memory"] <= (227 if arch == "sm_90" else 163) * 1024
    if arch == "sm_90" and "fp32" not in variant:
        # wgmma works on 64-row warpgroup tiles: the rows of the forward's and dQ's dots
        # are query rows, those of dK/dV's are keys. Spill-free tiles are smaller at D=256
        # (forward, backward) and D=128 (dK/dV): those use mma.sync.
        rows = info["block_n"] if kind == "backward_dkdv" else info["block_m"]
        assert info["uses_wgmma"] == (rows >= 64), f"{info['name']}: HGMMA use"
    # TMA descriptors on sm_90 for 16-bit plans with 16-byte rows and D in 64 (padded) to
    # 128, except in dK/dV and tiled rel_bias forwards (they spilled with them); sm_80
    # never has TMA
    # (v's head dim as well as q/k's, where they differ)
    _, d, dtype, kw = variant_specs()[variant]
    dims = (d, kw.get("value_dim", d))
    tma = (arch == "sm_90" and dtype != "float32"
           and all(n % 8 == 0 and 64 <= 1 << (n - 1).bit_length() <= 128 for n in dims)
           and kind != "backward_dkdv" and not (kw.get("tiled") and "rel_bias" in variant))
    assert info["uses_tma"] == tma, f"{info['name']}: TMA use"
