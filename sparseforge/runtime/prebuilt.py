"""``sf.load_kernels(DIR)``: use kernels built ahead of time by ``sparseforge build``.

Loading reads ``DIR/manifest.json``, checks every cubin and metadata file against the
sha256 the build recorded, and registers the kernels by their key (rendered source,
launch options, target, Triton and template versions). At dispatch, a kernel whose key
is registered is loaded from its files with zero Triton compilation; any other kernel
is compiled just in time, with one log line saying so. Directories named in the
``SPARSEFORGE_KERNELS`` environment variable (``os.pathsep``-separated) are loaded at
the first dispatch that needs a GPU kernel.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import triton

from .binaries import CorruptBinary, KernelBinary, read_binary

log = logging.getLogger("sparseforge")

ENV_KERNELS = "SPARSEFORGE_KERNELS"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Prebuilt:
    directory: Path
    binary: KernelBinary


_registry: dict[str, Prebuilt] = {}
_lock = threading.Lock()
_env_loaded = False


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"load_kernels: {path} not found; build the directory with "
                                f"`sparseforge build SPEC --arch ... --out {directory}`") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"load_kernels: {path} is not a readable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"load_kernels: {path} has format {manifest.get('format')!r}, "
                         f"expected {MANIFEST_FORMAT}")
    return manifest


def load_kernels(directory: str | os.PathLike) -> int:
    """Register the prebuilt kernels of ``directory``; returns how many were registered.

    A kernel whose files fail their hash check is skipped with a warning (it will be
    compiled just in time); a build from another Triton version registers nothing,
    since its binaries do not match what this Triton would launch.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("triton") != triton.__version__:
        log.warning("load_kernels(%s): built with Triton %s, this is Triton %s; not using it "
                    "(kernels will be compiled just in time)", directory, manifest.get("triton"),
                    triton.__version__)
        return 0
    found = {}
    for entry in manifest.get("kernels", []):
        try:
            found[entry["key"]] = Prebuilt(directory, read_binary(directory, entry))
        except (CorruptBinary, KeyError, TypeError) as exc:
            log.warning("load_kernels(%s): skipping a kernel: %s", directory, exc)
    with _lock:
        _registry.update(found)
    log.info("load_kernels(%s): %d kernels registered", directory, len(found))
    return len(found)


def prebuilt(key: str) -> Prebuilt | None:
    _load_environment_once()
    return _registry.get(key)


def _load_environment_once() -> None:
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    for directory in filter(None, os.environ.get(ENV_KERNELS, "").split(os.pathsep)):
        try:
            load_kernels(directory)
        except (OSError, ValueError) as exc:
            log.warning("%s: %s", ENV_KERNELS, exc)


def registered() -> int:
    return len(_registry)


def unload_all() -> None:
    """Forget every registered kernel (tests; a process that switches model)."""
    global _env_loaded
    with _lock:
        _registry.clear()
        _env_loaded = False
