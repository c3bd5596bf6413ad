"""Fixtures shared by the runtime tests."""

import pytest

from sparseforge.runtime import triton_launch


@pytest.fixture()
def launched_kinds(monkeypatch):
    """The kernel kinds (forward, backward_dq, ...) the Triton path looks up, in order."""
    seen = []
    real = triton_launch.kernel_function

    def spy(plan, index, interpret, kind="forward"):
        seen.append(kind)
        return real(plan, index, interpret, kind)

    monkeypatch.setattr(triton_launch, "kernel_function", spy)
    return seen
