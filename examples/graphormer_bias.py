"""Graphormer's spatial encoding: a learned bias per pair of nodes, from their graph distance.

Graphormer (Ying et al. 2021) adds ``b[h, spd(i, j)]`` to the attention score of nodes i
and j, where ``spd`` is the shortest-path distance and ``b`` a learned scalar per head
and distance. That bias has no closed form in the positions: it is a tensor
``[H, N, N]``, given to sparseforge as ``sf.pair_bias``. Here it is combined with a mask
table that keeps pairs at most 3 hops apart (``sf.mask_table``), on a random graph of
64 nodes:

1. one forward and the gradients of q, k, v and the bias against the fp64 oracle,
2. a few training steps in which the distance embedding learns through the pair bias,
3. the same bias written as a FlexAttention ``score_mod`` and recognised by
   ``sf.from_score_mod``.

Run: python examples/graphormer_bias.py
"""

import torch

import sparseforge as sf

torch.manual_seed(0)
NODES, HEADS, D, HOPS = 64, 4, 16, 3

# a random graph and its shortest-path distances (Floyd-Warshall)
adjacent = torch.rand(NODES, NODES) < 0.02
adjacent = adjacent | adjacent.T
spd = torch.full((NODES, NODES), NODES)
spd[adjacent] = 1
spd.fill_diagonal_(0)
for m in range(NODES):
    spd = torch.minimum(spd, spd[:, m:m + 1] + spd[m:m + 1, :])
distance = spd.clamp(max=NODES - 1)
print(f"{NODES} nodes, {int(adjacent.sum()) // 2} edges, "
      f"{(spd <= HOPS).float().mean().item():.0%} of pairs within {HOPS} hops")

embedding = torch.nn.Embedding(NODES, HEADS)  # b[h, distance], learned
near = sf.mask_table(spd <= HOPS)


def pattern_of(bias):
    return near & sf.pair_bias(bias)


q, k, v = (torch.randn(1, HEADS, NODES, D, requires_grad=True) for _ in range(3))
bias = embedding(distance).permute(2, 0, 1)  # [H, N, N]

# 1. forward and gradients against the fp64 oracle
out = sf.attention(q, k, v, pattern_of(bias))
grad = torch.randn_like(out)
ours = torch.autograd.grad(out, (q, k, v, embedding.weight), grad, retain_graph=True)
leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
weight = embedding.weight.detach().double().requires_grad_()
ref = sf.reference_attention(*leaves, pattern_of(weight[distance].permute(2, 0, 1)))
theirs = torch.autograd.grad(ref, (*leaves, weight), grad.double())
print(f"output max error vs reference_attention: {(out.double() - ref).abs().max().item():.2e}")
for name, a, b in zip(("dq", "dk", "dv", "d(embedding)"), ours, theirs):
    print(f"{name} max error vs reference_attention: {(a.double() - b).abs().max().item():.2e}")

# 2. train the distance embedding (and the inputs) to match a target output
target = torch.randn(1, HEADS, NODES, D)
opt = torch.optim.Adam([*embedding.parameters(), q, k, v], lr=0.05)
for step in range(6):
    bias = embedding(distance).permute(2, 0, 1)
    loss = (sf.attention(q, k, v, pattern_of(bias)) - target).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")

# 3. the same bias as a FlexAttention score_mod
table = embedding(distance).permute(2, 0, 1).detach()


def spatial_encoding(score, b, h, q_idx, kv_idx):
    return score + table[h, q_idx, kv_idx]


print("from_score_mod:", sf.from_score_mod(spatial_encoding))
with torch.no_grad():
    flex_style = sf.attention(q, k, v, near & sf.from_score_mod(spatial_encoding))
    direct = sf.attention(q, k, v, pattern_of(table))
print(f"score_mod route max diff from pair_bias: {(flex_style - direct).abs().max().item():.2e}")
