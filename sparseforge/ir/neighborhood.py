"""N-D neighbourhoods: NATTEN's rule over a row-major token grid, and its conveniences.

``neighborhood(shape, kernel, dilation, stride, causal)`` is the pattern of neighbourhood
attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023), its dilated
form (DiNAT, Hassani & Shi 2022) and strided/generalised form (GNA, Hassani et al. 2025),
in 1, 2 or 3 dimensions, every parameter per dimension. The rule is docs/semantics.md's,
which is NATTEN's: per dimension, tokens split into ``dilation`` groups by residue; in a
group a query sees ``kernel`` keys around a centre that shifts inward at the borders
(non-causal) or the ``kernel`` keys ending at its stride leader (causal). A pair
interacts iff every dimension keeps it. Tokens past the grid (``p`` or ``j`` >= the grid
size) take no part.

The per-dimension rule is written once (``na_keep``, ``na_key_range``,
``na_query_range``) over an ``ops`` namespace, and evaluated three ways from the same
code: on torch tensors (the oracle and the CPU path), as sympy expressions (the
planner's closed-form tile bounds) and as Triton text (the kernel's predicate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .nodes import Pattern

MAX_DIMS = 3


def _per_dim(owner: str, name: str, value, ndim: int, minimum: int) -> tuple[int, ...]:
    values = value if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{owner}({name}={value!r}): expected an int or {ndim} ints (one per "
                         f"dimension of shape), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{owner}({name}={value!r}): expected ints, got {type(v).__name__}")
        if v < minimum:
            raise ValueError(f"{owner}({name}={value!r}): every entry must be >= {minimum}")
    return tuple(int(v) for v in values)


def _per_dim_bool(owner: str, value, ndim: int) -> tuple[bool, ...]:
    values = value if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim or not all(isinstance(v, bool) for v in values):
        raise TypeError(f"{owner}(causal={value!r}): expected a bool or {ndim} bools")
    return tuple(values)


def _shape(owner: str, shape) -> tuple[int, ...]:
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    if not 1 <= len(dims) <= MAX_DIMS:
        raise ValueError(f"{owner}(shape={shape!r}): expected 1 to {MAX_DIMS} dimensions")
    return _per_dim(owner, "shape", tuple(dims), len(dims), 1)


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """NATTEN's neighbourhood rule on a row-major grid of ``shape`` (see module doc)."""

    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]

    def __post_init__(self) -> None:
        owner = "neighborhood"
        shape = _shape(owner, self.shape)
        n = len(shape)
        kernel = _per_dim(owner, "kernel", self.kernel, n, 1)
        dilation = _per_dim(owner, "dilation", self.dilation, n, 1)
        stride = _per_dim(owner, "stride", self.stride, n, 1)
        causal = _per_dim_bool(owner, self.causal, n)
        for d in range(n):
            if kernel[d] * dilation[d] > shape[d]:
                raise ValueError(f"{owner}(kernel={self.kernel!r}, dilation={self.dilation!r}): "
                                 f"kernel * dilation must be <= the extent in every dimension; "
                                 f"dimension {d} has {kernel[d]} * {dilation[d]} > {shape[d]}")
            if stride[d] > kernel[d]:
                raise ValueError(f"{owner}(stride={self.stride!r}): stride must be <= kernel in "
                                 f"every dimension; dimension {d} has {stride[d]} > {kernel[d]}")
        for name, value in (("shape", shape), ("kernel", kernel), ("dilation", dilation),
                            ("stride", stride), ("causal", causal)):
            object.__setattr__(self, name, value)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Tokens in the grid."""
        return math.prod(self.shape)

    @property
    def row_strides(self) -> tuple[int, ...]:
        """Row-major strides: token (x_0, ..., x_n-1) is at sum x_d * row_strides[d]."""
        return tuple(math.prod(self.shape[d + 1:]) for d in range(self.ndim))

    def __repr__(self) -> str:
        def dims(v):
            return "(" + ", ".join(map(repr, v)) + ("," if len(v) == 1 else "") + ")"

        extra = "".join(f", {name}={dims(getattr(self, name))}" for name, default in
                        (("dilation", 1), ("stride", 1), ("causal", False))
                        if any(x != default for x in getattr(self, name)))
        return f"neighborhood({dims(self.shape)}, {dims(self.kernel)}{extra})"


@dataclass(frozen=True)
class NeighborhoodPart(Pattern):
    """``grid`` seen from a part of its tokens: query position ``p`` keeps key ``j`` iff the
    grid's rule keeps ``(p + q_offset, j + kv_offset)``. Context parallelism attends a run
    of a rank's queries to a run of keys (``distributed/parts.py``); their positions in
    the grid are offsets away from the part's own, and NATTEN's windows clamp at the
    whole grid's borders, which no part holds. Not a ``Neighborhood``: the paths built on
    a whole grid (the planner's tiled layout, window-offset biases, halo shards) do not
    apply to a part, so they never see one."""

    grid: Neighborhood
    q_offset: int
    kv_offset: int

    def __post_init__(self) -> None:
        if not isinstance(self.grid, Neighborhood):
            raise TypeError(f"NeighborhoodPart(grid={self.grid!r}): expected a neighborhood")
        for name in ("q_offset", "kv_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NeighborhoodPart({name}={value!r}): expected an int")

    def __repr__(self) -> str:
        return (f"neighborhood_part({self.grid!r}, q_offset={self.q_offset}, "
                f"kv_offset={self.kv_offset})")


def neighborhood(shape, kernel, dilation=1, stride=1, causal=False) -> Pattern:
    """Neighbourhood attention over a row-major token grid of ``shape`` (1 to 3 dims).

    Every parameter is an int or one value per dimension: ``kernel`` keys per dimension
    around each query (NAT, Hassani et al. 2023), every ``dilation``-th token (DiNAT,
    Hassani & Shi 2022), one window per ``stride`` queries (GNA, Hassani et al. 2025),
    ``causal`` per dimension (e.g. along time in video). Exactly NATTEN's ``na1d/2d/3d``
    mask (docs/semantics.md); windows shift inward at the borders so every query sees
    ``prod(kernel)`` keys.
    """
    n = len(_shape("neighborhood", shape))
    return Neighborhood(shape, kernel, _as_dims(dilation, n), _as_dims(stride, n),
                        _as_dims(causal, n))


def _as_dims(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def maxvit_block(shape, window) -> Pattern:
    """MaxViT block attention (Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV
    2022): non-overlapping ``window`` x ``window`` blocks, each attending within itself.
    Also Swin's (unshifted) window attention. ``kernel = stride = window``; each extent
    must be a multiple of the window, as in MaxViT."""
    dims = _shape("maxvit_block", shape)
    win = _per_dim("maxvit_block", "window", window, len(dims), 1)
    _check_multiple("maxvit_block", "window", dims, win)
    return neighborhood(dims, win, stride=win)


def maxvit_grid(shape, grid) -> Pattern:
    """MaxViT grid attention (Tu et al. 2022): a ``grid`` x ``grid`` sparse, image-wide
    grid; token x attends the tokens x' with x' = x (mod n / grid) in every dimension.
    ``kernel = grid, dilation = n // grid``; each extent must be a multiple of the grid."""
    dims = _shape("maxvit_grid", shape)
    g = _per_dim("maxvit_grid", "grid", grid, len(dims), 1)
    _check_multiple("maxvit_grid", "grid", dims, g)
    return neighborhood(dims, g, dilation=tuple(n // k for n, k in zip(dims, g)))


def swin_window(shape, window) -> Pattern:
    """Swin Transformer window attention (Liu et al., ICCV 2021), the unshifted layers:
    non-overlapping ``window`` blocks (the same mask as ``maxvit_block``). Shifted-window
    layers are not expressible by NATTEN's rule (their border windows are cut, not shifted
    inward) and are not provided."""
    dims = _shape("swin_window", shape)
    win = _per_dim("swin_window", "window", window, len(dims), 1)
    _check_multiple("swin_window", "window", dims, win)
    return neighborhood(dims, win, stride=win)


def halo_blocks(shape, block, halo) -> Pattern:
    """HaloNet blocked local attention (Vaswani et al., "Scaling Local Self-Attention for
    Parameter Efficient Visual Backbones", CVPR 2021): queries in ``block``-sized blocks
    see their block plus ``halo`` tokens around it: ``kernel = block + 2 * halo``,
    ``stride = block``. At the image border NATTEN's rule shifts the window inward (every
    query sees the full kernel) where HaloNet pads with zeros; sparseforge follows NATTEN."""
    dims = _shape("halo_blocks", shape)
    b = _per_dim("halo_blocks", "block", block, len(dims), 1)
    h = _per_dim("halo_blocks", "halo", halo, len(dims), 0)
    return neighborhood(dims, tuple(x + 2 * y for x, y in zip(b, h)), stride=b)


def _check_multiple(owner, name, dims, sizes):
    for d, (n, k) in enumerate(zip(dims, sizes)):
        if n % k:
            raise ValueError(f"{owner}({name}={sizes!r}): extent {n} of dimension {d} is not a "
                             f"multiple of {k}")


# ------------------------------------------------------------------ the per-dimension rule


def dilation_group(x, d, ops):
    """(group g = x mod d, index in the group x // d) of a coordinate."""
    t = ops.fdiv(x, d)
    return x - t * d, t


def group_extent(n: int, d: int, g, ops):
    """Tokens of group ``g`` in an extent ``n`` with dilation ``d``: n // d + (g < n % d)."""
    return ops.fdiv(n - g + d - 1, d)


def _centre(i, ng, k, s, ops):
    """Non-causal window centre of group-local query ``i`` (stride leader, shifted
    inward so the window stays inside the group)."""
    left, right = k // 2, k // 2 + k % 2 - 1
    leader = ops.min(ops.fdiv(i, s) * s + s // 2, ng - 1)
    return ops.max(ops.min(leader, ng - 1 - right), left)


def _causal_leader(i, ng, s, ops):
    return ops.min(ops.fdiv(i, s) * s + s - 1, ng - 1)


def na_keep(xq, xk, n: int, k: int, d: int, s: int, causal: bool, ops):
    """Does query coordinate ``xq`` keep key coordinate ``xk`` in this dimension?"""
    gq, i = dilation_group(xq, d, ops)
    gk, j = dilation_group(xk, d, ops)
    return (gq == gk) & na_keep_in_group(i, j, group_extent(n, d, gq, ops), k, s, causal, ops)


def na_keep_in_group(i, j, ng, k: int, s: int, causal: bool, ops):
    """Does group-local query ``i`` keep group-local key ``j`` of the same dilation group
    (extent ``ng``)? The tiled layout's kernels call this directly: their tokens come
    with group coordinates."""
    if causal:
        lead = _causal_leader(i, ng, s, ops)
        return (j <= i) & (lead - j < k)
    c = _centre(i, ng, k, s, ops)
    left, right = k // 2, k // 2 + k % 2 - 1
    return (j - c >= -left) & (j - c <= right)


def na_key_range(first, last, ng, k: int, s: int, causal: bool, ops):
    """Group-local keys of the group-local queries ``[first, last]`` (one group, extent
    ``ng``): ``(lo, hi, full_lo, full_hi)`` inclusive, where ``[lo, hi]`` holds every key
    some query keeps and ``[full_lo, full_hi]`` the keys every query keeps. Uses that the
    centre (or causal leader) never decreases with the query."""
    if causal:
        lo = _causal_leader(first, ng, s, ops) - k + 1
        full_lo = _causal_leader(last, ng, s, ops) - k + 1
        return ops.max(lo, 0), last, ops.max(full_lo, 0), first
    left, right = k // 2, k // 2 + k % 2 - 1
    c_first, c_last = _centre(first, ng, k, s, ops), _centre(last, ng, k, s, ops)
    return c_first - left, c_last + right, c_last - left, c_first + right


def _gt0(x, ops):
    """1 if x > 0 else 0, as integer arithmetic."""
    return ops.min(ops.max(x, 0), 1)


def _first_centre_at_least(a, ng, k, s, ops):
    """Smallest query whose centre is >= a (ng if none)."""
    left, right = k // 2, k // 2 + k % 2 - 1
    inner = s * ops.fdiv(a - s // 2 + s - 1, s)  # leader >= a
    # centres are >= left always; none exceeds ng - 1 - right
    base = _gt0(a - left, ops) * ops.max(inner, 0)
    return base + (ng - base) * _gt0(a - (ng - 1 - right), ops)


def _last_centre_at_most(b, ng, k, s, ops):
    """Largest query whose centre is <= b (-1 if none)."""
    left, right = k // 2, k // 2 + k % 2 - 1
    inner = ops.min(s * ops.fdiv(b - s // 2, s) + s - 1, ng - 1)  # leader <= b
    base = (ng - 1) + (inner - (ng - 1)) * _gt0((ng - 1 - right) - b, ops)
    return base + (-1 - base) * _gt0(left - b, ops)


def _last_leader_at_most(b, ng, s, ops):
    """Largest query whose causal leader is <= b (-1 if none)."""
    inner = s * ops.fdiv(b + 1, s) - 1
    return ops.min(inner + (ng - 1 - inner) * _gt0(b - (ng - 2), ops), ng - 1)


def na_query_range(first, last, ng, k: int, s: int, causal: bool, ops):
    """Group-local queries that keep some key of ``[first, last]`` (``lo, hi``) and that
    keep all of them (``full_lo, full_hi``), inclusive: the inverse of ``na_key_range``
    (the backward dK/dV walk)."""
    if causal:
        hi = ops.max(last, _last_leader_at_most(last + k - 1, ng, s, ops))
        full_hi = _last_leader_at_most(first + k - 1, ng, s, ops)
        return first, hi, last, full_hi
    left, right = k // 2, k // 2 + k % 2 - 1
    return (_first_centre_at_least(first - right, ng, k, s, ops),
            _last_centre_at_most(last + left, ng, k, s, ops),
            _first_centre_at_least(last - right, ng, k, s, ops),
            _last_centre_at_most(first + left, ng, k, s, ops))


def grid_coordinate(flat, shape: tuple[int, ...], dim: int, ops):
    """Coordinate ``dim`` of the token at row-major position ``flat`` of a grid of
    ``shape`` (positions past the grid continue dimension 0)."""
    x = ops.fdiv(flat, math.prod(shape[dim + 1:]))
    return x if dim == 0 else x - ops.fdiv(x, shape[dim]) * shape[dim]


def neighborhood_keep(pattern: Neighborhood | NeighborhoodPart, p, j, ops):
    """The whole N-D rule on flat positions: query ``p``, key ``j`` (both row-major; a
    part's positions are first moved to the grid's)."""
    if isinstance(pattern, NeighborhoodPart):
        return neighborhood_keep(pattern.grid, p + pattern.q_offset, j + pattern.kv_offset, ops)
    keep = (p >= 0) & (p < pattern.size) & (j < pattern.size)
    for dim in range(pattern.ndim):
        xq, xk = (grid_coordinate(x, pattern.shape, dim, ops) for x in (p, j))
        keep = keep & na_keep(xq, xk, pattern.shape[dim], pattern.kernel[dim],
                              pattern.dilation[dim], pattern.stride[dim], pattern.causal[dim], ops)
    return keep
