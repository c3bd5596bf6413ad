"""A spec file for `sparseforge build`: the attention layers of a long-context model.

    sparseforge plan  examples/aot_specs.py:local_layers --png local.png
    sparseforge build examples/aot_specs.py --arch sm_80,sm_90 --out build/kernels
    SPARSEFORGE_KERNELS=build/kernels python serve.py      # or sf.load_kernels(...)

A spec file is a Python module defining SPECS, a list of sf.BuildSpec. The lengths are
what the plan is made for; the kernels serve every length whose plan renders the same
kernels (tile bounds are run-time arithmetic, so in practice any length).
"""

import sparseforge as sf

SPECS = [
    # Mistral/Gemma-style local layers: sliding window 4096 plus 4 attention sinks, GQA 32/8
    sf.BuildSpec("local_layers", sf.sliding_window(4096) | sf.sinks(4), q_len=32768,
                 kv_len=32768, head_dim=128, dtype="bfloat16", heads=32, kv_heads=8),
    # the global layers of the same model
    sf.BuildSpec("global_layers", sf.causal(), q_len=32768, kv_len=32768, head_dim=128,
                 dtype="bfloat16", heads=32, kv_heads=8),
]
