"""MoBA-style causal LLM prefill (Lu et al. 2025, "Mixture of Block Attention").

Every token routes to the key blocks (512 tokens) whose mean key best matches it, among
the blocks it may see causally, and always attends its own block causally:

    (sf.causal() & sf.topk_blocks(512, 3, query_block=1)) | (sf.causal() & sf.chunks(512))

MoBA counts the own block inside its k; here the own block is added by the union, so
this is MoBA with k = 4 when the router does not pick the own block, and k = 3 plus own
when it does. The example checks the output against a MoBA-style naive implementation
(gate scores, top-k, a per-token block mask) and the fp64 oracle, on CPU.
"""

import time

import torch

import sparseforge as sf


def moba_naive(q, k, v, block: int, topk: int):
    """Gate = q . mean(k of block) over causally visible blocks, top-k per token (ties to
    the lower block), plus the own block; causal attention under that mask."""
    n, d = q.shape[2], q.shape[3]
    nb = -(-n // block)
    means = torch.stack([k[:, :, i * block:(i + 1) * block].mean(2) for i in range(nb)], 2)
    gate = q.float() @ means.float().transpose(-1, -2)  # [B, H, L, NB]
    own = torch.arange(n) // block
    visible = torch.arange(nb)[None, :] <= own[:, None]
    gate = gate.masked_fill(~visible, float("-inf"))
    order = torch.sort(gate, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, order, True) & visible
    chosen[..., torch.arange(n), own] = True
    token_blocks = torch.arange(n) // block
    mask = chosen[..., token_blocks] & (torch.arange(n)[None, :] <= torch.arange(n)[:, None])
    s = (q @ k.transpose(-1, -2)) * d ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v, mask


def main() -> None:
    torch.manual_seed(0)
    b, heads, n, d, block, topk = 1, 4, 4096, 64, 512, 3
    q, k, v = (torch.randn(b, heads, n, d) for _ in range(3))
    pattern = ((sf.causal() & sf.topk_blocks(block, topk, query_block=1))
               | (sf.causal() & sf.chunks(block)))
    t = time.perf_counter()
    out = sf.attention(q, k, v, pattern)
    elapsed = time.perf_counter() - t
    want, mask = moba_naive(q, k, v, block, topk)
    err = (out - want).abs().max().item()
    density = mask.float().mean().item() / 0.5
    print(f"MoBA prefill L={n}, block {block}, top-{topk} + own block, {heads} heads: "
          f"max abs difference vs the naive MoBA {err:.1e} ({elapsed:.2f} s on CPU, "
          f"{density:.2f} of the causal pairs kept)")
    assert err < 1e-4
    small = slice(0, 1024)
    qs, ks, vs = (x[:, :, small] for x in (q, k, v))
    ref_err = (sf.attention(qs, ks, vs, pattern)
               - sf.reference_attention(qs, ks, vs, pattern)).abs().max().item()
    print(f"L=1024 vs sf.reference_attention (fp64): {ref_err:.1e}")
    assert ref_err < 1e-4


if __name__ == "__main__":
    main()
