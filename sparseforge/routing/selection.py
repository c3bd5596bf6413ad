"""What a routing rule decides, and the index layouts the kernels read.

``BlockSelection``: per (batch, routing head, query bucket) the selected key buckets,
where buckets are blocks, chunks or single tokens (``query_block=1``). ``LineSelection``:
MInference's selected key columns and diagonals. Both answer ``pair_mask(p, j)`` for the
oracle; ``BlockSelection`` also emits the fixed-k layout (``fixed_k_indices``) and the
count + offsets (CSR) layout (``csr``) for variable counts. Everything stays on the
device: no host synchronisation, fixed output sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def bucket_of(positions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Bucket index of each position given bucket starts ``[B or 1, C + 1]`` (the last
    entry is the end): ``[B or 1, *positions.shape]``, -1 before the first bucket and C at
    or past the end."""
    flat = positions.reshape(1, -1).expand(starts.shape[0], -1).contiguous()
    idx = torch.searchsorted(starts.contiguous(), flat, right=True) - 1
    idx = torch.where(flat >= starts[:, -1:], starts.shape[-1] - 1, idx)
    return idx.view(starts.shape[0], *positions.shape)


def ascending_indices(flags: torch.Tensor, width: int) -> torch.Tensor:
    """int32 ``[..., width]``: the indices of the set ``flags`` along the last dim,
    ascending, -1 after the last (device ops, a fixed width)."""
    n = flags.shape[-1]
    keyed = torch.where(flags, torch.arange(n, device=flags.device), n)  # unset sort last
    idx = keyed.sort(dim=-1).values[..., :width]
    if idx.shape[-1] < width:
        idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]), value=n)
    return torch.where(idx == n, -1, idx).to(torch.int32)


@dataclass(frozen=True)
class BlockSelection:
    """``selected`` bool ``[B, Hr, Cq, Ck]``; buckets by query position ``p`` in
    ``q_starts`` and by key in ``k_starts`` (``[B or 1, C + 1]``); ``heads`` maps each query
    head to its routing head (share = head, group or all)."""

    selected: torch.Tensor
    q_starts: torch.Tensor
    k_starts: torch.Tensor
    heads: torch.Tensor

    def pair_mask(self, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, Hq, *pairs]``: is key ``j``'s bucket selected for ``p``'s bucket."""
        b, _, cq, ck = self.selected.shape
        qb = bucket_of(p, self.q_starts.to(p.device))  # [B|1, *p.shape]
        kb = bucket_of(j, self.k_starts.to(j.device))
        real = (qb >= 0) & (qb < cq) & (kb >= 0) & (kb < ck)
        qb, kb = qb.clamp(0, cq - 1), kb.clamp(0, ck - 1)
        sel = self.selected[:, self.heads.to(self.selected.device)]  # [B, Hq, Cq, Ck]
        pairs = torch.broadcast_shapes(p.shape, j.shape)
        flat = (qb * ck + kb).expand(-1, *pairs).reshape(qb.shape[0], -1)
        flat = flat.expand(b, -1)
        out = torch.gather(sel.flatten(2), 2, flat[:, None].expand(-1, sel.shape[1], -1))
        return out.view(b, sel.shape[1], *pairs) & real.expand(-1, *pairs)[:, None]

    @classmethod
    def from_fixed_k(cls, indices: torch.Tensor, q_starts, k_starts, heads) -> BlockSelection:
        """The selection a fixed-k layout (``-1`` padded) holds: what the generated
        pre-kernels return."""
        ck = k_starts.shape[-1] - 1
        valid = indices >= 0
        selected = torch.zeros(*indices.shape[:3], ck + 1, dtype=torch.bool, device=indices.device)
        selected.scatter_(-1, torch.where(valid, indices, ck).long(), True)
        return cls(selected[..., :ck], q_starts.long(), k_starts.long(), heads)

    def fixed_k_indices(self, k: int) -> torch.Tensor:
        """int32 ``[B, Hr, Cq, k]``: selected key buckets in ascending order, -1 after the
        last (a query bucket with fewer than k candidates)."""
        return ascending_indices(self.selected, k)

    def csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts ``[B, Hr, Cq]``, offsets ``[B * Hr * Cq + 1]``, indices ``[B * Hr * Cq *
        Ck]``): the count + offsets layout for variable counts. ``indices`` has the fixed
        worst-case size (no data-dependent shape); entries past ``offsets[-1]`` are -1."""
        counts = self.selected.sum(-1).to(torch.int32)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        offsets[1:] = counts.flatten().cumsum(0)
        ck = self.selected.shape[-1]
        rows = self.fixed_k_indices(ck).flatten(0, 2)  # [N, Ck] ascending, -1 padded
        valid = rows >= 0
        dest = torch.where(valid, offsets[:-1, None] + torch.arange(ck, device=rows.device), -1)
        flat = torch.full((rows.numel(),), -1, dtype=torch.int32, device=rows.device)
        flat[dest[valid]] = rows[valid]
        return counts, offsets, flat


@dataclass(frozen=True)
class LineSelection:
    """MInference: ``columns`` bool ``[B, Hq, Lkv]`` and ``diagonals`` bool ``[B, Hq,
    2 Lkv - 1]`` (offset ``p - j`` + Lkv - 1)."""

    columns: torch.Tensor
    diagonals: torch.Tensor

    def pair_mask(self, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        lkv = self.columns.shape[-1]
        pairs = torch.broadcast_shapes(p.shape, j.shape)
        jj = j.expand(pairs).clamp(0, lkv - 1).reshape(-1)
        off = (p - j).expand(pairs) + lkv - 1
        inside = (off >= 0) & (off < 2 * lkv - 1)
        off = off.clamp(0, 2 * lkv - 2).reshape(-1)
        col = self.columns[..., jj].view(*self.columns.shape[:2], *pairs)
        diag = self.diagonals[..., off].view(*self.diagonals.shape[:2], *pairs)
        return col | (diag & inside)


@dataclass(frozen=True)
class ClusterSelection:
    """Routing Transformer: ``q_member`` bool ``[B, Hq, Lq, C]`` (rows by index) and
    ``k_member`` ``[B, Hkv, Lkv, C]``; a pair interacts iff they share a cluster.
    ``shift`` = Lkv - Lq maps query positions to rows."""

    q_member: torch.Tensor
    k_member: torch.Tensor
    shift: int

    def pair_mask(self, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        b, hq, lq, _ = self.q_member.shape
        hkv, lkv = self.k_member.shape[1], self.k_member.shape[2]
        pairs = torch.broadcast_shapes(p.shape, j.shape)
        i = (p - self.shift).expand(pairs).reshape(-1)
        jj = j.expand(pairs).reshape(-1)
        real = (i >= 0) & (i < lq) & (jj >= 0) & (jj < lkv)
        i, jj = i.clamp(0, lq - 1), jj.clamp(0, lkv - 1)
        k_member = self.k_member[:, torch.arange(hq, device=p.device) // (hq // hkv)]
        out = (self.q_member[:, :, i] & k_member[:, :, jj]).any(-1) & real
        return out.view(b, hq, *pairs)
