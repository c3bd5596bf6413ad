"""Compiled kernel binaries: built once, stored with their hashes, loaded without compiling.

A binary is what ``triton.compile`` produced for one rendered kernel on one GPU target:
the cubin and Triton's metadata JSON (kernel name, shared memory, warps, target). The
same pair of files serves three places:

* the binary cache (``<cache>/kernels-triton<ver>/bin``): a kernel is compiled once per
  machine, by one process, however many processes and threads race for it;
* an AOT directory written by ``sparseforge build`` (with its ``manifest.json``);
* the runtime, which rebuilds Triton's ``CompiledKernel`` from the files with no
  compilation (Triton's driver makes the launcher at the first launch).

Every file is recorded with its sha256 and a file whose bytes differ is never loaded:
a damaged cache entry is rebuilt; in an AOT directory it is reported and skipped.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import triton
from triton.compiler import ASTSource, CompiledKernel

from ..codegen.render import KernelSource
from ..codegen.templates import TEMPLATE_VERSION
from .cache import write_if_different
from .tma import compiled_with_tma

log = logging.getLogger("sparseforge")

#: How kernels were obtained in this process: ``compiled`` (triton.compile ran),
#: ``cache_loads`` (from the binary cache), ``prebuilt_loads`` (from an AOT directory).
COUNTERS: collections.Counter = collections.Counter()


class CorruptBinary(ValueError):
    """A stored kernel file is missing or its bytes do not match the recorded hash."""


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def kernel_key(src: KernelSource, arch: str) -> str:
    """What identifies a binary: the rendered source, its launch options, the target, and
    the Triton and template versions (a change of either is a different kernel)."""
    return sha256_hex(json.dumps({
        "kind": src.kind, "source": src.sha256, "options": [list(o) for o in src.launch_options],
        "arch": arch, "triton": triton.__version__, "template": TEMPLATE_VERSION,
        "tma": compiled_with_tma(src, arch),
    }, sort_keys=True))


@dataclass(frozen=True)
class KernelInfo:
    """What the build read from the compiled kernel (cuobjdump) and the plan."""

    name: str
    arch: str
    kind: str
    registers: int
    spills: int  # bytes of local memory per thread (register spills)
    stack: int
    shared_memory: int
    uses_wgmma: bool
    uses_tma: bool  # TMA copies (UTMALDG/UTMASTG) in the SASS: tiles move by descriptors
    source_sha256: str
    cubin_size: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> KernelInfo:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class KernelBinary:
    key: str
    info: KernelInfo
    cubin: bytes
    metadata_json: str  # Triton's own metadata file, verbatim

    @property
    def file_stem(self) -> str:
        return f"{self.info.name}.{self.info.arch}.{self.key[:12]}"

    def write(self, directory: Path) -> dict:
        """Write the cubin and metadata atomically; the entry that describes them."""
        cubin, meta = f"{self.file_stem}.cubin", f"{self.file_stem}.json"
        write_if_different(directory / cubin, self.cubin)
        write_if_different(directory / meta, self.metadata_json)
        return {"key": self.key, **self.info.to_dict(), "cubin": cubin, "metadata": meta,
                "cubin_sha256": sha256_hex(self.cubin),
                "metadata_sha256": sha256_hex(self.metadata_json)}


def read_binary(directory: Path, entry: dict) -> KernelBinary:
    """The binary an entry describes, after checking every file against its hash."""
    try:
        cubin = (directory / entry["cubin"]).read_bytes()
        meta = (directory / entry["metadata"]).read_bytes()
    except (OSError, KeyError, TypeError) as exc:
        raise CorruptBinary(f"kernel {entry.get('name', '?')}: cannot read its files ({exc})") from exc
    for what, data in (("cubin", cubin), ("metadata", meta)):
        if sha256_hex(data) != entry.get(f"{what}_sha256"):
            raise CorruptBinary(f"kernel {entry.get('name', '?')}: {entry[what]} does not match "
                                f"its recorded sha256 (truncated or edited)")
    try:
        info = KernelInfo.from_dict(entry)
    except (KeyError, TypeError) as exc:
        raise CorruptBinary(f"kernel entry is missing fields ({exc})") from exc
    return KernelBinary(entry["key"], info, cubin, meta.decode())


def compiled_kernel(binary: KernelBinary, directory: Path, fn, signature: dict, constexprs: dict,
                    attrs: dict):
    """Triton's ``CompiledKernel`` for a stored binary, with no compilation.

    Triton reads the files again, so the loaded cubin is re-checked against the hash.
    """
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    group = {f"{binary.info.name}.json": str(directory / f"{binary.file_stem}.json"),
             f"{binary.info.name}.cubin": str(directory / f"{binary.file_stem}.cubin")}
    kernel = CompiledKernel(src, group, binary.key)
    if sha256_hex(kernel.kernel) != sha256_hex(binary.cubin):
        raise CorruptBinary(f"kernel {binary.info.name}: cubin changed while loading")
    return kernel
