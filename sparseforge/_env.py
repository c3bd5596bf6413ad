"""Temporarily changed environment variables (spawned workers copy ``os.environ``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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
