"""The prepared GPU run (bench/device_suite.py) works before a GPU is lent: its smoke mode
runs every section on CPU under the interpreter at tiny sizes, and the FlexAttention
mask_mods it compares against allow exactly the pairs of the sparseforge patterns (a
wrong mask_mod would make every Flex comparison on the device meaningless)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparseforge as sf

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import device_suite  # noqa: E402  (bench/ is not a package)


def mask_of(mask_mod, q_len: int, kv_len: int) -> torch.Tensor:
    q = torch.arange(q_len)[:, None]
    kv = torch.arange(kv_len)[None, :]
    return torch.as_tensor(mask_mod(0, 0, q, kv)).expand(q_len, kv_len)


@pytest.mark.parametrize("small", [True, False])
def test_static_mask_mods_match_the_patterns(small):
    for case in device_suite.timing_cases(small):
        if case.get("routed"):
            continue
        # the large cases at a scale that stays cheap: same rule, shorter sequence
        lq = min(case["lq"], 2048) if case["lq"] > 1 else 1
        lkv = min(case["lkv"], 2048) if not case["name"].startswith("na2d") else case["lkv"]
        if case["name"].startswith("na2d"):
            if not small:
                continue  # 128 x 128: the 8 x 8 case checks the same function
            lq = lkv = case["lq"]
        expected = sf.dense_mask(case["pattern"], lq, lkv)
        got = mask_of(case["mask_mod"], lq, lkv)
        if lq == 1:  # decode: the query is the last position
            got = mask_of(case["mask_mod"], lkv, lkv)[-1:]
        assert torch.equal(got, expected), case["name"]


def test_na_mask_mod_is_natten_window_on_a_larger_grid():
    side, kernel = 20, 7
    got = mask_of(device_suite.na_mask_mod(side, kernel), side * side, side * side)
    assert torch.equal(got, sf.dense_mask(sf.neighborhood((side, side), (kernel, kernel)),
                                          side * side, side * side))


def test_smoke_run_writes_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(BENCH / "device_suite.py"), "--smoke", "--no-flex",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("device_suite_*.json")
    result = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "sparseforge", "tests", "tma_probe", "correctness",
                "timing"):
        assert key in result
    assert {r["case"] for r in result["correctness"]} >= {
        "forward_window_sinks", "tiled_neighborhood_2d", "backward_causal", "decode_causal",
        "routed_topk_blocks", "backward_routed_moba", "backward_routed_lines",
        "backward_routed_clusters"}
    assert all(r["ok"] for r in result["correctness"]), result["correctness"]
    assert all(r.get("dq_rel_error", 0) < 1e-4 for r in result["correctness"])
    names = [r["case"] for r in result["timing"]]
    assert names == [c["name"] for c in device_suite.timing_cases(small=True)]
    for row in result["timing"]:
        assert row.get("sparseforge_forward_s", 0) > 0, row
        assert row.get("sdpa_forward_s", 0) > 0, row
