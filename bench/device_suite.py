"""The one prepared GPU run: tests, correctness of every kernel family, and timings
against SDPA and compiled FlexAttention, in one call of at most ~8 minutes.

    pip install --no-deps --no-build-isolation -e .     # on the GPU machine, nothing else
    python bench/device_suite.py --out "$OUT"           # writes device_suite_<device>.json
    python bench/device_suite.py --smoke                # tiny sizes on CPU (interpreter)

Sections, each recorded in the JSON whatever happens in the others:
1. ``tests``: the gpu-marked tests (``pytest -m gpu``), with a time limit; then
   ``tma_probe``: the TMA descriptor path in a subprocess (the rest of the run falls back
   to ``SPARSEFORGE_TMA=off`` if it faults or is wrong).
2. ``correctness``: every kernel family in bf16 against the fp64 oracle
   (``sf.reference_attention``): static forward, tiled N-D neighbourhood, documents,
   backward (dQ, dK/dV), decode (split-KV) and a routed top-k forward; random inputs,
   lengths that are not tile multiples, GQA; relative error ||out - ref|| / ||ref||.
3. ``timing``: forward, forward+backward and decode, each against SDPA (dense or causal,
   the best a dense kernel can do) and compiled FlexAttention on the same mask: dense,
   causal, sliding_window(1024) at 32k, 2-D NA 7x7 on 128x128, a MoBA-style top-k and
   decode at 32k. CUDA events, median of --repeats after a warm-up; useful TFLOP/s
   (4 D flops per allowed pair forward, 2.5x that for the backward, as the Triton
   tutorial counts) against the ~790 TFLOP/s bf16 matrix rate measured on an H200 here.
   Each timing row also records the max abs difference to FlexAttention's output.

A section that runs out of its time budget records what it skipped; nothing is silently
dropped. The device name, torch, Triton and sparseforge versions head the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from gpu_timing import flex_run, result_header, timed  # noqa: E402  (bench/ sibling)
from routing_gpu import routed_mask_mod  # noqa: E402

import sparseforge as sf  # noqa: E402

#: bf16 dense matrix rate measured on an H200 of this workplace (8192^3 products, random data)
PEAK_TFLOPS = 790.0
#: the whole run's budget (the device lease allows one 10-minute call)
BUDGET_S = 480.0


class Clock:
    """Seconds left of the run's budget."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()


def run_gpu_tests(limit: float) -> dict:
    """The gpu-marked tests, in a subprocess with a time limit; their summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-o", "addopts=", "-p",
           "no:cacheprovider", "tests"]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {limit:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "",
            "seconds": round(time.monotonic() - started, 1),
            "failures": [ln for ln in lines if ln.startswith("FAILED")][:20]}


TMA_PROBE = """
import json, torch, sparseforge as sf
torch.manual_seed(0)
rows = {}
for name, lq, grad in (("forward_backward", 1000, True), ("decode", 3, False)):
    q = torch.randn(1, 4, lq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    k, v = (torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16,
                        requires_grad=grad) for _ in range(2))
    out = sf.attention(q, k, v, sf.causal(), backend="triton", enable_gqa=True)
    ref = sf.reference_attention(q.detach(), k.detach(), v.detach(), sf.causal(), enable_gqa=True)
    err = float((out.detach().double() - ref).norm() / ref.norm())
    if grad:
        out.sum().backward()
        err = err if torch.isfinite(q.grad).all() else float("inf")
    torch.cuda.synchronize()
    rows[name] = err
print(json.dumps(rows))
"""


def tma_probe(limit: float) -> dict:
    """The kernels' TMA descriptor path on this GPU, in a subprocess first: a fault there
    (an illegal instruction or address poisons the CUDA context) must not take the rest
    of the run with it. On failure the run goes on with ``SPARSEFORGE_TMA=off``."""
    try:
        proc = subprocess.run([sys.executable, "-c", TMA_PROBE], capture_output=True, text=True,
                              timeout=limit)
        errors = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        proc, errors = None, None
    ok = errors is not None and all(e < 2e-2 for e in errors.values())
    if not ok:
        os.environ["SPARSEFORGE_TMA"] = "off"
    return {"ok": ok, "rel_errors": errors, "mode_for_the_run": os.environ.get("SPARSEFORGE_TMA", "auto"),
            "stderr_tail": None if proc is None or ok else proc.stderr[-1500:]}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def correctness(device: str, dtype, small: bool) -> list[dict]:
    """Each kernel family on random inputs against the fp64 oracle."""
    n, heads, kv_heads, d = (56, 2, 1, 16) if small else (2000, 8, 2, 128)
    grid = (8, 8) if small else (40, 40)
    ids = torch.repeat_interleave(torch.arange(4), -(-n // 4))[:n][None].to(device)
    cases = {
        "forward_window_sinks": (sf.sliding_window(n // 5) | sf.sinks(4), n, n, False),
        "forward_prefix_lm_lq_ne_lkv": (sf.prefix_lm(n // 3), n - 37, n, False),
        "forward_documents": (sf.documents(ids) & sf.causal(), n, n, False),
        "tiled_neighborhood_2d": (sf.neighborhood(grid, (7, 7)), grid[0] * grid[1],
                                  grid[0] * grid[1], False),
        "backward_causal": (sf.causal(), n, n, True),
        "backward_window": (sf.sliding_window(n // 7), n, n, True),
        "decode_causal": (sf.causal(), 3, n, False),
        "routed_topk_blocks": ((sf.causal() & sf.topk_blocks(16 if small else 64, 3))
                               | sf.sliding_window(16 if small else 64),
                               n, n, False),
        # the routed backward kernels (dQ on the selection, dK/dV on its transpose)
        "backward_routed_moba": ((sf.causal() & sf.topk_blocks(16 if small else 128, 3,
                                                               query_block=1))
                                 | (sf.causal() & sf.chunks(16 if small else 128)), n, n, True),
        # lines (dK/dV on the turned-around tile map) and the cluster-sorted tokens
        "backward_routed_lines": ((sf.causal() & sf.vertical_slash(8 if small else 200, 8 if small
                                                                   else 400, last_q=16 if small
                                                                   else 64))
                                  | (sf.causal() & sf.sinks(4)), n, n, True),
        "backward_routed_clusters": (sf.causal() & sf.clusters(torch.randn(
            kv_heads, 4, d, generator=torch.Generator().manual_seed(0)).to(device)), n, n, True),
    }
    rows = []
    for name, (pattern, lq, lkv, grad) in cases.items():
        torch.manual_seed(len(rows))
        q = torch.randn(1, heads, lq, d, device=device, dtype=dtype)
        k = torch.randn(1, kv_heads, lkv, d, device=device, dtype=dtype)
        v = torch.randn(1, kv_heads, lkv, d, device=device, dtype=dtype)
        row = {"case": name, "pattern": repr(pattern)[:120], "q_len": lq, "kv_len": lkv}
        try:
            if grad:
                q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = sf.attention(q, k, v, pattern, backend="triton", enable_gqa=True)
            ref = sf.reference_attention(q.detach(), k.detach(), v.detach(), pattern,
                                         enable_gqa=True)
            row["forward_rel_error"] = relative_error(out.detach(), ref)
            row["finite"] = bool(torch.isfinite(out).all())
            if grad:
                go = torch.randn_like(out)
                grads = torch.autograd.grad(out, (q, k, v), go)
                qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
                ref_out = sf.reference_attention(qd, kd, vd, pattern, enable_gqa=True)
                ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), go.double())
                for label, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
                    row[f"{label}_rel_error"] = relative_error(g, r)
            row["ok"] = row["finite"] and all(v < 2e-2 for key, v in row.items()
                                              if key.endswith("rel_error"))
        except Exception as exc:  # record and go on: one family must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["ok"] = False
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def na_mask_mod(side: int, kernel: int):
    """NATTEN's 2-D neighbourhood (window clamped inside the grid) as a mask_mod."""
    half = kernel // 2

    def mask_mod(b, h, q_idx, kv_idx):
        qx, qy, kx, ky = q_idx // side, q_idx % side, kv_idx // side, kv_idx % side
        x0 = (qx - half).clamp(0, side - kernel)
        y0 = (qy - half).clamp(0, side - kernel)
        return (kx >= x0) & (kx < x0 + kernel) & (ky >= y0) & (ky < y0 + kernel)

    return mask_mod


def timing_cases(small: bool) -> list[dict]:
    """name, pattern, lengths, FlexAttention mask_mod, the dense SDPA it is compared with,
    and whether the backward is timed."""
    long, mid = (64, 48) if small else (32768, 16384)
    side = 8 if small else 128
    window = 32 if small else 1024
    block = 16 if small else 512

    def causal(b, h, q, kv):
        return kv <= q

    def full(b, h, q, kv):
        return kv >= 0

    def window_mod(b, h, q, kv):
        return (kv <= q) & (q - kv < window)

    def own_block(q, kv):
        return ((q // block) == (kv // block)) & (kv <= q)

    moba = (sf.causal() & sf.topk_blocks(block, 3, query_block=1)) | (sf.causal() & sf.chunks(block))
    # NSA's selection branch: 16 blocks of 64 keys per 64 queries, one choice per GQA group
    # (here per head), causal; the routing is decided in the forward and kept for the backward
    nsa_block = 8 if small else 64
    nsa = sf.causal() & sf.topk_blocks(nsa_block, 4 if small else 16, query_block=nsa_block)

    def no_extra(q, kv):
        return kv < 0
    return [
        dict(name="dense", pattern=sf.full(), lq=mid, lkv=mid, mask_mod=full, causal=False,
             backward=True),
        dict(name="causal", pattern=sf.causal(), lq=mid, lkv=mid, mask_mod=causal, causal=True,
             backward=True),
        dict(name=f"sliding_window_{window}", pattern=sf.sliding_window(window), lq=long,
             lkv=long, mask_mod=window_mod, causal=True, backward=True),
        dict(name=f"na2d_7x7_{side}x{side}", pattern=sf.neighborhood((side, side), (7, 7)),
             lq=side * side, lkv=side * side, mask_mod=na_mask_mod(side, 7), causal=False,
             backward=True),
        dict(name=f"moba_top3_block{block}", pattern=moba, lq=long, lkv=long, routed=own_block,
             causal=True, backward=True),
        dict(name=f"nsa_selection_top16_block{nsa_block}", pattern=nsa, lq=long, lkv=long,
             routed=no_extra, causal=True, backward=True),
        dict(name="decode_causal", pattern=sf.causal(), lq=1, lkv=long, mask_mod=causal,
             causal=False, backward=False),
    ]


def allowed_pairs(case: dict, target: str) -> int | None:
    """Allowed (query, key) pairs of a static pattern, from the plan (exact)."""
    if case.get("routed"):
        return None
    p = sf.plan(case["pattern"], q_len=case["lq"], kv_len=case["lkv"], head_dim=128,
                target=target)
    return sum(st.useful_pairs for st in p.stats)


def time_case(case: dict, device: str, dtype, heads: int, d: int, repeats: int, clock: Clock,
              flex: bool) -> dict:
    cuda = device == "cuda"
    warm = cuda  # the smoke run on CPU times nothing real: each path once is enough
    torch.manual_seed(0)
    q = torch.randn(1, heads, case["lq"], d, device=device, dtype=dtype)
    k = torch.randn(1, heads, case["lkv"], d, device=device, dtype=dtype)
    v = torch.randn(1, heads, case["lkv"], d, device=device, dtype=dtype)
    pattern = case["pattern"]
    row = {"case": case["name"], "q_len": case["lq"], "kv_len": case["lkv"], "heads": heads,
           "head_dim": d}
    scale = d ** -0.5
    pairs = allowed_pairs(case, "sm_90" if cuda else "interpret")
    row["allowed_pairs_per_head"] = pairs
    sf_fwd = lambda: sf.attention(q, k, v, pattern, backend="triton")  # noqa: E731
    row["sparseforge_forward_s"] = timed(sf_fwd, repeats, cuda, warm)
    row["sdpa_forward_s"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=case["causal"] and case["lq"] > 1), repeats, cuda, warm)
    if pairs:
        flops = 4 * d * pairs * heads
        row["sparseforge_forward_tflops"] = round(flops / row["sparseforge_forward_s"] / 1e12, 1)
        row["forward_fraction_of_peak"] = round(row["sparseforge_forward_tflops"] / PEAK_TFLOPS, 3)
    if case["backward"]:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        go = torch.randn_like(q)

        def sf_fwd_bwd():
            out = sf.attention(qg, kg, vg, pattern, backend="triton")
            torch.autograd.grad(out, (qg, kg, vg), go)

        def sdpa_fwd_bwd():
            out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg,
                                                                   is_causal=case["causal"])
            torch.autograd.grad(out, (qg, kg, vg), go)

        row["sparseforge_forward_backward_s"] = timed(sf_fwd_bwd, repeats, cuda, warm)
        row["sdpa_forward_backward_s"] = timed(sdpa_fwd_bwd, repeats, cuda, warm)
        if pairs:
            flops = 3.5 * 4 * d * pairs * heads  # forward + 2.5x forward for the backward
            row["sparseforge_forward_backward_tflops"] = round(
                flops / row["sparseforge_forward_backward_s"] / 1e12, 1)
    if flex and clock.left() > 60:
        try:
            mask_mod = case.get("mask_mod")
            if mask_mod is None:
                mask_mod, _ = routed_mask_mod(pattern, case["routed"], q, k, scale)
            build, run = flex_run(q, k, v, mask_mod, case["lkv"])
            row["flex_blockmask_s"] = timed(build, repeats, cuda, warm)
            row["flex_forward_s"] = timed(run, repeats, cuda, warm)
            row["max_abs_diff_vs_flex"] = float((sf_fwd().float() - run().float()).abs().max())
            if case["backward"]:
                _, run_grad = flex_run(qg, kg, vg, mask_mod, case["lkv"])

                def flex_fwd_bwd():
                    return torch.autograd.grad(run_grad(), (qg, kg, vg), go)

                row["flex_forward_backward_s"] = timed(flex_fwd_bwd, repeats, cuda, warm)
                ours = torch.autograd.grad(sf.attention(qg, kg, vg, pattern, backend="triton"),
                                           (qg, kg, vg), go)
                row["max_abs_grad_diff_vs_flex"] = max(
                    float((a.float() - b.float()).abs().max()) for a, b in zip(ours, flex_fwd_bwd()))
        except Exception as exc:  # report, do not hide
            row["flex"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    elif flex:
        row["flex"] = "skipped: out of the run's time budget"
    for key in ("forward", "forward_backward"):
        ours = row.get(f"sparseforge_{key}_s")
        for other in ("sdpa", "flex"):
            theirs = row.get(f"{other}_{key}_s")
            if ours and theirs:
                row[f"speedup_{key}_vs_{other}"] = round(theirs / ours, 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the JSON (default: print only)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (interpreter)")
    parser.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--cases", default=None, help="comma-separated timing cases (default: all)")
    args = parser.parse_args(argv)
    clock = Clock(BUDGET_S)
    if args.smoke:
        device, dtype, heads, d, repeats = "cpu", torch.float32, 2, 16, 1
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --smoke)")
        device, dtype, heads, d, repeats = "cuda", torch.bfloat16, args.heads, 128, args.repeats
    result = {**result_header(device, dtype), "peak_tflops_assumed": PEAK_TFLOPS,
              "budget_s": BUDGET_S}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["multiprocessors"] = props.multi_processor_count
    result["tests"] = ({"status": "skipped (--no-tests)"} if args.no_tests or args.smoke
                       else run_gpu_tests(min(150.0, clock.left() - 300)))
    print(json.dumps({"tests": result["tests"]}), flush=True)
    result["tma_probe"] = ({"status": "skipped (CPU)"} if device == "cpu"
                           else tma_probe(min(90.0, clock.left() - 300)))
    print(json.dumps({"tma_probe": result["tma_probe"]}), flush=True)
    result["correctness"] = correctness(device, dtype, small=args.smoke)
    rows = []
    wanted = None if args.cases is None else set(args.cases.split(","))
    for case in timing_cases(small=args.smoke):
        if wanted is not None and case["name"] not in wanted:
            continue
        if clock.left() < 30:
            rows.append({"case": case["name"], "skipped": "out of the run's time budget"})
            continue
        try:
            rows.append(time_case(case, device, dtype, heads, d, repeats, clock,
                                  flex=not args.no_flex))
        except Exception as exc:  # record and go on
            rows.append({"case": case["name"], "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    result["timing"] = rows
    result["elapsed_s"] = round(BUDGET_S - clock.left(), 1)
    if args.out:
        path = Path(args.out) / f"device_suite_{result['device'].replace(' ', '_')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    print(summary(result))
    return 0 if all(r.get("ok") for r in result["correctness"]) else 1


def summary(result: dict) -> str:
    """A short table for the end of the output (the device reply carries only its tail)."""
    lines = [f"{result['device']}  torch {result['torch']}  triton {result['triton']}",
             f"tests: {result['tests'].get('summary') or result['tests'].get('status')}",
             f"tma_probe: {result['tma_probe']}"[:300],
             "correctness: " + ", ".join(f"{r['case']}={'ok' if r.get('ok') else 'FAIL'}"
                                         for r in result["correctness"])]
    for r in result["timing"]:
        if "sparseforge_forward_s" not in r:
            lines.append(f"{r['case']}: {r.get('skipped') or r.get('error')}")
            continue
        parts = [f"fwd {r['sparseforge_forward_s'] * 1e3:.2f} ms"]
        for key in ("sparseforge_forward_tflops", "speedup_forward_vs_sdpa",
                    "speedup_forward_vs_flex", "speedup_forward_backward_vs_flex"):
            if key in r:
                parts.append(f"{key.replace('sparseforge_', '')}={r[key]}")
        lines.append(f"{r['case']}: " + "  ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
