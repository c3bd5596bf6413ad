"""Train and serve with one pattern: gradients through the generated backward kernels,
then a KV-cache decode loop on the split-KV decode kernel.

On a GPU this runs the compiled Triton kernels. On a CPU-only machine it runs the very
same generated kernels in Triton's interpreter (slow, small sizes), so it works anywhere:

    python examples/train_and_decode.py
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import sparseforge as sf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
PATTERN = sf.sliding_window(48) | sf.sinks(4)  # StreamingLLM-style: a window plus sinks
B, HQ, HKV, D = 1, 8, 2, 64  # GQA: 4 query heads per kv head


def training_step(length: int = 160) -> None:
    """One backward pass: dQ walks the forward's kv tiles per query tile, dK/dV walks the
    inverted bounds per kv tile; both are generated kernels, deterministic."""
    torch.manual_seed(0)
    q = torch.randn(B, HQ, length, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(B, HKV, length, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn(B, HKV, length, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    out = sf.attention(q, k, v, PATTERN, enable_gqa=True, backend="triton")
    out.square().mean().backward()

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sf.reference_attention(*leaves, PATTERN, enable_gqa=True)
    ref.square().mean().backward()
    for name, t, r in zip("qkv", (q, k, v), leaves):
        err = (t.grad.double() - r.grad).abs().max().item()
        print(f"d{name}: max |generated - fp64 oracle| = {err:.2e}")


def decode_loop(prompt: int = 200, steps: int = 6, draft: int = 4) -> None:
    """Prefill once, then one token per step and one speculative step of ``draft``
    tokens: each step runs the decode kernel (heads of a GQA group packed per program,
    the cache split across programs, partials merged by their log-sum-exp)."""
    torch.manual_seed(1)
    k_cache = torch.randn(B, HKV, prompt, D, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(B, HKV, prompt, D, device=DEVICE, dtype=DTYPE)
    worst = 0.0
    for new in [1] * steps + [draft]:
        q = torch.randn(B, HQ, new, D, device=DEVICE, dtype=DTYPE)
        k_cache = torch.cat([k_cache, torch.randn(B, HKV, new, D, device=DEVICE, dtype=DTYPE)], 2)
        v_cache = torch.cat([v_cache, torch.randn(B, HKV, new, D, device=DEVICE, dtype=DTYPE)], 2)
        out = sf.attention(q, k_cache, v_cache, PATTERN, enable_gqa=True, backend="triton")
        ref = sf.reference_attention(q, k_cache, v_cache, PATTERN, enable_gqa=True)
        worst = max(worst, (out.double() - ref).abs().max().item())
    print(f"decode: {steps} single-token steps and one {draft}-token step over a "
          f"{k_cache.shape[2]}-token cache; max |decode - fp64 oracle| = {worst:.2e}")


if __name__ == "__main__":
    training_step()
    decode_loop()
