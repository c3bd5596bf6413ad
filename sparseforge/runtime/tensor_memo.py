"""Values derived from tensors, kept while those tensors are the same and unedited.

Mask tables are run-time data that kernels read in a derived form (bit-packed words,
per-tile ranges). Deriving it costs O(Lq * Lkv), so it is kept across calls, keyed by the
tensors' identities and version counters: an in-place edit bumps the version, so a
derived value is never served stale. The entry holds the tensors themselves, which keeps
their ids from being reused while it lives. Inference tensors have no version counter;
their derived values are recomputed on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TensorMemo:
    """A bounded dict of ``build()`` results keyed by ``tensors`` (identity and version)
    and an ``extra`` hashable key (lengths, tile sizes, device)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: dict = {}

    def get(self, tensors: Sequence, extra: tuple, build: Callable):
        versions = tuple(None if t.is_inference() else t._version for t in tensors)
        key = (tuple(map(id, tensors)), versions, extra)
        hit = self._entries.get(key) if None not in versions else None
        if hit is not None and all(a is b for a, b in zip(hit[1], tensors)):
            return hit[0]
        value = build()
        if len(self._entries) > self.limit:
            self._entries.clear()
        self._entries[key] = (value, tuple(tensors))
        return value
