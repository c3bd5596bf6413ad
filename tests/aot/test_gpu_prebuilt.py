"""On a GPU: AOT-built kernels load and give the same results as JIT-built ones, and
both match the fp64 oracle. Skipped without CUDA (not counted as passing)."""

import pytest
import torch

import sparseforge as sf
from sparseforge.aot.build import build
from sparseforge.runtime import binaries, gpu_launch, prebuilt

pytestmark = pytest.mark.gpu


def test_prebuilt_kernels_match_jit_on_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pattern = sf.sliding_window(300) | sf.sinks(4)
    spec = sf.BuildSpec("layer", pattern, 2000, 2000, 128, heads=8, kv_heads=2)
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    build([spec], [arch], tmp_path / "k")
    q = torch.randn(2, 8, 2000, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 2000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    prebuilt.unload_all()
    gpu_launch.clear_held()
    jit = sf.attention(q, k, v, pattern, enable_gqa=True)

    gpu_launch.clear_held()
    assert sf.load_kernels(tmp_path / "k") == 1
    compiled = binaries.COUNTERS["compiled"]
    aot = sf.attention(q, k, v, pattern, enable_gqa=True)
    assert binaries.COUNTERS["compiled"] == compiled
    assert all(h.source == "prebuilt" for h in gpu_launch._held.values())
    assert torch.equal(aot, jit)
    ref = sf.reference_attention(q.float(), k.float(), v.float(), pattern, enable_gqa=True)
    assert (aot.float() - ref.float()).abs().max().item() < 2e-2
