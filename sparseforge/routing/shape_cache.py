"""A bounded cache for routing inputs that depend on the problem's shapes only (bucket
candidates, tile geometry): a warm call rebuilds none of them and copies nothing to the
device, which keeps routing capturable in a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any


class ShapeCache:
    """key -> value, built on the first call; cleared when ``limit`` keys are held. A
    ``None`` key (the value depends on data) builds every time."""

    def __init__(self, limit: int):
        self._items: dict[Hashable, Any] = {}
        self._limit = limit

    def get(self, key: Hashable | None, build: Callable[[], Any]) -> Any:
        if key is None:
            return build()
        hit = self._items.get(key)
        if hit is None:
            if len(self._items) >= self._limit:
                self._items.clear()
            hit = self._items[key] = build()
        return hit
