"""Train with dynamic sparsity: a MoBA-style and an NSA-style (three gated branches)
attention layer fit a small batch of copy-task sequences, the routing on in every step.

The routed layers train through sparseforge's routed backward: with
``backend="triton"`` the generated dQ and dK/dV kernels walk the forward's selection
(dK/dV through its on-device transpose); with ``backend="torch"`` the torch path attends
the gathered static tiles and selected buckets in memory linear in the length. Routing
decisions are not differentiated (as in MoBA and NSA); NSA's gates and compressed branch
are. Both backends start from the same weights and see the same batch, so their
losses agree step by step. On a CPU-only machine the Triton kernels run in Triton's
interpreter (slow: small sizes, and only the first steps are run on both backends):

    python examples/train_routed.py
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

from nsa_three_branch import compressed_branch  # noqa: E402  (this directory)

import sparseforge as sf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB, LENGTH, BATCH, STEPS = 16, 64, 2, 12
#: steps the generated kernels run (all of them on a GPU; in the interpreter, the first few)
KERNEL_STEPS = STEPS if DEVICE == "cuda" else 2
HQ, HKV, D = 4, 2, 16  # GQA: 2 query heads per kv head
BLOCK = 16

# MoBA: each token picks its top-2 earlier blocks of 16 keys (by the mean key), plus its
# own block causally
MOBA = ((sf.causal() & sf.topk_blocks(BLOCK, 2, query_block=1))
        | (sf.causal() & sf.chunks(BLOCK)))
# NSA's selection branch: top-2 blocks per 16 queries, one choice per GQA group
NSA_SELECTED = sf.causal() & sf.topk_blocks(BLOCK, 2, query_block=16, share="group")
NSA_WINDOW = sf.sliding_window(16)


class RoutedLayer(torch.nn.Module):
    """Token embedding, one attention layer (MoBA, or NSA's three gated branches), logits."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = torch.nn.Embedding(VOCAB, HQ * D)
        self.position = torch.nn.Parameter(0.1 * torch.randn(LENGTH, HQ * D))
        self.qkv = torch.nn.Linear(HQ * D, (HQ + 2 * HKV) * D)
        self.gate = torch.nn.Linear(HQ * D, 3 * HQ)  # NSA: a sigmoid gate per branch and head
        self.out = torch.nn.Linear(HQ * D, VOCAB)

    def forward(self, tokens: torch.Tensor, backend: str) -> torch.Tensor:
        b, n = tokens.shape
        x = self.embed(tokens) + self.position[:n]
        q, k, v = self.qkv(x).split([HQ * D, HKV * D, HKV * D], -1)
        q, k, v = (t.view(b, n, -1, D).transpose(1, 2) for t in (q, k, v))
        if self.kind == "moba":
            y = sf.attention(q, k, v, MOBA, enable_gqa=True, backend=backend)
        else:
            gates = torch.sigmoid(self.gate(x)).view(b, n, HQ, 3).transpose(1, 2)
            branches = [compressed_branch(q, k, v),
                        sf.attention(q, k, v, NSA_SELECTED, enable_gqa=True, backend=backend,
                                     return_lse=True),
                        sf.attention(q, k, v, NSA_WINDOW, enable_gqa=True, backend=backend,
                                     return_lse=True)]
            y, _ = sf.merge([o for o, _ in branches], [lse for _, lse in branches],
                            weights=list(gates.unbind(-1)))
        return self.out(y.transpose(1, 2).reshape(b, n, HQ * D))


def copy_batch() -> torch.Tensor:
    """Random tokens whose second half repeats the first: the second half is predictable
    only by attending ``LENGTH / 2`` tokens back, beyond the local block and window."""
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, VOCAB, (BATCH, LENGTH // 2), generator=g)
    return torch.cat([half, half], 1).to(DEVICE)


def train(kind: str, backend: str, steps: int) -> list[float]:
    """Next-token loss on the copied half, per step, from the same initial weights."""
    torch.manual_seed(0)
    model = RoutedLayer(kind).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = copy_batch()
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1], backend)
        loss = torch.nn.functional.cross_entropy(
            logits[:, LENGTH // 2:].reshape(-1, VOCAB), tokens[:, LENGTH // 2 + 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    for kind in ("moba", "nsa"):
        torch_path = train(kind, "torch", STEPS)
        kernels = train(kind, "triton", KERNEL_STEPS)
        print(f"{kind}: loss per step (torch path | generated kernels)")
        for step, loss in enumerate(torch_path):
            print(f"  step {step:2d}: {loss:.4f} | "
                  + (f"{kernels[step]:.4f}" if step < len(kernels) else "(not run)"))
        gap = max(abs(a - b) for a, b in zip(torch_path, kernels))
        print(f"  max |loss difference| torch vs triton over {len(kernels)} steps: {gap:.1e}")
        assert torch_path[-1] < 0.6 * torch_path[0], f"{kind}: the loss did not go down"
        assert kernels[-1] < kernels[0], f"{kind}: the loss did not go down on the kernels"


if __name__ == "__main__":
    main()
