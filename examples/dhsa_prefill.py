"""DHSA-style prefill (Dynamic Hierarchical Sparse Attention, 2025): variable-length
chunks, chunk vectors = mean * sqrt(len), top chunks per query chunk under a token
budget, plus a local window.

DHSA segments the sequence into chunks of varying length (here: random boundaries, as a
boundary predictor would give), scores query chunks against key chunks with
length-scaled means, and keeps the best chunks up to a token budget. With
``sf.topk_chunks`` the budget becomes a chunk count k = budget // mean chunk length
(a fixed k keeps the routing output a fixed size); a sliding window keeps the local
context. Checked against the fp64 oracle on CPU, and the budget actually used is printed.
"""

import torch

import sparseforge as sf


def random_boundaries(n: int, lo: int, hi: int, generator) -> torch.Tensor:
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + int(torch.randint(lo, hi + 1, (1,), generator=generator))))
    return torch.tensor(cuts)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, n, d = 1, 8, 2, 2048, 64
    budget, window = 512, 128
    q = torch.randn(b, heads, n, d, generator=g)
    k, v = (torch.randn(b, kv_heads, n, d, generator=g) for _ in range(2))
    bounds = random_boundaries(n, 32, 256, g)
    mean_len = n / (len(bounds) - 1)
    k_chunks = max(1, int(budget // mean_len))
    pattern = ((sf.causal() & sf.topk_chunks(bounds, k_chunks, share="group"))
               | (sf.causal() & sf.sliding_window(window)))
    out = sf.attention(q, k, v, pattern, enable_gqa=True)
    ref = sf.reference_attention(q, k, v, pattern, enable_gqa=True)
    err = (out - ref).abs().max().item()
    mask = sf.dense_mask(pattern, n, n, content=(q, k))
    keys = mask.sum(-1).float()
    print(f"DHSA prefill L={n}: {len(bounds) - 1} chunks of 32..256 tokens (mean {mean_len:.0f}), "
          f"budget {budget} -> top-{k_chunks} chunks per query chunk + window {window}, GQA "
          f"{heads}/{kv_heads}")
    print(f"keys per query: mean {keys.mean().item():.0f}, max {int(keys.max())}; "
          f"max abs error vs fp64 oracle {err:.1e}")
    assert err < 1e-4


if __name__ == "__main__":
    main()
