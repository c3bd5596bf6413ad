"""The semantic oracle: which pairs interact and what attention over them gives, written
literally from docs/semantics.md.

Apart from the code it judges: it imports the IR's node classes (and the shared input
checks) and nothing else of sparseforge, no production module imports it (an
import-linter contract in pyproject.toml holds both), and its routing rules are plain
loops. ``sf.reference_attention``, ``sf.dense_mask`` and ``backend="reference"`` are it.
"""

from .attention import dense_mask, reference_attention

__all__ = ["dense_mask", "reference_attention"]
