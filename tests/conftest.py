"""Test session setup: Triton's interpreter on (it must be set before Triton is imported)
and private kernel and inductor caches per session."""

import dataclasses
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the HF tests use local models only
_CACHE = tempfile.mkdtemp(prefix="sparseforge-test-cache-")
os.environ.setdefault("SPARSEFORGE_CACHE_DIR", _CACHE)
# inductor's FX graph cache outlives a change of our custom ops' schemas: keep it private
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))

import pytest
import torch
from hypothesis import settings

# CI runs the same fuzz examples every time (a red build must be reproducible);
# `pytest --hypothesis-profile=explore` draws fresh random examples to hunt for bugs.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two xdist workers share this project's 2-core CI machines: one intra-op thread each,
    # or their torch thread pools oversubscribe the cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _interpreter_overflow_checks(request):
    """Triton's interpreter checks every int32 add, sub and mul for overflow. That doubles
    the cost of each scalar operation and more than halved the speed of index-heavy
    kernels (a 3-D neighbourhood: 87 s -> 31 s without it). The checks stay on for the
    tests marked ``overflow_checks`` (the fuzz tests of the generated kernels, which draw
    the widest range of shapes) and are off elsewhere."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    wanted = request.node.get_closest_marker("overflow_checks") is not None
    if builder.options.sanitize_overflow != wanted:
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=wanted)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def launched_kinds(monkeypatch):
    """The kernel kinds (forward, backward_dq, ...) the Triton path looks up, in order."""
    from sparseforge.runtime import sources

    seen = []
    real = sources.kernel_function

    def spy(plan, index, interpret, kind="forward"):
        seen.append(kind)
        return real(plan, index, interpret, kind)

    monkeypatch.setattr(sources, "kernel_function", spy)
    return seen
