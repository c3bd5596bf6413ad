"""Shared test helpers: random inputs and comparison with the fp64 oracle."""

import torch

import sparseforge as sf

#: unit roundoff of each dtype (half the gap between 1 and the next number)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
#: lse is computed in fp32 from the (already rounded) inputs whatever their dtype
LSE_TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def output_tolerance(ref: torch.Tensor, v: torch.Tensor) -> float:
    """Max abs error an exact kernel may make in ``out = P @ v`` (relative to the fp64
    oracle on the same rounded inputs): P rounded to the input dtype before the product
    (|dP| <= u P, so at most u * max|v| per element), the result rounded once more
    (u * |out|), with a factor 2 for accumulation order. fp32 keeps the old 1e-5
    relative bound (no rounding of P there; summation order dominates)."""
    if v.dtype == torch.float32:
        return 4e-5 * max(1.0, ref.double().abs().max().item())
    u = UNIT_ROUNDOFF[v.dtype]
    vmax = v.double().abs().max().item() if v.numel() else 0.0
    rmax = ref.double().abs().max().item() if ref.numel() else 0.0
    return 2 * u * (vmax + rmax)


def random_qkv(b, hq, hkv, lq, lkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lkv, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lkv, d, generator=g).to(dtype)
    return q, k, v


def assert_matches_oracle(pattern, q, k, v, backend, **kw):
    """Output and lse equal the fp64 reference within the dtype's relative tolerance."""
    gqa = q.shape[1] != k.shape[1]
    out, lse = sf.attention(q, k, v, pattern, enable_gqa=gqa, return_lse=True, backend=backend, **kw)
    ref, ref_lse = sf.reference_attention(q, k, v, pattern, enable_gqa=gqa, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "NaN in output"
    assert not torch.isnan(lse).any(), "NaN in lse"
    tol = output_tolerance(ref, v)
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    assert err <= tol, f"{pattern!r}: max abs error {err:.3g} > {tol:.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{pattern!r}: empty rows differ"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        lerr = (lse[fin].double() - ref_lse[fin].double()).abs().max().item()
        ltol = LSE_TOL[q.dtype] * max(1.0, ref_lse[fin].abs().max().item())
        assert lerr <= ltol, f"{pattern!r}: lse error {lerr:.3g} > {ltol:.3g}"
    return out, lse


#: cross-compilation on a fresh machine compiles every kernel cold (no Triton or kernel
#: cache): the variants' ~320 kernels take 20-30 minutes on 2 busy cores
COMPILE_TIMEOUT = 3600


def run_compiler(args: list[str], env: dict | None = None, timeout: int = COMPILE_TIMEOUT,
                 cwd=None):
    """Run a compiling command (``args``) with Triton's interpreter off, as
    cross-compilation needs; its own process group, killed whole on a timeout, so the
    compile workers it spawned do not outlive it and slow the rest of the suite."""
    import os
    import signal
    import subprocess

    if env is None:
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{' '.join(args[:4])}...: still compiling after {timeout} s") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def compile_in_subprocess(code: str, timeout: int = COMPILE_TIMEOUT) -> list[dict]:
    """Run ``code`` (which prints a JSON list last) in a fresh interpreter with Triton's
    interpreter off, as cross-compilation needs, and return what it printed."""
    import json
    import sys

    proc = run_compiler([sys.executable, "-c", code], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: the Tensor methods that read a value on the host (each a device sync on a GPU)
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def host_reads_during(fn, monkeypatch) -> list[str]:
    """The tensor values sparseforge's own Python code reads on the host while ``fn``
    runs (``.item()``, ``bool(t)``, ``.tolist()``, ...), as "method at file:line". The
    routing checks' ``_require`` reads on the host only for CPU tensors (a device assert
    on CUDA), so it is not counted."""
    import os
    import sys

    package = os.path.dirname(sf.__file__)
    reads = []

    def guarded(name, original):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_code.co_filename
            if caller.startswith(package) and frame.f_code.co_name != "_require":
                reads.append(f"{name} at {os.path.relpath(caller, package)}:{frame.f_lineno}")
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patched:
        for name in HOST_READS:
            patched.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
        fn()
    return reads
