"""Shared test helpers: random inputs and comparison with the fp64 oracle."""

import torch

import sparseforge as sf

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


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
    tol = TOL[q.dtype]
    scale = max(1.0, ref.double().abs().max().item())
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    assert err <= tol * scale * 4, f"{pattern!r}: max abs error {err:.3g} (scale {scale:.3g})"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{pattern!r}: empty rows differ"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        lerr = (lse[fin].double() - ref_lse[fin].double()).abs().max().item()
        assert lerr <= tol * 4 * max(1.0, ref_lse[fin].abs().max().item()), f"lse error {lerr:.3g}"
    return out, lse


def compile_in_subprocess(code: str, timeout: int = 600) -> list[dict]:
    """Run ``code`` (which prints a JSON list last) in a fresh interpreter with Triton's
    interpreter off, as cross-compilation needs, and return what it printed."""
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
