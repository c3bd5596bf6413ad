"""MoH-style head routing (Jin et al. 2024, "MoH: Multi-Head Attention as
Mixture-of-Head Attention") on a sparse pattern, with ``sf.merge``'s gated mixing.

Every token activates the shared heads and its top-k routed heads; each active head's
output row is scaled by the token's gate for that head before the output projection,
inactive heads contribute nothing:

    out, lse = sf.attention(q, k, v, pattern, return_lse=True)
    mixed, _ = sf.merge([out], [lse], weights=[gates])   # gates [B, H, L], 0 if inactive

The attention itself is any sparseforge pattern (here a causal sliding window with
sinks). All heads are computed and the inactive rows are zeroed by the gate: skipping
their work (per-head query subsets) is not expressible yet (docs/merge.md). The example
checks the layer against a per-token loop.
"""

import torch

import sparseforge as sf


class MoHAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int, shared: int, top_k: int, pattern):
        super().__init__()
        self.heads, self.shared, self.top_k, self.pattern = heads, shared, top_k, pattern
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.router = torch.nn.Linear(dim, heads - shared, bias=False)
        self.shared_gate = torch.nn.Linear(dim, 2, bias=False)  # shared vs routed balance
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def gates(self, x):
        """[B, H, L]: shared heads weighted by the first balance, the top-k routed heads by
        the second balance times their softmax score, other heads 0."""
        b, n, _ = x.shape
        balance = torch.softmax(self.shared_gate(x), -1)  # [B, L, 2]
        scores = torch.softmax(self.router(x), -1)  # [B, L, H - shared]
        top = scores.topk(self.top_k, -1)
        routed = torch.zeros_like(scores).scatter(-1, top.indices, top.values)
        shared = torch.ones(b, n, self.shared) * balance[..., :1]
        return torch.cat([shared, routed * balance[..., 1:]], -1).transpose(1, 2)

    def heads_out(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return sf.attention(q, k, v, self.pattern, return_lse=True)

    def forward(self, x):
        b, n, dim = x.shape
        out, lse = self.heads_out(x)
        mixed, _ = sf.merge([out], [lse], weights=[self.gates(x)])
        return self.proj(mixed.transpose(1, 2).reshape(b, n, dim)) * self.heads


def moh_naive(layer: MoHAttention, x):
    """Per token: sum over its active heads of gate * head output, then the projection."""
    b, n, dim = x.shape
    out, _ = layer.heads_out(x)
    gates = layer.gates(x)
    rows = torch.zeros(b, n, dim)
    hd = dim // layer.heads
    for t in range(n):
        for h in range(layer.heads):
            if gates[0, h, t] != 0:
                rows[:, t, h * hd:(h + 1) * hd] = gates[:, h, t, None] * out[:, h, t]
    return layer.proj(rows) * layer.heads


def main() -> None:
    torch.manual_seed(0)
    dim, heads, n = 256, 8, 512
    layer = MoHAttention(dim, heads, shared=2, top_k=3,
                         pattern=sf.sliding_window(128) | (sf.causal() & sf.sinks(4)))
    x = torch.randn(1, n, dim)
    with torch.no_grad():
        got, want = layer(x), moh_naive(layer, x)
        active = (layer.gates(x) > 0).float().sum(1).mean().item()
    err = (got - want).abs().max().item()
    print(f"MoH layer, L={n}, {heads} heads (2 shared + top-3 routed; {active:.1f} active per "
          f"token): max abs difference vs a per-token loop {err:.1e}")
    assert err < 1e-4
    loss = layer(x).square().mean()
    loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    print("gradients reach the router through the gates")


if __name__ == "__main__":
    main()
