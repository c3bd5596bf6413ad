"""The kernel cache: content-keyed, atomic, never executes a tampered file, refuses
directories other users can write to."""

import os
import stat
import subprocess
import sys

import pytest

from sparseforge.runtime import cache

SOURCE = "import triton\nimport triton.language as tl\n\nVALUE = 41 + 1\n"


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(d))
    cache.clear_memory_cache()
    yield d
    cache.clear_memory_cache()


def _entry(d):
    (path,) = list(d.glob("kernels-*/*.py"))
    return path


def test_write_and_memory_hit(private_cache):
    m1 = cache.load_kernel_module("demo", SOURCE, interpret=True)
    assert m1.VALUE == 42
    assert cache.load_kernel_module("demo", SOURCE, interpret=True) is m1
    assert _entry(private_cache).read_text() == SOURCE


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_damaged_entry_is_rewritten_not_run(private_cache, damage):
    cache.load_kernel_module("demo", SOURCE, interpret=True)
    path = _entry(private_cache)
    if damage == "truncate":
        path.write_text(SOURCE[:10])
    else:
        path.write_text(SOURCE.replace("41 + 1", "__import__('os')._exit(3)"))
    cache.clear_memory_cache()
    module = cache.load_kernel_module("demo", SOURCE, interpret=True)
    assert module.VALUE == 42
    assert path.read_text() == SOURCE


def test_foreign_writable_directory_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(d))
    cache.clear_memory_cache()
    with pytest.raises(cache.UnsafeCacheDirectory, match="writable by other users"):
        cache.load_kernel_module("demo", SOURCE + "#x\n", interpret=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory_falls_back(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir(mode=0o700)
    (d / "kernels-x").mkdir()
    os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(d))
    assert cache.load_kernel_module("demo", SOURCE + "#ro\n", interpret=True).VALUE == 42


def test_concurrent_processes_produce_one_intact_file(private_cache):
    code = ("import sys; from sparseforge.runtime import cache; "
            f"m = cache.load_kernel_module('race', {SOURCE!r}, interpret=True); "
            "sys.exit(0 if m.VALUE == 42 else 1)")
    env = dict(os.environ, **{cache.ENV_CACHE_DIR: str(private_cache)})
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(8)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    files = list(private_cache.glob("kernels-*/race_*.py"))
    assert len(files) == 1 and files[0].read_text() == SOURCE
    assert not list(private_cache.glob("kernels-*/*.tmp"))


def test_unwritable_cache_keeps_sources_in_memory(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(blocker / "cache"))  # fails even for root
    cache.clear_memory_cache()
    with caplog.at_level("WARNING", logger="sparseforge"):
        module = cache.load_kernel_module("demo", SOURCE + "#mem\n", interpret=True)
    assert module.VALUE == 42
    assert "kept in memory" in caplog.text
    assert not os.path.exists(module.__file__)
    cache.clear_memory_cache()


def test_verify_finds_and_removes_damaged_sources(private_cache):
    cache.load_kernel_module("demo", SOURCE, interpret=True)
    assert cache.verify_sources() == []
    path = _entry(private_cache)
    path.write_text(SOURCE + "import os\n")
    (problem,) = cache.verify_sources(remove=True)
    assert problem[0] == path.name and not path.exists()
