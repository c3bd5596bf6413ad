"""GPU benchmark of N-D neighbourhood attention (issue 3): 2-D NA 7x7 (dilation 1 and 4)
on 128x128 and 3-D 3x7x7 on 16x64x64, bf16, D=64 and 128, against dense SDPA (flash, no
mask: the cost sparsity must beat) and compiled FlexAttention given NATTEN's mask as a
mask_mod (the same rule, ``neighborhood_keep``). Forward, and forward + backward.
Writes bench/results/neighborhood_<device>.json.

    python bench/neighborhood_gpu.py            # on a CUDA device
    python bench/neighborhood_gpu.py --smoke    # tiny sizes on CPU (interpreter)

Timings: CUDA events, median of --repeats after a warm-up. The first (cold) call of each
is timed too: sparseforge's plan + render + compile from an empty cache, Flex's compile
+ BlockMask build. Each row records the max abs difference between sparseforge's and
Flex's outputs on the same input, so a fast wrong kernel cannot hide; and the plan's
tile utilisation beside the Flex BlockMask's where the mask is small enough to count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SPARSEFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sf-bench-")  # cold compiles

import torch  # noqa: E402
from gpu_timing import flex_run, once, timed, write_result  # noqa: E402  (bench/ sibling)

import sparseforge as sf  # noqa: E402
from sparseforge.ir.neighborhood import neighborhood_keep  # noqa: E402
from sparseforge.semantics import TorchOps  # noqa: E402

CASES = {  # name -> (shape, kernel, dilation)
    "na2d_7x7_128x128": ((128, 128), 7, 1),
    "na2d_7x7_dil4_128x128": ((128, 128), 7, 4),
    "na3d_3x7x7_16x64x64": ((16, 64, 64), (3, 7, 7), 1),
}
SMOKE = {
    "na2d_3x3_12x12": ((12, 12), 3, 1),
    "na2d_3x3_dil2_12x12": ((12, 12), 3, 2),
    "na3d_3x3x3_3x6x6": ((3, 6, 6), 3, 1),
}


def natten_mask_mod(pattern):
    """NATTEN's rule as a FlexAttention mask_mod (flat row-major positions)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return neighborhood_keep(pattern, q_idx, kv_idx, TorchOps)

    return mask_mod


def bench_case(name, shape, kernel, dilation, heads, head_dim, repeats, device, dtype) -> dict:
    torch.manual_seed(0)
    cuda = device == "cuda"
    pattern = sf.neighborhood(shape, kernel, dilation=dilation)
    length = pattern.size
    q, k, v = (torch.randn(1, heads, length, head_dim, device=device, dtype=dtype)
               for _ in range(3))
    go = torch.randn_like(q)
    row = {"case": name, "pattern": repr(pattern), "length": length, "heads": heads,
           "head_dim": head_dim}
    target = "sm_90" if not cuda else None
    plan = sf.plan(pattern, q_len=length, kv_len=length, head_dim=head_dim,
                   dtype=str(dtype).removeprefix("torch."),
                   target=target or f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
    stats = plan.stats[0]
    row.update(tiled=plan.layout is not None, block_m=plan.block_m, block_n=plan.block_n,
               utilisation=round(stats.utilisation, 4), tiles_visited=stats.visited)

    def ours():
        return sf.attention(q, k, v, pattern, backend="triton")

    row["sparseforge_cold_s"] = once(ours, cuda)
    row["sparseforge_fwd_s"] = timed(ours, repeats, cuda)
    out = ours()
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def ours_train():
        sf.attention(qg, kg, vg, pattern, backend="triton").backward(go)

    try:
        row["sparseforge_fwd_bwd_s"] = timed(ours_train, repeats, cuda)
    except Exception as exc:  # report, do not hide
        row["sparseforge_fwd_bwd"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"

    mask_mod = natten_mask_mod(pattern)
    try:
        holder = {}

        def flex_cold():
            holder["build"], holder["run"] = flex_run(q, k, v, mask_mod)
            holder["run"]()

        row["flex_cold_s"] = once(flex_cold, cuda)
        row["flex_blockmask_s"] = timed(holder["build"], repeats, cuda)
        row["flex_fwd_s"] = timed(holder["run"], repeats, cuda)
        row["max_abs_diff_vs_flex"] = float((out.float() - holder["run"]().float()).abs().max())
        _, run_grad = flex_run(qg, kg, vg, mask_mod)
        row["flex_fwd_bwd_s"] = timed(lambda: run_grad().backward(go), repeats, cuda)
    except Exception as exc:  # report, do not hide
        row["flex"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    if length <= 4096:  # dense BlockMask count: small masks only
        from sparseforge.planner.flex_blocks import flex_blocks

        row["flex_blockmask_utilisation"] = round(flex_blocks(pattern, length, length).utilisation, 4)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    row["sdpa_dense_fwd_s"] = timed(lambda: sdpa(q, k, v), repeats, cuda)
    row["sdpa_dense_fwd_bwd_s"] = timed(lambda: sdpa(qg, kg, vg).backward(go), repeats, cuda)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype, cases, head_dims = "cpu", torch.float32, SMOKE, [16]
        args.heads, args.repeats = 2, 1
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --smoke)")
        device, dtype, cases = "cuda", torch.bfloat16, CASES
        head_dims = [int(x) for x in args.head_dims.split(",")]
    rows = []
    for d in head_dims:
        for name, (shape, kernel, dilation) in cases.items():
            rows.append(bench_case(name, shape, kernel, dilation, args.heads, d, args.repeats,
                                   device, dtype))
            print(json.dumps(rows[-1]), flush=True)
    write_result(device, dtype, rows, "neighborhood", None if args.smoke else args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
