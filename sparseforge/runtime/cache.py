"""On-disk and in-memory cache of rendered kernel modules.

Rendered source is written under the cache directory (a readable mirror that tools and
people can open) and the module is executed from the source we rendered, with the file
as its ``__file__``. Entries are keyed by content: the file name carries the sha256 of
(source, Triton version), and an entry whose bytes differ from the rendered source
(truncated, edited, planted) is rewritten; its contents are never executed. Writes are
atomic (temporary file plus ``os.replace``) under a cross-process ``filelock``; a cache
directory that other users can write to is refused, because anyone who can write there
can run code as us. A read-only cache directory is not an error: kernels then live in
memory only (``triton.jit`` reads their source from ``linecache``, primed below).
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import logging
import os
import stat
import sys
import tempfile
import threading
import types
from pathlib import Path
from types import ModuleType

import filelock
import triton

from .._env import patched_environ

log = logging.getLogger("sparseforge")

ENV_CACHE_DIR = "SPARSEFORGE_CACHE_DIR"
_modules: dict[tuple[str, bool], ModuleType] = {}
_lock = threading.Lock()
_warned_read_only: set[Path] = set()
#: where kernel modules that could not be written appear to live (never created on disk)
MEMORY_DIR = Path(tempfile.gettempdir()) / "sparseforge-memory-only"


class UnsafeCacheDirectory(PermissionError):
    """The cache directory is writable by other users (or not ours)."""


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparseforge"


def check_directory_is_private(path: Path) -> None:
    """Refuse a directory that someone else owns or that group/others may write to."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafeCacheDirectory(
            f"cache directory {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
            f"set {ENV_CACHE_DIR} to a directory of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheDirectory(
            f"cache directory {path} is writable by other users (mode {stat.filemode(st.st_mode)}); "
            f"run `chmod go-w {path}` or set {ENV_CACHE_DIR} to a private directory")


def kernel_dir() -> Path | None:
    """The versioned directory for kernel sources (created private, 0700, if missing), or
    None when it cannot be written: the cache then lives in this process's memory."""
    root = cache_root()
    path = root / f"kernels-triton{triton.__version__}"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in (root, path):
            check_directory_is_private(p)
        # a probe of its own: a shared name raced (one process unlinked another's probe,
        # which then took the cache for read-only and built a kernel a second time)
        with tempfile.TemporaryFile(dir=path, prefix=".write-probe"):
            pass
        return path
    except UnsafeCacheDirectory:
        raise
    except OSError as exc:
        if path not in _warned_read_only:
            _warned_read_only.add(path)
            log.warning("cache directory %s is not writable (%s): kernels are kept in memory "
                        "for this process", path, exc)
        return None


def source_key(source: str) -> str:
    """Cache key of a kernel module: its text and the Triton version that will run it (the
    template version is rendered into the text)."""
    text = f"{source}\0triton={triton.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()


def write_if_different(path: Path, data: str | bytes) -> bool:
    """Atomically make ``path`` hold ``data``; True if it had to be (re)written."""
    payload = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == payload:
            return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


@contextlib.contextmanager
def triton_interpret(enabled: bool):
    """Import a module with ``@triton.jit`` bound to the interpreter (CPU tensors) or not."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        old = knobs.runtime.interpret
        knobs.runtime.interpret = enabled
        try:
            yield
        finally:
            knobs.runtime.interpret = old
    else:  # Triton < 3.4 reads the environment
        with patched_environ({"TRITON_INTERPRET": "1" if enabled else "0"}):
            yield


def interpreter_active() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 at import)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_kernel_module(stem: str, source: str, *, interpret: bool) -> ModuleType:
    """Import the module holding ``source`` (written to the cache if needed).

    ``interpret=True`` gives interpreter functions (needs the interpreter active, see
    ``interpreter_active``); ``False`` gives ``JITFunction``s, which can always be
    cross-compiled with ``triton.compile`` even in an interpreting process.
    """
    key = source_key(source)
    with _lock:
        cached = _modules.get((key, interpret))
        if cached is not None:
            return cached
        directory = kernel_dir()
        if directory is None:
            path = MEMORY_DIR / f"{stem}_{key[:16]}.py"
        else:
            path = directory / f"{stem}_{key[:16]}.py"
            with filelock.FileLock(str(path) + ".lock"):
                # re-check under the lock: another process may have written it meanwhile
                if write_if_different(path, source):
                    log.debug("wrote kernel source %s", path)
        module = _exec_verified(path, source, interpret)
        _modules[(key, interpret)] = module
        return module


def _exec_verified(path: Path, source: str, interpret: bool) -> ModuleType:
    """Execute the source we rendered (not whatever the file holds now) as a module at
    ``path``. ``linecache`` is primed with the same text so ``triton.jit``, which reads
    kernel source through ``inspect``, sees exactly what runs."""
    mod_name = f"sparseforge_kernels.{path.stem}{'_interp' if interpret else ''}"
    module = types.ModuleType(mod_name)
    module.__file__ = str(path)
    linecache.cache[str(path)] = (len(source), None, source.splitlines(True), str(path))
    code = compile(source, str(path), "exec")
    sys.modules[mod_name] = module
    with triton_interpret(interpret):
        exec(code, module.__dict__)
    return module


def verify_sources(remove: bool = False) -> list[tuple[str, str]]:
    """(file, problem) for every cached source whose text does not match the key in its
    name (truncated, edited or planted); optionally delete them."""
    directory = kernel_dir()
    problems = []
    for path in sorted(directory.glob("*.py")) if directory else []:
        expected = path.stem.rpartition("_")[2]
        try:
            actual = source_key(path.read_text())[:16]
        except (OSError, UnicodeDecodeError) as exc:
            actual = f"unreadable ({exc})"
        if actual != expected:
            problems.append((path.name, f"content does not match its key {expected}"))
            if remove:
                path.unlink(missing_ok=True)
    return problems


def clear_memory_cache() -> None:
    with _lock:
        _modules.clear()
