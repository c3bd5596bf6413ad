"""N-D neighbourhood attention (NAT / DiNAT / GNA, MaxViT, HaloNet) on CPU.

Runs a dilated 2-D neighbourhood through the NATTEN-style API, checks it against the
fp64 oracle, adds NATTEN-style extra tokens (merged by log-sum-exp), shows the planner's
N-D tiled layout next to FlexAttention's BlockMask, runs MaxViT block attention with its
relative-position bias table, and trains one step of a small DiNAT-style block
(gradients flow through the layout).
"""

import torch

import sparseforge as sf


def main() -> None:
    torch.manual_seed(0)
    b, h, w, heads, d = 2, 28, 28, 4, 32
    x = torch.randn(b, h, w, heads, d)

    # NATTEN's functional API, heads-last: switch by changing the import
    out = sf.na2d(x, x, x, kernel_size=7, dilation=2)
    pattern = sf.neighborhood((h, w), 7, dilation=2)
    flat = x.flatten(1, 2).transpose(1, 2)
    ref = sf.reference_attention(flat, flat, flat, pattern)
    err = (out - ref.transpose(1, 2).reshape(out.shape)).abs().max().item()
    print(f"na2d 7x7 dilation 2 on {h}x{w}: max abs error vs fp64 oracle {err:.1e}")
    assert err < 1e-4

    # NATTEN 0.21's extra tokens (e.g. text beside an image), merged by log-sum-exp, and
    # its lse output; NATTEN's kernel knobs are accepted and left to the planner
    text_k, text_v = torch.randn(b, 6, heads, d), torch.randn(b, 6, heads, d)
    out, lse = sf.na2d(x, x, x, 7, dilation=2, additional_keys=text_k, additional_values=text_v,
                       backend="cutlass-fna", return_lse=True)
    keys = torch.cat([flat, text_k.transpose(1, 2)], 2)
    values = torch.cat([flat, text_v.transpose(1, 2)], 2)
    # the same pairs in one sequence: grid keys by the rule, extra keys for every query
    mask = torch.cat([sf.dense_mask(pattern, h * w, h * w), torch.ones(h * w, 6, dtype=torch.bool)], 1)
    ref = torch.nn.functional.scaled_dot_product_attention(flat, keys, values, attn_mask=mask)
    err = (out - ref.transpose(1, 2).reshape(out.shape)).abs().max().item()
    print(f"na2d + 6 extra tokens: max abs error vs masked SDPA {err:.1e}, lse {tuple(lse.shape)}")
    assert err < 1e-4

    # the plan: tokens permuted into N-D tiles, one contiguous run per row of key tiles
    plan = sf.plan(pattern, q_len=h * w, kv_len=h * w, head_dim=d, target="sm_90")
    print("\n".join(line for line in plan.explain().splitlines()
                    if line.strip().startswith(("permutation", "utilisation", "flex"))))

    # the conveniences lower to the same rule
    for name, p in (("MaxViT block 7x7", sf.maxvit_block((h, w), 7)),
                    ("MaxViT grid 4x4", sf.maxvit_grid((h, w), 4)),
                    ("HaloNet block 4, halo 2", sf.halo_blocks((h, w), 4, 2))):
        keys = sf.dense_mask(p, h * w, h * w).sum(1)
        print(f"{name:24s} keys per query: {int(keys.min())}..{int(keys.max())}")

    # MaxViT block attention with its relative-position bias table [H, 2P-1, 2P-1]:
    # each pair reads the entry of its offset inside the 7x7 block
    table = torch.nn.Parameter(0.1 * torch.randn(heads, 13, 13))
    block = sf.maxvit_block((h, w), 7) & sf.rel_bias(table)
    out = sf.attention(flat, flat, flat, block)
    err = (out - sf.reference_attention(flat, flat, flat, block)).abs().max().item()
    out.square().mean().backward()  # the table trains on the CPU path
    print(f"MaxViT block + 13x13 bias table: max abs error {err:.1e}, "
          f"table grad norm {table.grad.norm().item():.3f}")
    assert err < 1e-4

    # one training step of a DiNAT-style block: gradients through the layout
    proj = torch.nn.Linear(heads * d, 3 * heads * d)
    tokens = torch.randn(b, h * w, heads * d)
    q, k, v = proj(tokens).view(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
    loss = sf.attention(q, k, v, pattern).square().mean()
    loss.backward()
    print(f"training step: loss {loss.item():.4f}, grad norm {proj.weight.grad.norm().item():.3f}")


if __name__ == "__main__":
    main()
