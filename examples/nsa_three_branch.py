"""NSA-style three-branch attention (Yuan et al. 2025, "Native Sparse Attention"), and the
exact union merge, with ``sf.merge``.

NSA attends three ways and mixes the results with per-token, per-head sigmoid gates:

* compressed: every query reads mean-pooled key/value blocks (32 tokens) that end
  before it (a small dense attention over block summaries);
* selected: the top-n key blocks (64 tokens) per query, one choice per GQA group, plus
  the first block and the own block:
  ``(causal & topk_blocks(64, 4, query_block=16, share="group")) | (causal & chunks(64))
  | (causal & sinks(64))``;
* window: ``sliding_window(128)``.

``sf.merge(outputs, lses, weights=gates)`` mixes them (each branch keeps its own
softmax). The example checks the layer against a naive implementation (per-branch dense
masks in fp64), then shows the other use of ``sf.merge``: attention over overlapping key
sets (window and sinks) merged exactly by subtracting their intersection.
"""

import torch

import sparseforge as sf

BLOCK_CMP, BLOCK_SEL, TOP_N, WINDOW = 32, 64, 4, 128


def compressed_branch(q, k, v):
    """(out, lse) of attention over mean-pooled blocks that end at or before each query;
    queries before the first block end see nothing (0, -inf)."""
    n = k.shape[2]
    nb = n // BLOCK_CMP
    kc = k[:, :, :nb * BLOCK_CMP].unflatten(2, (nb, BLOCK_CMP)).mean(3)
    vc = v[:, :, :nb * BLOCK_CMP].unflatten(2, (nb, BLOCK_CMP)).mean(3)
    ends = (torch.arange(nb, device=q.device) + 1) * BLOCK_CMP - 1
    mask = ends[None, :] <= torch.arange(q.shape[2], device=q.device)[:, None]
    group = q.shape[1] // k.shape[1]
    kc, vc = kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1)
    s = (q.double() @ kc.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return (p @ vc.double()).to(q.dtype), lse.float()


def selected_pattern():
    return ((sf.causal() & sf.topk_blocks(BLOCK_SEL, TOP_N, query_block=16, share="group"))
            | (sf.causal() & sf.chunks(BLOCK_SEL)) | (sf.causal() & sf.sinks(BLOCK_SEL)))


def nsa_attention(q, k, v, gates):
    """gates: [B, H, L, 3] in (0, 1), one per branch."""
    branches = [compressed_branch(q, k, v),
                sf.attention(q, k, v, selected_pattern(), enable_gqa=True, return_lse=True),
                sf.attention(q, k, v, sf.sliding_window(WINDOW), enable_gqa=True,
                             return_lse=True)]
    out, _ = sf.merge([o for o, _ in branches], [lse for _, lse in branches],
                      weights=list(gates.unbind(-1)))
    return out


def nsa_naive(q, k, v, gates):
    """Each branch by its dense mask in fp64 (the selected mask from sf.dense_mask's
    routing of the same q and k), mixed by the gates."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    s = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    n = q.shape[2]

    def attend(mask):
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0) @ vv

    selected = sf.dense_mask(selected_pattern(), n, n, content=(q, k))
    window = sf.dense_mask(sf.sliding_window(WINDOW), n, n)
    outs = [compressed_branch(q, k, v)[0].double(), attend(selected), attend(window)]
    return sum(gates[..., i, None].double() * o for i, o in enumerate(outs))


def main() -> None:
    torch.manual_seed(0)
    b, hq, hkv, n, d = 1, 8, 2, 1024, 64
    q = torch.randn(b, hq, n, d)
    k, v = (torch.randn(b, hkv, n, d) for _ in range(2))
    gates = torch.sigmoid(torch.randn(b, hq, n, 3))  # NSA: a gate MLP of the token
    out = nsa_attention(q, k, v, gates)
    err = (out.double() - nsa_naive(q, k, v, gates)).abs().max().item()
    print(f"NSA three-branch layer, L={n}, {hq} query / {hkv} kv heads: max abs difference vs "
          f"per-branch dense masks {err:.1e}")
    assert err < 1e-4

    # the union merge: window and sinks overlap on early rows; subtracting their
    # intersection gives attention over window | sinks exactly
    window, sinks = sf.sliding_window(WINDOW), sf.causal() & sf.sinks(16)
    parts = [sf.attention(q, k, v, p, enable_gqa=True, return_lse=True)
             for p in (window, sinks, window & sinks)]
    merged, _ = sf.merge([parts[0][0], parts[1][0]], [parts[0][1], parts[1][1]],
                         subtract=parts[2])
    union_err = (merged - sf.attention(q, k, v, window | sinks, enable_gqa=True)).abs().max().item()
    print(f"merge(window, sinks, subtract=window & sinks) vs attention(window | sinks): "
          f"{union_err:.1e}")
    assert union_err < 1e-5


if __name__ == "__main__":
    main()
