"""The process environment: temporarily changed variables (spawned workers copy
``os.environ``) and the installed Triton's version."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from importlib import metadata


def _apply(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def patched_environ(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) the variables in ``values``; restore them on exit."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(old)


@functools.cache
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, read from its package metadata (importing
    Triton is slow and the planner does not need it): some tile choices differ between
    compiler versions. (0, 0) when Triton is not installed."""
    try:
        major, minor = metadata.version("triton").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return 0, 0
