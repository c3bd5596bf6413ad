"""`sparseforge build` on this GPU-less machine, and loading what it wrote: every kernel
in the manifest, zero compilations when loaded, damaged or foreign artifacts refused."""

import json
import logging

import pytest
import triton

import sparseforge as sf
from sparseforge.aot.build import build, spec_kinds
from sparseforge.aot.spec import load_spec_file
from sparseforge.runtime import binaries, gpu_launch, prebuilt
from sparseforge.runtime.sources import rendered

# one xdist worker runs this module: its module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("aot_build")

ARCHS = ["sm_80", "sm_90"]
SPEC_FILE = """
import sparseforge as sf

SPECS = [
    sf.BuildSpec("mixed_heads", sf.per_head([sf.causal(), sf.sliding_window(100) | sf.sinks(4)]),
                 q_len=2048, kv_len=2048, head_dim=64, dtype="bfloat16", heads=2),
    sf.BuildSpec("chunked", sf.chunks(256) & sf.causal(), q_len=1000, kv_len=1500, head_dim=48,
                 dtype="float16", heads=4, kv_heads=2, backward=True),
]
"""
MANIFEST_FIELDS = {"name", "arch", "kind", "cubin", "registers", "spills", "shared_memory",
                   "uses_wgmma", "uses_tma", "source_sha256"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    (root / "specs.py").write_text(SPEC_FILE)
    specs = load_spec_file(root / "specs.py")
    seen = []
    manifest = build(specs, ARCHS, root / "out", workers=2, on_kernel=seen.append)
    return specs, root / "out", manifest, seen


@pytest.fixture()
def fresh_registry():
    prebuilt.unload_all()
    gpu_launch.clear_held()
    yield
    prebuilt.unload_all()
    gpu_launch.clear_held()


def _expected_kernels(specs):
    return {(rendered(s.plan(a), i, kind).name, a) for s in specs for a in ARCHS
            for kind in spec_kinds(s) for i in range(len(s.plan(a).kernels))}


def test_manifest_lists_every_kernel(built):
    specs, out, manifest, seen = built
    assert {(k["name"], k["arch"]) for k in manifest["kernels"]} == _expected_kernels(specs)
    # mixed_heads: 2 forward kernels; chunked (backward=True): forward, dQ, dK/dV; x 2 archs
    assert len(seen) == len(manifest["kernels"]) == 10
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["triton"] == triton.__version__ and manifest["archs"] == ARCHS
    for k in manifest["kernels"]:
        assert set(k) >= MANIFEST_FIELDS
        assert k["kind"] in ("forward", "backward") and k["spills"] == 0 and k["stack"] == 0
        assert 0 < k["registers"] <= 255
        cubin = (out / k["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF" and binaries.sha256_hex(cubin) == k["cubin_sha256"]
        assert (out / k["source"]).read_text().count("@triton.jit") >= 1
        if k["arch"] == "sm_90":
            rows = k["block_n"] if k["name"].startswith("bwd_dkdv") else k["block_m"]
            assert k["uses_wgmma"] == (rows >= 64)
        # 16-bit, D <= 64: every sm_90 kernel but dK/dV moves its tiles by TMA descriptors
        assert k["uses_tma"] == (k["arch"] == "sm_90" and not k["name"].startswith("bwd_dkdv"))


def test_report_lists_every_kernel_and_backward_is_built(built):
    _, out, manifest, _ = built
    report = (out / "report.md").read_text()
    assert all(k["name"] in report for k in manifest["kernels"])
    backward = {k["name"].split("_")[1] for k in manifest["kernels"] if k["kind"] == "backward"}
    assert backward == {"dq", "dkdv"}
    assert all(k["specs"] == ["chunked"] for k in manifest["kernels"] if k["kind"] == "backward")


def test_loading_performs_zero_compilations(built, fresh_registry, monkeypatch):
    specs, out, manifest, _ = built

    def no_compile(*args, **kwargs):
        raise AssertionError("triton.compile called while loading prebuilt kernels")

    monkeypatch.setattr(triton, "compile", no_compile)
    before = dict(binaries.COUNTERS)
    assert sf.load_kernels(out) == len(manifest["kernels"])
    for spec in specs:
        for arch in ARCHS:
            p = spec.plan(arch)
            for kind in spec_kinds(spec):
                for index in range(len(p.kernels)):
                    held = gpu_launch.resolve_kernel(p, index, arch, kind)
                    assert held.source == "prebuilt"
                    assert held.kernel.metadata.num_warps == dict(
                        rendered(p, index, kind).launch_options)["num_warps"]
                assert binaries.sha256_hex(held.kernel.kernel) in {
                    k["cubin_sha256"] for k in manifest["kernels"]}
    assert binaries.COUNTERS["compiled"] == before.get("compiled", 0)
    assert binaries.COUNTERS["prebuilt_loads"] - before.get("prebuilt_loads", 0) == 10


def test_other_lengths_reuse_the_prebuilt_kernels(built, fresh_registry):
    specs, out, _, _ = built
    sf.load_kernels(out)
    chunked = next(s for s in specs if s.name == "chunked")
    for q_len, kv_len in [(1, 1500), (777, 3000), (4096, 4096)]:
        p = sf.plan(chunked.pattern, q_len=q_len, kv_len=kv_len, head_dim=48, dtype="float16",
                    target="sm_90")
        for kind in spec_kinds(chunked):  # the backward kernels too: bounds are run-time
            assert gpu_launch.resolve_kernel(p, 0, "sm_90", kind).source == "prebuilt"


def test_uncovered_kernel_falls_back_with_a_log(built, fresh_registry, monkeypatch, caplog):
    _, out, _, _ = built
    sf.load_kernels(out)
    calls = []
    monkeypatch.setattr(gpu_launch, "cached_binary", lambda *a: calls.append(a) or 1 / 0)
    p = sf.plan(sf.sliding_window(7), q_len=64, kv_len=64, head_dim=32, dtype="bfloat16",
                target="sm_90")
    with caplog.at_level(logging.INFO, logger="sparseforge"), pytest.raises(ZeroDivisionError):
        gpu_launch.resolve_kernel(p, 0, "sm_90")
    assert calls and "no prebuilt kernel" in caplog.text


def _copy(out, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_damaged_artifact_is_skipped_not_loaded(built, fresh_registry, tmp_path, caplog, damage):
    _, out, manifest, _ = built
    out = _copy(out, tmp_path)
    victim = out / manifest["kernels"][0]["cubin"]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "edit":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        victim.unlink()
    with caplog.at_level(logging.WARNING, logger="sparseforge"):
        assert sf.load_kernels(out) == len(manifest["kernels"]) - 1
    assert "skipping a kernel" in caplog.text
    assert prebuilt.prebuilt(manifest["kernels"][0]["key"]) is None


def test_artifacts_of_another_triton_are_not_used(built, fresh_registry, tmp_path, caplog):
    _, out, manifest, _ = built
    out = _copy(out, tmp_path)
    foreign = dict(manifest, triton="0.0.1")
    (out / "manifest.json").write_text(json.dumps(foreign))
    with caplog.at_level(logging.WARNING, logger="sparseforge"):
        assert sf.load_kernels(out) == 0
    assert "built with Triton 0.0.1" in caplog.text


def test_bad_directories_give_clear_errors(tmp_path, fresh_registry):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        sf.load_kernels(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable manifest"):
        sf.load_kernels(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        sf.load_kernels(tmp_path)


def test_environment_variable_loads_at_first_use(built, fresh_registry, monkeypatch):
    _, out, manifest, _ = built
    monkeypatch.setenv(prebuilt.ENV_KERNELS, str(out))
    assert prebuilt.registered() == 0
    key = manifest["kernels"][0]["key"]
    assert prebuilt.prebuilt(key) is not None
    assert prebuilt.registered() == len(manifest["kernels"])


def test_version_changes_change_the_key(monkeypatch):
    p = sf.plan(sf.causal(), q_len=64, kv_len=64, head_dim=64, dtype="bfloat16", target="sm_90")
    src = rendered(p, 0)
    key = binaries.kernel_key(src, "sm_90")
    assert binaries.kernel_key(src, "sm_80") != key
    monkeypatch.setattr(binaries, "TEMPLATE_VERSION", 999)
    assert binaries.kernel_key(src, "sm_90") != key
    monkeypatch.undo()
    monkeypatch.setattr(triton, "__version__", "0.0.1")
    assert binaries.kernel_key(src, "sm_90") != key
