"""The held-kernel launch path, checked without a GPU: the arguments handed to Triton's
launcher line up with the kernel's parameters, and calls that break the compiled
assumptions (alignment, unit head-dim stride) are refused so the JIT path runs them."""

import pytest
import torch
import triton

import sparseforge as sf
from sparseforge.runtime import gpu_launch
from sparseforge.runtime.compile import launch_spec
from sparseforge.runtime.dispatch import compile_pattern
from sparseforge.runtime.triton_launch import (
    backward_launches,
    bias_grad_buffers,
    decode_launches,
    kernel_launches,
)


class FakeKernel:
    function = "fn-handle"
    packed_metadata = ("packed",)

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)

    def launch_metadata(self, *args):
        return None


class FakeDriver:
    class active:
        @staticmethod
        def get_current_stream(index):
            return 1234


@pytest.fixture()
def fake_driver(monkeypatch):
    monkeypatch.setattr(triton.runtime, "driver", FakeDriver)


@pytest.mark.parametrize("pattern", [
    sf.sliding_window(40) | sf.sinks(2),
    sf.documents(torch.tensor([0] * 50 + [1] * 30)) & sf.causal(),
    sf.per_head([sf.causal(), sf.window(5, 5, dilation=2)]),
    sf.per_head([sf.causal() & sf.rel_bias(torch.zeros(2, 9)) & sf.softcap(5.0),
                 sf.window(5, 5, dilation=2) & sf.alibi(torch.ones(2)) & sf.rel_bias(torch.zeros(2, 3))]),
], ids=repr)
def test_launcher_gets_every_parameter_in_order(pattern, fake_driver):
    q = torch.randn(2, 2, 80, 32, dtype=torch.float16)
    k = v = torch.randn(2, 2, 80, 32, dtype=torch.float16)
    out, lse = torch.empty_like(q), torch.empty(2, 2, 80)
    compiled = compile_pattern(pattern)
    p = sf.plan(compiled.canonical, q_len=80, kv_len=80, head_dim=32, dtype="float16",
                target="sm_90")
    launches = [("forward", *launch)
                for launch in kernel_launches(p, compiled.head_patterns, q, k, v, out, lse, 0.125)]
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    parts = bias_grad_buffers(p, compiled.head_patterns, q, k)
    launches += list(backward_launches(p, compiled.head_patterns, q, k, v, q.clone(), q.clone(),
                                       dk, dv, lse, lse.clone(), 0.125, parts))
    out_part, lse_part = torch.empty(2, 2, 80, 3, 32), torch.empty(2, 2, 80, 3)
    launches += [("decode", *launch) for launch in decode_launches(
        p, compiled.head_patterns, q, k, v, out_part, lse_part, 0.125, 1)]
    assert {(kind, index) for kind, index, _, _ in launches} == {
        (kind, index) for kind in ("forward", "backward_dq", "backward_dkdv", "decode")
        for index in range(len(p.kernels))}
    for kind, index, grid, args in launches:
        fn, sig, constexprs, _ = launch_spec(p, index, kind)
        held = gpu_launch.HeldKernel(FakeKernel(), gpu_launch.constexpr_tail(fn, constexprs), "k", "test")
        assert held.launch(grid, args, 0)
        (call,) = held.kernel.calls
        hooks = triton.knobs.runtime
        assert call[:9] == (*grid, 1234, "fn-handle", ("packed",), None, hooks.launch_enter_hook,
                            hooks.launch_exit_hook)
        passed = call[9:]
        assert len(passed) == len(fn.arg_names) == len(sig)
        for name, value in zip(fn.arg_names, passed):
            if name in constexprs:
                assert value == constexprs[name], name
            elif sig[name].startswith("*"):
                assert isinstance(value, torch.Tensor), name
            elif sig[name] == "fp32":
                assert isinstance(value, float), name
            else:
                assert isinstance(value, int) and not isinstance(value, bool), name
        assert dict(zip(fn.arg_names, passed))["stride_qm"] == 32


def test_misaligned_or_strided_calls_are_refused(fake_driver):
    p = sf.plan(sf.causal(), q_len=16, kv_len=16, head_dim=32, dtype="float16", target="sm_90")
    fn, _, constexprs, _ = launch_spec(p, 0)
    held = gpu_launch.HeldKernel(FakeKernel(), gpu_launch.constexpr_tail(fn, constexprs), "k", "test")
    base = torch.randn(1, 1, 16, 33, dtype=torch.float16)
    misaligned = base[..., 1:]  # 2-byte offset
    assert not held.launch((1, 1, 1), [misaligned], 0)
    transposed = torch.randn(1, 1, 32, 16, dtype=torch.float16).transpose(2, 3)
    assert not held.launch((1, 1, 1), [transposed], 0)
    assert held.kernel.calls == []


def test_a_failing_launch_falls_back_and_stays_off(fake_driver, caplog):
    class Exploding(FakeKernel):
        @property
        def run(self):
            raise RuntimeError("no launcher")

    p = sf.plan(sf.causal(), q_len=16, kv_len=16, head_dim=32, dtype="float16", target="sm_90")
    fn, _, constexprs, _ = launch_spec(p, 0)
    held = gpu_launch.HeldKernel(Exploding(), gpu_launch.constexpr_tail(fn, constexprs), "k", "test")
    q = torch.randn(1, 1, 16, 32, dtype=torch.float16)
    with caplog.at_level("WARNING", logger="sparseforge"):
        assert not held.launch((1, 1, 1), [q], 0)
    assert held.broken and "no launcher" in caplog.text
    assert not held.launch((1, 1, 1), [q], 0)


def test_unresolvable_kernel_is_none_not_an_error(monkeypatch, caplog):
    gpu_launch.clear_held()
    monkeypatch.setattr(gpu_launch, "device_arch", lambda index: "sm_90")
    monkeypatch.setattr(gpu_launch, "resolve_kernel", lambda *a: 1 / 0)
    p = sf.plan(sf.causal(), q_len=16, kv_len=16, head_dim=32, dtype="float16", target="sm_90")
    with caplog.at_level("WARNING", logger="sparseforge"):
        assert gpu_launch.held_kernel(p, 0, 0) is None
    assert "ZeroDivisionError" in caplog.text
    gpu_launch.clear_held()
