"""A Routing Transformer layer (Roy et al. 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers") with ``sf.clusters``.

Queries and keys are unit-normalised and routed to their nearest k-means centroid; a
query attends only to keys routed to the same centroid, causally:

    pattern = sf.causal() & sf.clusters(centroids)            # centroids [Hkv, C, D]

The centroids are trained the Routing Transformer way: an exponential moving average of
the normalised keys and queries assigned to each (k-means, no gradient). The example
runs a few such updates, then checks the attention against a literal per-cluster
implementation (gather each cluster's queries and keys, attend causally, scatter back)
and shows the balanced variant (every centroid takes its w nearest tokens).
"""

import torch

import sparseforge as sf


def kmeans_update(centroids, x, decay=0.9):
    """One EMA k-means step per kv head: centroids [H, C, D], x [B, H, L, D]."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    assign = (xn @ centroids.transpose(-1, -2)[None]).argmax(-1)  # [B, H, L]
    onehot = torch.nn.functional.one_hot(assign, centroids.shape[1]).float()  # [B, H, L, C]
    sums = torch.einsum("bhlc,bhld->hcd", onehot, xn)
    counts = onehot.sum((0, 2))[..., None]  # [H, C, 1]
    means = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return torch.nn.functional.normalize(decay * centroids + (1 - decay) * means, dim=-1)


def per_cluster_attention(q, k, v, centroids):
    """Literal: for each head and cluster, its queries attend its keys causally."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            aq = (torch.nn.functional.normalize(q[bi, hi], dim=-1) @ centroids[hi].T).argmax(-1)
            ak = (torch.nn.functional.normalize(k[bi, hi], dim=-1) @ centroids[hi].T).argmax(-1)
            for c in range(centroids.shape[1]):
                qs, ks = (aq == c).nonzero().flatten(), (ak == c).nonzero().flatten()
                if len(qs) == 0:
                    continue
                s = (q[bi, hi, qs].double() @ k[bi, hi, ks].double().T) * d ** -0.5
                s = s.masked_fill(ks[None, :] > qs[:, None], float("-inf"))
                p = torch.softmax(s, -1).nan_to_num(0.0)  # a query with no earlier key: 0
                out[bi, hi, qs] = p @ v[bi, hi, ks].double()
    return out


def main() -> None:
    torch.manual_seed(0)
    b, heads, n, d, clusters = 1, 4, 1024, 64, 8
    q, k, v = (torch.randn(b, heads, n, d) for _ in range(3))
    centroids = torch.nn.functional.normalize(torch.randn(heads, clusters, d), dim=-1)
    for _ in range(5):  # k-means on the keys and queries, as during training
        centroids = kmeans_update(centroids, torch.cat([q, k], 2))
    pattern = sf.causal() & sf.clusters(centroids)
    out = sf.attention(q, k, v, pattern)
    err = (out.double() - per_cluster_attention(q, k, v, centroids)).abs().max().item()
    density = sf.dense_mask(pattern, n, n, content=(q, k)).float().mean().item() / 0.5
    print(f"Routing Transformer layer, L={n}, {heads} heads, {clusters} clusters: "
          f"max abs difference vs per-cluster attention {err:.1e} ({density:.3f} of the "
          "causal pairs kept)")
    assert err < 1e-4

    balanced = sf.causal() & sf.clusters(centroids, balanced=n // clusters)
    kept = sf.dense_mask(balanced, n, n, content=(q, k)).float().mean().item() / 0.5
    ref_err = (sf.attention(q, k, v, balanced)
               - sf.reference_attention(q, k, v, balanced)).abs().max().item()
    print(f"balanced clusters ({n // clusters} tokens each): {kept:.3f} of the causal pairs "
          f"kept, max abs difference vs sf.reference_attention {ref_err:.1e}")
    assert ref_err < 1e-4


if __name__ == "__main__":
    main()
