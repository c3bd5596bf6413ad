"""What the routed forward kernel reads besides q, k, v: each row's selected key buckets
and, per query tile, the union of its rows' selections as a sorted bucket list.

The forward kernel (``templates/forward.py.jinja`` with ``routed``) first walks the
closed-form segments of the pattern's static part, then the kv tiles of the buckets in
its query tile's list, skipping tiles a segment already walked, so no tile is visited
twice; inside a tile it looks each pair's key bucket up among its row's selected buckets.

Everything is built on the device with fixed sizes (sort, compare, gather): no host
synchronisation, so routing plus attention can be captured in a CUDA graph. The
shape-only tensors (bucket ids, which query buckets a tile spans) are cached per shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..codegen.prekernels import lines_supported
from ..ir.routing import Hierarchical, TopkChunks, TopkKeys, VerticalSlash
from ..routing.geometry import key_bias
from ..routing.rules import route_clusters, route_node
from ..routing.selection import BlockSelection, ascending_indices, bucket_of
from ..routing.shape_cache import ShapeCache
from .prekernels import assign, route_hip, route_lines, route_prekernels


@dataclass(frozen=True)
class RoutedTiles:
    """The routed kernel's run-time tensors, in its parameter order (``kernel_args``).

    ``sel`` int32 ``[B, Hr, Cq, S]``: selected key buckets per query bucket, ascending,
    -1 padded; ``sel_count`` ``[B, Hr, Cq]``; ``q_bucket`` ``[B or 1, Lq]`` per row;
    ``k_bucket`` ``[B or 1, Lkv]`` per key; ``k_starts`` ``[B or 1, Ck + 1]``;
    ``tile_list`` ``[B, Hr, Tq, U]`` per query tile the union of its rows' selections
    (ascending, -1 padded) and ``tile_count`` ``[B, Hr, Tq]``; ``head_map`` ``[Hq]``."""

    sel: torch.Tensor
    sel_count: torch.Tensor
    q_bucket: torch.Tensor
    k_bucket: torch.Tensor
    k_starts: torch.Tensor
    tile_list: torch.Tensor
    tile_count: torch.Tensor
    head_map: torch.Tensor
    key_bias: torch.Tensor | None = None  # topk_keys: fp32 [B or 1, Hq, Lkv]
    positions: tuple | None = None  # clusters: original positions of the sorted q and k
    #: query bucket boundaries ``[B or 1, Cq + 1]`` and the query tile rows the lists are
    #: for (not kernel arguments): the backward and decode lay the same selection out for
    #: their own query tiles (``relaid``)
    q_starts: torch.Tensor | None = None
    block_m: int = 0
    #: where the buckets sit when they are not the call's own grid (a part of a longer
    #: sequence, ``selection_tiles``): part of the geometry cache's key
    origin: tuple = ()

    def kernel_args(self) -> list:
        def batch_stride(t):
            return 0 if t.shape[0] == 1 else t.stride(0)

        def head_stride(t):  # per-head buckets (clusters) or shared by all heads
            return t.stride(1) if t.dim() == 3 else 0

        bias = [] if self.key_bias is None else [self.key_bias, batch_stride(self.key_bias)]
        positions = [] if self.positions is None else [
            *self.positions, batch_stride(self.positions[0]), self.positions[0].stride(1),
            batch_stride(self.positions[1]), self.positions[1].stride(1)]
        return [self.sel, self.sel_count, self.q_bucket, self.k_bucket, self.k_starts,
                self.tile_list, self.tile_count, self.head_map,
                batch_stride(self.q_bucket), head_stride(self.q_bucket),
                batch_stride(self.k_bucket), head_stride(self.k_bucket),
                batch_stride(self.k_starts), head_stride(self.k_starts), self.sel.shape[1],
                self.sel.shape[2], self.sel.shape[3], self.tile_list.shape[2],
                self.tile_list.shape[3], *bias, *positions]


_geometry = ShapeCache(256)


def _tile_geometry(node, q_starts, k_starts, q_len: int, kv_len: int, block_m: int, span: int,
                   origin: tuple = ()):
    """(q bucket per row, k bucket per key, query buckets each query tile spans
    ``[B or 1, Tq, span]``, repeats of the last one where it spans fewer). Fixed blocks
    depend on the shapes (and ``origin``) only and are cached; chunk boundaries are data."""
    key = (None if isinstance(node, TopkChunks) else
           (q_len, kv_len, block_m, span, str(q_starts.device), node.q_block, node.block, origin))
    return _geometry.get(key, lambda: _build_tile_geometry(q_starts, k_starts, q_len, kv_len,
                                                           block_m, span))


def _build_tile_geometry(q_starts, k_starts, q_len: int, kv_len: int, block_m: int, span: int):
    device = q_starts.device
    cq = q_starts.shape[-1] - 1
    rows = torch.arange(q_len, device=device) + (kv_len - q_len)
    q_bucket = bucket_of(rows, q_starts.long()).clamp(0, cq - 1)  # [B|1, Lq]
    k_bucket = bucket_of(torch.arange(kv_len, device=device), k_starts.long())
    k_bucket = torch.where((k_bucket >= 0) & (k_bucket < k_starts.shape[-1] - 1), k_bucket, -2)
    first = q_bucket[:, ::block_m]  # [B|1, Tq]
    last_rows = torch.clamp(torch.arange(first.shape[1], device=device) * block_m + block_m - 1,
                            max=q_len - 1)
    last = q_bucket[:, last_rows]
    spanned = torch.minimum(first[..., None] + torch.arange(span, device=device), last[..., None])
    return q_bucket.to(torch.int32).contiguous(), k_bucket.to(torch.int32).contiguous(), spanned


def routed_tiles(node, sel: torch.Tensor, sel_count: torch.Tensor, q_starts: torch.Tensor,
                 k_starts: torch.Tensor, head_map: torch.Tensor, q_len: int, kv_len: int,
                 block_m: int, origin: tuple = ()) -> RoutedTiles:
    """The kernel's tensors from a selection in the fixed-k layout ``sel`` ``[B, Hr, Cq,
    S]`` (ascending, -1 padded: the pre-kernels' output) and its counts."""
    b, hr, cq, s = sel.shape
    ck = k_starts.shape[-1] - 1
    # query buckets one tile of block_m rows can span: blocks of q_block rows, or any chunk
    span = cq if isinstance(node, TopkChunks) else min(cq, (block_m - 1) // node.q_block + 2)
    q_bucket, k_bucket, spanned = _tile_geometry(node, q_starts, k_starts, q_len, kv_len, block_m,
                                                 span, origin)
    tq = spanned.shape[1]
    batch = torch.arange(b, device=sel.device)[:, None, None]
    gathered = sel.permute(0, 2, 1, 3)[batch, spanned.expand(b, -1, -1)]  # [B, Tq, span, Hr, S]
    union = gathered.permute(0, 3, 1, 2, 4).reshape(b, hr, tq, span * s).long()
    union = torch.where(union < 0, ck, union).sort(-1).values  # padding sorts last
    repeat = torch.zeros_like(union, dtype=torch.bool)
    repeat[..., 1:] = union[..., 1:] == union[..., :-1]
    union = torch.where(repeat, ck, union).sort(-1).values[..., :min(span * s, ck)]
    tile_count = (union < ck).sum(-1).to(torch.int32)
    tile_list = torch.where(union < ck, union, -1).to(torch.int32)
    return RoutedTiles(sel.to(torch.int32).contiguous(), sel_count.to(torch.int32).contiguous(),
                       q_bucket, k_bucket, k_starts.to(torch.int32).contiguous(),
                       tile_list.contiguous(), tile_count.contiguous(),
                       head_map.to(device=sel.device, dtype=torch.int32).contiguous(),
                       q_starts=q_starts, block_m=block_m, origin=origin)


@dataclass(frozen=True)
class RoutedBackward:
    """What the routed backward kernels read: the forward's selection laid out per dQ
    query tile (``dq``) and per dK/dV query tile (``dkdv``), and dK/dV's transpose of the
    latter (``transposed_selection``): per routing head and key bucket, the query tiles
    whose list holds it."""

    dq: RoutedTiles
    dkdv: RoutedTiles
    t_ptr: torch.Tensor  # int32 [B, Hr, Ck + 1]: bucket c's entries are t_idx[t_ptr[c]:t_ptr[c+1]]
    t_idx: torch.Tensor  # int32 [B, Hr, Tq * U]: query tiles, ascending per bucket
    #: topk_keys: the key bias's gradient, fp32 [B, Hq, Lkv], zeroed; dK/dV writes it
    key_bias_grad: torch.Tensor | None = None

    def dkdv_args(self) -> list:
        grad = [] if self.key_bias_grad is None else [self.key_bias_grad,
                                                      self.key_bias_grad.stride(0)]
        return [*self.dkdv.kernel_args(), self.t_ptr, self.t_idx, self.t_ptr.shape[-1] - 1,
                self.t_idx.shape[-1], *grad]


def transposed_selection(tiles: RoutedTiles) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-query-tile bucket lists turned around: for each routing head and key
    bucket, the query tiles listing it, ascending, as a CSR of fixed size (every list
    entry once). A counting sort on the device: a stable sort of the entries by bucket
    keeps each bucket's query tiles in order, and the per-bucket counts' prefix sum
    points at each bucket's run. No host read, no atomics on the gradients, the same
    result every run."""
    b, hr, tq, u = tiles.tile_list.shape
    ck = tiles.k_starts.shape[-1] - 1
    bucket = tiles.tile_list.reshape(b, hr, tq * u).long()
    bucket = torch.where(bucket >= 0, bucket, ck)  # padding sorts last, counted in bucket ck
    order = torch.sort(bucket, dim=-1, stable=True).indices
    counts = torch.zeros((b, hr, ck + 1), dtype=torch.int64, device=bucket.device)
    counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    t_ptr = torch.nn.functional.pad(counts[..., :ck].cumsum(-1), (1, 0))
    return t_ptr.to(torch.int32).contiguous(), (order // u).to(torch.int32).contiguous()


def relaid(node, tiles: RoutedTiles, q_len: int, kv_len: int, block_m: int) -> RoutedTiles:
    """The call's selection (``tiles``) with its per-tile bucket lists for query tiles of
    ``block_m`` rows (no routing again). Clusters: the cluster lists of the sorted rows."""
    if block_m == tiles.block_m:
        return tiles
    if tiles.positions is not None:
        tile_list, tile_count = _cluster_lists(tiles.q_bucket, tiles.sel_count.bool(), block_m)
        return dataclasses.replace(tiles, tile_list=tile_list, tile_count=tile_count,
                                   block_m=block_m)
    laid_out = routed_tiles(node, tiles.sel, tiles.sel_count, tiles.q_starts, tiles.k_starts,
                            tiles.head_map, q_len, kv_len, block_m, tiles.origin)
    return dataclasses.replace(laid_out, key_bias=tiles.key_bias)


def backward_routing(node, tiles, q_len: int, kv_len: int, dq_tiles: tuple[int, int],
                     dkdv_tiles: tuple[int, int]):
    """The forward's routing (``tiles``: ``RoutedTiles`` or ``RoutedLines``) as the dQ and
    dK/dV kernels read it: the same selection, per tile of their own sizes ``(block_m,
    block_n)``, and dK/dV's transpose (``RoutedBackward`` or ``LinesBackward``)."""
    if isinstance(tiles, RoutedLines):
        dq = tiles.relaid(q_len, kv_len, *dq_tiles)
        dkdv = dq if dkdv_tiles == dq_tiles else tiles.relaid(q_len, kv_len, *dkdv_tiles)
        return LinesBackward(dq, dkdv.transposed())
    dq = relaid(node, tiles, q_len, kv_len, dq_tiles[0])
    dkdv = dq if dkdv_tiles[0] == dq_tiles[0] else relaid(node, tiles, q_len, kv_len,
                                                          dkdv_tiles[0])
    grad = None
    if tiles.key_bias is not None:  # per batch row: each dK/dV program writes its own keys
        grad = torch.zeros((tiles.sel.shape[0], *tiles.key_bias.shape[1:]), dtype=torch.float32,
                           device=tiles.key_bias.device)
    return RoutedBackward(dq, dkdv, *transposed_selection(dkdv), grad)


@dataclass(frozen=True)
class RoutedLines:
    """The routed kernel's tensors for ``vertical_slash`` (per query head): ``cols``
    ``[B, Hq, V]`` selected key columns ascending and ``col_count`` ``[B, Hq]``; ``offs``
    ``[B, Hq, S]`` selected diagonal offsets ``p - j`` ascending and ``off_count``;
    ``tile_map`` uint8 ``[B, Hq, Tq, Tk]``: does a selected line cross kv tile t for query
    tile m; ``tile_span`` ``[B, Hq, Tq, 2]`` its first and one-past-last set tile. After
    ``transposed`` (dK/dV) the map is ``[B, Hq, Tk, Tq]`` and the spans run over query
    tiles per key tile."""

    cols: torch.Tensor
    col_count: torch.Tensor
    offs: torch.Tensor
    off_count: torch.Tensor
    tile_map: torch.Tensor
    tile_span: torch.Tensor
    head_map: torch.Tensor
    #: the selection and the tiles the map is for (not kernel arguments): the backward
    #: lays the same lines out for its own tiles (``relaid``)
    selection: object = None
    lines: tuple[int, int] = (0, 0)  # (n_vertical, n_slash)
    tiles: tuple[int, int] = (0, 0)  # (block_m, block_n)

    def kernel_args(self) -> list:
        return [self.cols, self.col_count, self.offs, self.off_count, self.tile_map,
                self.tile_span, self.head_map, self.cols.shape[1], self.cols.shape[2],
                self.offs.shape[2], self.tile_map.shape[2], self.tile_map.shape[3]]

    def relaid(self, q_len: int, kv_len: int, block_m: int, block_n: int) -> RoutedLines:
        """The same lines with the tile map for tiles of ``block_m`` x ``block_n``."""
        if (block_m, block_n) == self.tiles:
            return self
        return routed_lines(self.selection, *self.lines, q_len, kv_len, block_m, block_n)

    def transposed(self) -> RoutedLines:
        """The tile map turned around for dK/dV: per key tile, the query tiles a selected
        line crosses, and their span."""
        t_map = self.tile_map.transpose(-1, -2).contiguous()
        return dataclasses.replace(self, tile_map=t_map, tile_span=_spans(t_map))


@dataclass(frozen=True)
class LinesBackward:
    """What the routed backward kernels read for ``vertical_slash``: the lines with the
    tile map for dQ's tiles (``dq``) and with dK/dV's map transposed (``dkdv``)."""

    dq: RoutedLines
    dkdv: RoutedLines
    key_bias_grad: None = None

    def dkdv_args(self) -> list:
        return self.dkdv.kernel_args()


def _spans(tile_map: torch.Tensor) -> torch.Tensor:
    """Per row of a tile map ``[..., T]``: its first and one-past-last set tile (0, 0 if
    none), int32 ``[..., 2]``."""
    width = tile_map.shape[-1]
    ticks = torch.arange(1, width + 1, device=tile_map.device)
    set_ = tile_map != 0
    last = torch.where(set_, ticks, 0).amax(-1)
    first = torch.where(set_, ticks, width + 1).amin(-1) - 1
    return torch.stack([torch.where(last > 0, first, 0), last], -1).to(torch.int32).contiguous()


def _ascending(flags: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``ascending_indices`` of the set flags, their count)."""
    return ascending_indices(flags, width), flags.sum(-1).to(torch.int32)


def routed_lines(selection, n_vertical: int, n_slash: int, q_len: int, kv_len: int,
                 block_m: int, block_n: int) -> RoutedLines:
    """The kernel's tensors from a ``LineSelection`` (device ops, fixed sizes)."""
    columns, diagonals = selection.columns, selection.diagonals  # [B, H, Lkv], [B, H, 2Lkv-1]
    b, h, _ = columns.shape
    device = columns.device
    cols, col_count = _ascending(columns, max(1, min(n_vertical, kv_len)))
    offs, off_count = _ascending(diagonals, max(1, min(n_slash, 2 * kv_len - 1)))
    offs = torch.where(offs >= 0, offs - (kv_len - 1), 0).to(torch.int32)  # offset values p - j
    tq, tk = -(-q_len // block_m), -(-kv_len // block_n)
    pad = tk * block_n - kv_len
    col_tiles = torch.nn.functional.pad(columns, (0, pad)).view(b, h, tk, block_n).any(-1)
    # a diagonal crosses (m, t) iff a selected offset lies in [p_first - j_last, p_last - j_first]
    cum = torch.zeros(b, h, 2 * kv_len, dtype=torch.int32, device=device)
    cum[..., 1:] = diagonals.to(torch.int32).cumsum(-1)
    m, t = torch.arange(tq, device=device), torch.arange(tk, device=device)
    p_first = m * block_m + (kv_len - q_len)
    p_last = torch.clamp(m * block_m + block_m, max=q_len) - 1 + (kv_len - q_len)
    j_first, j_last = t * block_n, torch.clamp(t * block_n + block_n, max=kv_len) - 1
    lo = (p_first[:, None] - j_last[None, :] + kv_len - 1).clamp(0, 2 * kv_len - 1)
    hi = (p_last[:, None] - j_first[None, :] + kv_len).clamp(0, 2 * kv_len - 1)  # exclusive
    count = (cum.gather(-1, hi.flatten()[None, None].expand(b, h, -1))
             - cum.gather(-1, lo.flatten()[None, None].expand(b, h, -1)))
    tile_map = ((count.view(b, h, tq, tk) > 0) | col_tiles[:, :, None, :]).to(torch.uint8)
    heads = torch.arange(h, device=device, dtype=torch.int32)
    return RoutedLines(cols.contiguous(), col_count.contiguous(), offs.contiguous(),
                       off_count.contiguous(), tile_map.contiguous(), _spans(tile_map), heads,
                       selection, (n_vertical, n_slash), (block_m, block_n))


def route_tiles(node, siblings, q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int,
                prekernels: str | None, block_n: int = 64):
    """Route ``node`` for this call and lay the result out for the kernel: with the
    generated pre-kernels (``"compiled"``, ``"interpret"``) or the torch reference
    (``None``)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if isinstance(node, VerticalSlash):
        if prekernels and lines_supported(siblings):
            selection = route_lines(node, siblings, q, k, scale,
                                    interpret=prekernels == "interpret")[0]
        else:
            selection = route_node(node, siblings, q, k, scale)
        return routed_lines(selection, node.n_vertical, node.n_slash, q_len, kv_len, block_m,
                            block_n)
    if isinstance(node, TopkKeys):  # the bias is the score: selected with device sorts
        prekernels = None
    if prekernels and isinstance(node, Hierarchical):
        indices, q_starts, k_starts, heads = route_hip(node, siblings, q, k,
                                                       interpret=prekernels == "interpret")
        counts = None
    elif prekernels:
        indices, counts, call, heads = route_prekernels(node, siblings, q, k, scale,
                                                        interpret=prekernels == "interpret")
        q_starts, k_starts = call.q_starts, call.k_starts
    else:
        tiles = selection_tiles(node, route_node(node, siblings, q, k, scale), q_len, kv_len,
                                block_m)
        return _with_key_bias(node, tiles, q)
    if counts is None:
        counts = (indices >= 0).sum(-1)
    tiles = routed_tiles(node, indices, counts, q_starts.to(q.device), k_starts.to(q.device),
                         heads, q_len, kv_len, block_m)
    return _with_key_bias(node, tiles, q)


def _with_key_bias(node, tiles: RoutedTiles, q: torch.Tensor) -> RoutedTiles:
    """``topk_keys``: the tiles with the bias the kernel adds to every score."""
    if not isinstance(node, TopkKeys):
        return tiles
    bias = key_bias(node, q.shape[1], tiles.k_bucket.shape[-1], q.device).contiguous()
    return dataclasses.replace(tiles, key_bias=bias)


def selection_tiles(node, selection: BlockSelection, q_len: int, kv_len: int, block_m: int,
                    origin: tuple = ()) -> RoutedTiles:
    """The kernel's tensors from a ``BlockSelection`` made elsewhere: the torch rules, or
    (``origin`` set) the whole sequence's selection cut to a part of it
    (``distributed.parts.part_selection``)."""
    device = selection.selected.device
    ck = selection.selected.shape[-1]
    indices = selection.fixed_k_indices(max(1, min(getattr(node, "k", ck), ck)))
    return routed_tiles(node, indices, (indices >= 0).sum(-1), selection.q_starts.to(device),
                        selection.k_starts.to(device), selection.heads, q_len, kv_len, block_m,
                        origin)


def cluster_tiles(node, q: torch.Tensor, k: torch.Tensor, block_m: int,
                  prekernels: str | None = None):
    """Routing Transformer in the kernel: each head's tokens sorted by cluster (a stable
    sort of the nearest-centroid ids: a per-head permutation), so a cluster is one run of
    keys; query bucket = key bucket = cluster, each query cluster selecting its own key
    cluster, and the predicate reading original positions.

    Returns (query order ``[B, Hq, Lq]``, key order ``[B, Hkv, Lkv]``, ``RoutedTiles``):
    run the kernel on the gathered q, k, v and scatter the rows back by the query order."""
    b, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    c = node.centroids.shape[1]
    if prekernels:  # the generated assignment (runtime/prekernels.py)
        interpret = prekernels == "interpret"
        ids_q = assign(node, q, hq // hkv, interpret=interpret)  # [B, Hq, Lq]
        ids_k = assign(node, k, 1, interpret=interpret)  # [B, Hkv, Lkv]
    else:
        members = route_clusters(node, q, k)
        ids_q = members.q_member.to(torch.int8).argmax(-1)
        ids_k = members.k_member.to(torch.int8).argmax(-1)
    order_q = torch.sort(ids_q, dim=-1, stable=True).indices
    order_k = torch.sort(ids_k, dim=-1, stable=True).indices
    sorted_q, sorted_k = torch.gather(ids_q, 2, order_q), torch.gather(ids_k, 2, order_k)
    counts = torch.nn.functional.one_hot(ids_k, c).sum(2)  # [B, Hkv, C]
    k_starts = torch.nn.functional.pad(counts.cumsum(-1), (1, 0)).to(torch.int32)
    own = counts[:, torch.arange(hq, device=q.device) // (hq // hkv)] > 0  # [B, Hq, C]
    sel = torch.arange(c, device=q.device, dtype=torch.int32).view(1, 1, c, 1).expand(b, hq, c, 1)
    tile_list, tile_count = _cluster_lists(sorted_q, own, block_m)
    tiles = RoutedTiles(sel.contiguous(), own.to(torch.int32).contiguous(),
                        sorted_q.to(torch.int32).contiguous(), sorted_k.to(torch.int32).contiguous(),
                        k_starts.contiguous(), tile_list.contiguous(), tile_count.contiguous(),
                        torch.arange(hq, device=q.device, dtype=torch.int32),
                        positions=((order_q + (kv_len - q_len)).to(torch.int32).contiguous(),
                                   order_k.to(torch.int32).contiguous()), block_m=block_m)
    return order_q, order_k, tiles


def _cluster_lists(sorted_q: torch.Tensor, own: torch.Tensor, block_m: int):
    """Per query tile of ``block_m`` cluster-sorted rows (cluster ids ``sorted_q`` ``[B,
    Hq, Lq]``): the clusters its rows span that hold a key (``own`` ``[B, Hq, C]``),
    ascending, and their count."""
    q_len = sorted_q.shape[-1]
    c = own.shape[-1]
    firsts = sorted_q[..., ::block_m]
    lasts = sorted_q[..., torch.clamp(torch.arange(firsts.shape[-1], device=sorted_q.device)
                                      * block_m + block_m - 1, max=q_len - 1)]
    cl = torch.arange(c, device=sorted_q.device)
    listed = ((cl >= firsts[..., None]) & (cl <= lasts[..., None])
              & own[:, :, None, :])  # [B, Hq, Tq, C]
    tile_list, tile_count = _ascending(listed, c)
    return tile_list.contiguous(), tile_count.contiguous()
