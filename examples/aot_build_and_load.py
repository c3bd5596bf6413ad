"""Build kernels ahead of time on a machine with no GPU, then load them with zero
compilation. Run from the repository root:

    python examples/aot_build_and_load.py

This is what `sparseforge build examples/aot_specs.py --arch sm_80,sm_90 --out DIR`
does, followed by what a serving process does with `sf.load_kernels(DIR)`. On a GPU the
loaded kernels are launched by `sf.attention`; on CPU the script shows that every kernel
the specs need resolves to a prebuilt binary without calling the compiler.
"""

import tempfile
from pathlib import Path

import torch
import triton

import sparseforge as sf
from sparseforge.aot.build import build
from sparseforge.aot.spec import load_spec_file
from sparseforge.runtime import binaries, gpu_launch
from sparseforge.runtime.compile import plan_target

SPECS = Path(__file__).with_name("aot_specs.py")


def main():
    specs = load_spec_file(SPECS)
    with tempfile.TemporaryDirectory() as out:
        manifest = build(specs, ["sm_80", "sm_90"], out)
        print((Path(out) / "report.md").read_text())

        # --- a serving process ------------------------------------------------------
        print("registered", sf.load_kernels(out), "prebuilt kernels")
        compiled_before = binaries.COUNTERS["compiled"]
        for spec in specs:
            for arch in manifest["archs"]:
                p = spec.plan(plan_target(arch))
                for index in range(len(p.kernels)):
                    held = gpu_launch.resolve_kernel(p, index, arch)
                    print(f"  {spec.name:14s} {arch}  {held.name}: {held.source}")
        print("triton.compile calls while loading:", binaries.COUNTERS["compiled"] - compiled_before)

        if torch.cuda.is_available():
            spec = specs[0]
            q = torch.randn(1, spec.heads, 8192, spec.head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, spec.kv_heads, 8192, spec.head_dim, device="cuda",
                                dtype=torch.bfloat16) for _ in range(2))
            out_gpu = sf.attention(q, k, v, spec.pattern, enable_gqa=True)
            ref = sf.reference_attention(q[:, :, -256:].float(), k.float(), v.float(),
                                         spec.pattern, enable_gqa=True)
            print("max |error| on the last 256 queries:",
                  (out_gpu[:, :, -256:].float() - ref.float()).abs().max().item())
        else:
            print(f"no GPU here (Triton {triton.__version__}): kernels resolved, not launched")


if __name__ == "__main__":
    main()
