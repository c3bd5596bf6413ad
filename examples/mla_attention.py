"""Multi-head latent attention (DeepSeek-V2/V3's MLA): v narrower than q and k.

MLA caches one small latent per token and projects keys and values out of it. Each
head's query and key are a "no-position" part from the latent plus a rotary part shared
by the heads, so q/k are wider than v (DeepSeek-V3: 128 + 64 = 192 against 128). Here a
tiny layer (q/k 48 = 32 + 16 wide, v 32 wide) runs causal attention with a sliding
window and attention sinks:

1. one forward and the gradients of q, k and v against the fp64 oracle,
2. a few training steps on the CPU path,
3. decoding one token against the cache (the split-KV decode kernel on a GPU).

Run: python examples/mla_attention.py
"""

import torch

import sparseforge as sf

torch.manual_seed(0)
HIDDEN, HEADS, LATENT, NOPE, ROPE, VDIM, L = 128, 4, 32, 32, 16, 32, 96


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the last dim of [B, H, L, R]."""
    half = x.shape[-1] // 2
    pos = torch.arange(x.shape[-2], dtype=x.dtype)[:, None]
    angle = pos / 10000 ** (torch.arange(half, dtype=x.dtype) / half)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([x[..., :half] * cos - x[..., half:] * sin,
                      x[..., :half] * sin + x[..., half:] * cos], -1)


class LatentAttention(torch.nn.Module):
    def __init__(self, pattern):
        super().__init__()
        self.q = torch.nn.Linear(HIDDEN, HEADS * (NOPE + ROPE))
        self.down = torch.nn.Linear(HIDDEN, LATENT + ROPE)  # the cached latent + rotary key
        self.up_k = torch.nn.Linear(LATENT, HEADS * NOPE)
        self.up_v = torch.nn.Linear(LATENT, HEADS * VDIM)
        self.out = torch.nn.Linear(HEADS * VDIM, HIDDEN)
        self.attn = sf.SparseAttention(pattern)

    def qkv(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, HEADS, NOPE + ROPE).transpose(1, 2)
        q = torch.cat([q[..., :NOPE], rotary(q[..., NOPE:])], -1)
        latent, k_rope = self.down(x).split([LATENT, ROPE], -1)
        k_nope = self.up_k(latent).view(b, n, HEADS, NOPE).transpose(1, 2)
        k_rope = rotary(k_rope[:, None]).expand(-1, HEADS, -1, -1)  # shared by the heads
        k = torch.cat([k_nope, k_rope], -1)
        v = self.up_v(latent).view(b, n, HEADS, VDIM).transpose(1, 2)
        return q, k, v

    def forward(self, x):
        q, k, v = self.qkv(x)
        y = self.attn(q, k, v)  # [B, H, L, VDIM]
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


pattern = sf.sliding_window(32) | sf.sinks(4)
layer = LatentAttention(pattern)
x = torch.randn(2, L, HIDDEN)
q, k, v = (t.detach().requires_grad_() for t in layer.qkv(x))
print(f"q/k head dim {q.shape[-1]}, v head dim {v.shape[-1]}")
print(sf.plan(pattern, q_len=L, kv_len=L, head_dim=q.shape[-1], value_dim=v.shape[-1],
              target="sm_90").explain().splitlines()[1])

# 1. forward and gradients against the fp64 oracle
out = sf.attention(q, k, v, pattern)
grad = torch.randn_like(out)
ours = torch.autograd.grad(out, (q, k, v), grad)
leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
ref = sf.reference_attention(*leaves, pattern)
theirs = torch.autograd.grad(ref, leaves, grad.double())
print(f"output {tuple(out.shape)}, max error vs reference_attention: "
      f"{(out.double() - ref).abs().max().item():.2e}")
for name, a, b in zip(("dq", "dk", "dv"), ours, theirs):
    print(f"{name} max error vs reference_attention: {(a.double() - b).abs().max().item():.2e}")

# 2. a few training steps (the CPU path) on a toy target
target = torch.randn(2, L, HIDDEN)
opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
for step in range(5):
    loss = (layer(x) - target).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")

# 3. one new token against the cache: its row of the full attention
with torch.no_grad():
    q, k, v = layer.qkv(x)
    new = sf.attention(q[:, :, -1:], k, v, pattern)
    full = sf.attention(q, k, v, pattern)
print(f"decode step max diff from the full forward's last row: "
      f"{(new - full[:, :, -1:]).abs().max().item():.2e}")
