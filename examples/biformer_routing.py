"""BiFormer's bi-level routing attention (Zhu et al., CVPR 2023) as one sparseforge pattern.

A 2-D feature map is split into S x S regions; each region routes to the top-k regions
by the dot product of region-mean queries and keys, shared across heads, then attends
to every token of those regions. With tokens in region-major order a region is a
contiguous block, so the layer is ``sf.topk_blocks(region_tokens, k, share="all")``.
This checks it against a BiFormer-style gather implementation (pool, route, gather the
routed regions' keys and values, dense attention per region) on CPU.
"""

import torch

import sparseforge as sf


def region_major(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B, H*W, C] image tokens -> [B, S*S * region, C], each region contiguous."""
    b, n, c = x.shape
    side = int(n ** 0.5)
    r = side // s
    return x.view(b, s, r, s, r, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)


def biformer_gather(q, k, v, region: int, topk: int):
    """The paper's algorithm: region means, routing across all heads, gathered kv."""
    b, h, n, d = q.shape
    nr = n // region
    qr = q.view(b, h, nr, region, d).mean(3)  # [B, H, R, D]
    kr = k.view(b, h, nr, region, d).mean(3)
    affinity = torch.einsum("bhid,bhjd->bij", qr, kr)  # shared by all heads
    order = torch.sort(affinity, dim=-1, descending=True, stable=True).indices[..., :topk]
    idx = order.sort(-1).values  # [B, R, k]
    out = torch.empty_like(q).view(b, h, nr, region, d)
    for bi in range(b):
        kg = k[bi].view(h, nr, region, d)[:, idx[bi]].flatten(2, 3)  # [H, R, k*region, D]
        vg = v[bi].view(h, nr, region, d)[:, idx[bi]].flatten(2, 3)
        qb = q[bi].view(h, nr, region, d)
        att = torch.softmax(qb @ kg.transpose(-1, -2) * d ** -0.5, -1)
        out[bi] = att @ vg
    return out.view(b, h, n, d)


def main() -> None:
    torch.manual_seed(0)
    b, side, s, heads, d, topk = 2, 28, 4, 4, 32, 4
    region = (side // s) ** 2  # 49 tokens per 7x7 region
    x = region_major(torch.randn(b, side * side, heads * d), s)
    proj = torch.nn.Linear(heads * d, 3 * heads * d)
    q, k, v = proj(x).view(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)

    pattern = sf.topk_blocks(region, topk, share="all")
    out = sf.attention(q, k, v, pattern)
    want = biformer_gather(q.detach(), k.detach(), v.detach(), region, topk)
    err = (out - want).abs().max().item()
    print(f"BiFormer routing, {s}x{s} regions of {region} tokens, top-{topk}, {heads} heads: "
          f"max abs difference vs the gather implementation {err:.1e}")
    assert err < 1e-4
    ref_err = (out - sf.reference_attention(q, k, v, pattern)).abs().max().item()
    print(f"vs sf.reference_attention (fp64, routed mask): {ref_err:.1e}")
    assert ref_err < 1e-4

    out.square().mean().backward()  # the layer trains through the routed mask
    print(f"grad norm of the qkv projection: {proj.weight.grad.norm().item():.4f}")
    print("\n".join(sf.plan(pattern, q_len=side * side, kv_len=side * side, head_dim=d,
                            target="sm_90").explain().splitlines()[-7:]))


if __name__ == "__main__":
    main()
