"""Build specs: which kernels a model needs, declared in a Python module.

A spec file is a Python module that defines ``SPECS``, a list of ``sf.BuildSpec``
(docs/aot.md). It is the user's own code, imported like a ``setup.py``; nothing
from it reaches a template except through the IR, which validates every number.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..ir.nodes import Pattern, PerHead
from ..planner.plan import DTYPES, Plan, plan

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def _positive_int(spec: str, field: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"BuildSpec({spec!r}).{field}={value!r}: expected an int >= {minimum}")


@dataclass(frozen=True)
class BuildSpec:
    """One attention layer shape to build kernels for.

    ``q_len``/``kv_len`` are the lengths the plan is made for; the kernels serve every
    length whose plan renders the same kernels (the tile bounds are run-time arithmetic).
    ``heads``/``kv_heads`` describe GQA and must match a ``per_head`` pattern's length.
    ``backward`` asks for the training kernels too. ``value_dim`` is v's head dim where it
    differs from q's and k's (``head_dim``), as in MLA.
    """

    name: str
    pattern: Pattern
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    heads: int = 1
    kv_heads: int | None = None
    backward: bool = False
    value_dim: int | None = None  # v's head dim where it differs from q/k's (MLA)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"BuildSpec(name={self.name!r}): expected 1-100 characters from "
                             f"[A-Za-z0-9_.-]")
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"BuildSpec({self.name!r}).pattern: expected a sparseforge pattern, "
                            f"got {type(self.pattern).__name__}")
        _positive_int(self.name, "q_len", self.q_len)
        _positive_int(self.name, "kv_len", self.kv_len)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) \
                or not 1 <= self.head_dim <= 256:
            raise ValueError(f"BuildSpec({self.name!r}).head_dim={self.head_dim!r}: expected an "
                             f"int in [1, 256]")
        if self.value_dim is not None and (isinstance(self.value_dim, bool)
                                           or not isinstance(self.value_dim, int)
                                           or not 1 <= self.value_dim <= 256):
            raise ValueError(f"BuildSpec({self.name!r}).value_dim={self.value_dim!r}: expected "
                             f"None or an int in [1, 256]")
        if self.dtype not in DTYPES:
            raise ValueError(f"BuildSpec({self.name!r}).dtype={self.dtype!r}: expected one of "
                             f"{', '.join(DTYPES)}")
        _positive_int(self.name, "heads", self.heads)
        if self.kv_heads is not None:
            _positive_int(self.name, "kv_heads", self.kv_heads)
            if self.heads % self.kv_heads:
                raise ValueError(f"BuildSpec({self.name!r}): heads={self.heads} is not a multiple "
                                 f"of kv_heads={self.kv_heads}")
        if isinstance(self.pattern, PerHead) and len(self.pattern.patterns) != self.heads:
            raise ValueError(f"BuildSpec({self.name!r}): per_head pattern has "
                             f"{len(self.pattern.patterns)} heads, heads={self.heads}")
        if not isinstance(self.backward, bool):
            raise TypeError(f"BuildSpec({self.name!r}).backward: expected a bool")

    def plan(self, target: str) -> Plan:
        return plan(self.pattern, q_len=self.q_len, kv_len=self.kv_len, head_dim=self.head_dim,
                    dtype=self.dtype, target=target, value_dim=self.value_dim)

    def to_dict(self) -> dict:
        return {"name": self.name, "pattern": repr(self.pattern), "q_len": self.q_len,
                "kv_len": self.kv_len, "head_dim": self.head_dim, "dtype": self.dtype,
                "heads": self.heads, "kv_heads": self.kv_heads or self.heads,
                "backward": self.backward, "value_dim": self.value_dim or self.head_dim}


def load_spec_file(path: str | Path) -> list[BuildSpec]:
    """Import a spec file and return its ``SPECS`` (checked: BuildSpecs, unique names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {path} not found")
    module_name = f"sparseforge_spec_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"spec file {path}: not an importable Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(module_name, None)
    specs = getattr(module, "SPECS", None)
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ValueError(f"spec file {path}: expected a non-empty list SPECS of sf.BuildSpec")
    for i, s in enumerate(specs):
        if not isinstance(s, BuildSpec):
            raise TypeError(f"spec file {path}: SPECS[{i}] is a {type(s).__name__}, "
                            f"expected sf.BuildSpec")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"spec file {path}: duplicate names {duplicates}")
    return list(specs)


def split_spec_argument(argument: str) -> tuple[Path, str | None]:
    """``"specs.py:layer0"`` -> (Path("specs.py"), "layer0")."""
    path, sep, name = argument.rpartition(":")
    if sep and path.endswith(".py"):
        return Path(path), name or None
    return Path(argument), None


def select_specs(specs: list[BuildSpec], name: str | None, source: str = "spec file") -> list[BuildSpec]:
    if name is None:
        return specs
    chosen = [s for s in specs if s.name == name]
    if not chosen:
        raise ValueError(f"{source}: no spec named {name!r}; it has {', '.join(s.name for s in specs)}")
    return chosen
