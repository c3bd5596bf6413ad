"""The binary cache: one compiled binary per (rendered source, target), in memory and on
disk under ``<cache>/kernels-triton<ver>/bin``.

A binary is built once under a cross-process file lock (re-checked after taking it), its
entry file written last (the commit point), and every read hash-checked: a damaged or
tampered entry is rebuilt, never served. A read-only cache keeps binaries in memory.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from pathlib import Path

import filelock

from ..planner.plan import Plan
from .binaries import COUNTERS, CorruptBinary, KernelBinary, kernel_key, read_binary
from .cache import kernel_dir, verify_sources, write_if_different
from .compile import build_binary
from .sources import rendered

log = logging.getLogger("sparseforge")

# --- the binary cache ------------------------------------------------------------------

_memory: dict[str, KernelBinary] = {}
_key_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
_registry_lock = threading.Lock()


def binary_dir() -> Path | None:
    """``<cache>/kernels-triton<ver>/bin``, or None when the cache is read-only."""
    root = kernel_dir()
    if root is None:
        return None
    path = root / "bin"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def cached_binary(plan: Plan, kernel_index: int, arch: str,
                  kind: str = "forward") -> tuple[KernelBinary, bool]:
    """(binary, built) for one kernel of ``plan`` on ``arch``: from memory, from the disk
    cache after hash checks, or compiled once under a cross-process lock."""
    key = kernel_key(rendered(plan, kernel_index, kind), arch)
    with _registry_lock:
        key_lock = _key_locks[key]
    with key_lock:  # threads of this process: one builds, the others wait for it
        if key in _memory:
            return _memory[key], False
        directory = binary_dir()
        if directory is None:  # read-only cache: build and keep in memory
            binary = build_binary(plan, kernel_index, arch, kind)
            _memory[key] = binary
            return binary, True
        entry_path = directory / f"{key}.entry.json"
        with filelock.FileLock(str(directory / f"{key}.lock")):  # other processes
            binary = _load_entry(directory, entry_path)
            built = binary is None
            if built:
                binary = build_binary(plan, kernel_index, arch, kind)
                entry = binary.write(directory)
                write_if_different(entry_path, json.dumps(entry, indent=1))  # the commit point
            else:
                COUNTERS["cache_loads"] += 1
        _memory[key] = binary
        return binary, built


def _load_entry(directory: Path, entry_path: Path) -> KernelBinary | None:
    if not entry_path.exists():
        return None
    try:
        return read_binary(directory, json.loads(entry_path.read_text()))
    except (CorruptBinary, ValueError) as exc:
        log.warning("binary cache entry %s is damaged (%s): rebuilding it", entry_path.name, exc)
        return None


def verify_cache(remove: bool = False) -> list[tuple[str, str]]:
    """(entry, problem) for every damaged source or binary in the cache; ``remove``
    deletes them (they would be rebuilt on next use either way)."""
    problems = verify_sources(remove)
    directory = binary_dir()
    for entry_path in sorted(directory.glob("*.entry.json")) if directory else []:
        try:
            read_binary(directory, json.loads(entry_path.read_text()))
        except (CorruptBinary, ValueError) as exc:
            problems.append((entry_path.name, str(exc)))
            if remove:
                entry_path.unlink(missing_ok=True)
    return problems


def clear_memory() -> None:
    _memory.clear()
