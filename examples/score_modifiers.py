"""Score modifiers: ALiBi, a learned relative-position bias and logit soft-capping.

A tiny attention layer whose pattern is a causal sliding window with

* ``sf.alibi(slopes)``       fixed per-head linear distance penalties (ALiBi),
* ``sf.rel_bias(table)``     a learned bias per relative offset, clipped at +-R (Shaw et
                             al.; the 1-D form of Swin's relative-position bias),
* ``sf.softcap(c)``          Gemma 2's logit soft-cap ``c * tanh(s / c)``.

It checks one forward and the gradients (q, k, v and the bias table) against the fp64
oracle, then trains the table for a few steps on the CPU path (backend "torch"), and
the same layer runs under torch.compile(fullgraph=True). Run: python examples/score_modifiers.py
"""

import torch

import sparseforge as sf

torch.manual_seed(0)
HEADS, KV_HEADS, D, L, WINDOW, RADIUS = 4, 2, 32, 96, 32, 8

table = torch.nn.Parameter(torch.zeros(HEADS, 2 * RADIUS + 1))
pattern = (sf.sliding_window(WINDOW) & sf.alibi(sf.alibi_slopes(HEADS)) & sf.rel_bias(table)
           & sf.softcap(20.0))
print("pattern:", pattern)
print(next(line for line in sf.plan(pattern, q_len=L, kv_len=L, head_dim=D).explain().splitlines()
           if "scores" in line))

q = torch.randn(1, HEADS, L, D, requires_grad=True)
k = torch.randn(1, KV_HEADS, L, D, requires_grad=True)
v = torch.randn(1, KV_HEADS, L, D, requires_grad=True)
with torch.no_grad():
    table.normal_(0, 0.5)

# 1. forward and gradients against the fp64 oracle
out = sf.attention(q, k, v, pattern, enable_gqa=True)
out.square().sum().backward()
ours = [t.grad.clone() for t in (q, k, v, table)]
for t in (q, k, v, table):
    t.grad = None
ref = sf.reference_attention(q.double(), k.double(), v.double(), pattern, enable_gqa=True)
ref.square().sum().backward()
print(f"max |out - fp64 oracle|   {(out.double() - ref).abs().max().item():.2e}")
for name, g, t in zip(("dq", "dk", "dv", "dtable"), ours, (q, k, v, table)):
    err = (g.double() - t.grad.double()).abs().max() / t.grad.abs().max()
    print(f"max |{name:6s} - oracle| / max |oracle|  {err.item():.2e}")

# 2. learn the bias table: pull the output towards a target made with another table
with torch.no_grad():
    target_table = torch.randn(HEADS, 2 * RADIUS + 1)
    target = sf.attention(q, k, v, sf.sliding_window(WINDOW) & sf.alibi(sf.alibi_slopes(HEADS))
                          & sf.rel_bias(target_table) & sf.softcap(20.0), enable_gqa=True)
opt = torch.optim.Adam([table], lr=0.1)
for step in range(30):
    opt.zero_grad()
    loss = (sf.attention(q.detach(), k.detach(), v.detach(), pattern, enable_gqa=True)
            - target).square().mean()
    loss.backward()
    opt.step()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.5f}")

# 3. the same layer inside torch.compile: one custom op, the table still trains
compiled = torch.compile(lambda q, k, v: sf.attention(q, k, v, pattern, enable_gqa=True),
                         fullgraph=True, backend="aot_eager")
table.grad = None
compiled(q.detach(), k.detach(), v.detach()).square().sum().backward()
print("torch.compile(fullgraph=True): table grad norm", f"{table.grad.norm().item():.3f}")
