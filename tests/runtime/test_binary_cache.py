"""The compiled-kernel cache: one build however many processes or threads race for a
key, damaged entries rebuilt (never loaded), read-only caches kept in memory.

Compiling needs a process where Triton was imported with its interpreter off, so these
tests run small scripts in subprocesses."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sparseforge.runtime import cache

PRELUDE = """
import json, logging, sys, threading
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
import sparseforge as sf
from sparseforge.runtime import binaries, binary_cache
PLAN = sf.plan(sf.sliding_window(64), q_len=256, kv_len=256, head_dim=32, dtype="float16",
               target="sm_80")
"""


def run_script(body: str, cache_dir, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[cache.ENV_CACHE_DIR] = str(cache_dir)
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_script(body: str, cache_dir) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[cache.ENV_CACHE_DIR] = str(cache_dir)
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture()
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    return d


def _entries(cache_dir):
    return sorted(cache_dir.glob("kernels-*/bin/*.entry.json"))


def test_eight_processes_racing_build_once(cache_dir):
    body = """
    binary, built = binary_cache.cached_binary(PLAN, 0, "sm_80")
    print(json.dumps({"built": built, "compiled": binaries.COUNTERS["compiled"],
                      "sha": binaries.sha256_hex(binary.cubin)}))
    """
    procs = [start_script(body, cache_dir) for _ in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["built"] for r in results) == 1
    assert sum(r["compiled"] for r in results) == 1
    assert len({r["sha"] for r in results}) == 1
    assert len(_entries(cache_dir)) == 1
    assert not list(cache_dir.glob("kernels-*/bin/*.tmp"))


def test_threads_racing_build_once_and_damage_is_rebuilt(cache_dir):
    body = """
    from pathlib import Path
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        binary_cache.cached_binary(PLAN, 0, "sm_80")[1])) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    report = {"thread_builds": sum(results), "compiled_after_threads": binaries.COUNTERS["compiled"]}
    binary_cache.clear_memory()
    report["reload_built"] = binary_cache.cached_binary(PLAN, 0, "sm_80")[1]
    entry = json.loads(next(binary_cache.binary_dir().glob("*.entry.json")).read_text())
    directory = binary_cache.binary_dir()
    for damage in ("truncate", "edit_cubin", "edit_metadata", "delete"):
        binary_cache.clear_memory()
        cubin, meta = directory / entry["cubin"], directory / entry["metadata"]
        if damage == "truncate":
            cubin.write_bytes(cubin.read_bytes()[:1000])
        elif damage == "edit_cubin":
            data = bytearray(cubin.read_bytes()); data[500] ^= 0xFF; cubin.write_bytes(bytes(data))
        elif damage == "edit_metadata":
            meta.write_text(meta.read_text().replace('"num_warps": 4', '"num_warps": 1'))
        else:
            cubin.unlink()
        binary, built = binary_cache.cached_binary(PLAN, 0, "sm_80")
        report[damage] = built and binaries.sha256_hex(cubin.read_bytes()) == entry["cubin_sha256"]
    report["problems_after"] = binary_cache.verify_cache()
    print(json.dumps(report))
    """
    proc = run_script(body, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["thread_builds"] == 1 and report["compiled_after_threads"] == 1
    assert report["reload_built"] is False  # served from disk after the hash check
    for damage in ("truncate", "edit_cubin", "edit_metadata", "delete"):
        assert report[damage] is True, f"{damage}: not rebuilt to the recorded bytes"
    assert report["problems_after"] == []
    assert proc.stderr.count("is damaged") == 4


def test_read_only_cache_builds_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    body = """
    binary, built = binary_cache.cached_binary(PLAN, 0, "sm_80")
    again, built_again = binary_cache.cached_binary(PLAN, 0, "sm_80")
    print(json.dumps({"built": built, "again": built_again, "dir": binary_cache.binary_dir(),
                      "size": len(binary.cubin)}))
    """
    proc = run_script(body, blocker / "cache")  # cannot be created, even by root
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"built": True, "again": False, "dir": None, "size": report["size"]}
    assert report["size"] > 0 and "kept in memory" in proc.stderr


def test_group_writable_kernel_directory_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "c"
    root.mkdir(mode=0o700)
    import triton

    sub = root / f"kernels-triton{triton.__version__}"
    sub.mkdir()
    os.chmod(sub, 0o775)
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(root))
    from sparseforge.runtime import binary_cache

    with pytest.raises(cache.UnsafeCacheDirectory, match="writable by other users"):
        binary_cache.binary_dir()
