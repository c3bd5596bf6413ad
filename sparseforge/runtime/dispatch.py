"""Run a pattern's plan on an executor: validate, find the plan, launch.

``sparseforge.api.attention`` (the public ``sf.attention``) calls ``attention`` here for
every backend but the oracle, and the ``torch.compile`` custom op (``custom_op``) calls it
from inside the op. Executors: the plan run with torch ops on CPU tensors, the generated
Triton kernels on a GPU, or the same kernels in Triton's interpreter on CPU tensors.

A warm call is: input checks, two dictionary lookups (canonical pattern, plan) and the
launch. Canonicalisation and planning run once per pattern object and problem shape.
Plans are keyed by the pattern's structure (document-id tensors are run-time data
passed to the kernel, not part of the key).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from functools import cached_property

import torch

from ..ir.canonicalize import canonicalize
from ..ir.nodes import Pattern
from ..ir.routing import (
    Clusters,
    ThresholdBlocks,
    TopkBlocks,
    TopkChunks,
    TopkKeys,
    is_dynamic,
)
from ..ir.scores import learned_tensors, score_spec, window_tables
from ..ir.split import static_siblings
from ..planner.plan import Plan, default_target, dtype_name, head_groups, plan
from ..planner.routing_steps import kernel_routing_node
from ..routing.selection import BlockSelection
from ..validate import check_attention_inputs
from . import cpu_flash, torch_exec, triton_launch
from .cache import interpreter_active
from .routed_tiles import backward_routing, cluster_tiles, relaid, route_tiles, selection_tiles
from .routed_torch import routed_attention

log = logging.getLogger("sparseforge")
BACKENDS = ("auto", "triton", "torch", "reference")


class Executor(enum.Enum):
    """What runs a plan: torch ops (CPU), the generated kernels compiled for the GPU the
    tensors are on, or the same kernels in Triton's interpreter (CPU tensors, tests)."""

    TORCH = "torch"
    TRITON = "triton"
    INTERPRET = "interpret"

    @property
    def interpret(self) -> bool:
        return self is Executor.INTERPRET

    @property
    def prekernels(self) -> str | None:
        """How this executor routes: compiled or interpreted pre-kernels, or torch rules."""
        return {Executor.TRITON: "compiled", Executor.INTERPRET: "interpret"}.get(self)


@dataclass(frozen=True)
class CompiledPattern:
    canonical: Pattern
    key: str  # structural key: equal for patterns that render the same kernels
    head_patterns: tuple[Pattern, ...]  # per kernel, in the plan's kernel order
    tables: tuple  # its distinct rel_bias tables and pair biases: inputs with a gradient
    # the routing node the generated kernel runs and its static siblings (the candidates'
    # source), found once per pattern; () when there is none
    routed_node: tuple = ()

    @cached_property
    def window_tables(self) -> tuple:
        """Its window-offset (N-D) rel_bias tables."""
        return window_tables(self.canonical)

    @cached_property
    def scored(self) -> bool:
        """Some head applies a score modifier (the CPU then runs the gather executor)."""
        return any(score_spec(p).any for p in self.head_patterns)


_patterns: dict[int, tuple[Pattern, CompiledPattern]] = {}
_plans: dict[tuple, Plan] = {}


def compile_pattern(pattern: Pattern) -> CompiledPattern:
    hit = _patterns.get(id(pattern))
    if hit is not None and hit[0] is pattern:
        return hit[1]
    canonical = canonicalize(pattern)
    heads = tuple(p for p, _ in head_groups(canonical))
    tables = {id(t): t for head in heads for t in learned_tensors(head)}
    node = kernel_routing_node(canonical) if is_dynamic(canonical) else None
    routed = () if node is None else (node, tuple(static_siblings(canonical, node)))
    compiled = CompiledPattern(canonical, repr(canonical), heads, tuple(tables.values()), routed)
    if len(_patterns) > 4096:
        _patterns.clear()
    _patterns[id(pattern)] = (pattern, compiled)  # holding the pattern keeps its id unique
    return compiled


def cached_plan(compiled: CompiledPattern, q_len: int, kv_len: int, head_dim: int, dtype,
                target: str, value_dim: int | None = None) -> Plan:
    key = (compiled.key, q_len, kv_len, head_dim, dtype, target, value_dim)
    found = _plans.get(key)
    if found is None:
        found = plan(compiled.canonical, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                     dtype=dtype_name(dtype), target=target, value_dim=value_dim)
        _plans[key] = found
        log.debug("planned %s", key)
    return found


def resolve_backend(backend: str, q: torch.Tensor) -> tuple[Executor, str]:
    """(executor, plan target) for the requested backend and the tensors' device. The
    oracle (``backend='reference'``) runs in ``sparseforge.api``; its gradients come from
    autograd through it, and ``attention_backward`` runs the torch executor for it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        if q.is_cuda:
            return Executor.TRITON, default_target(q.device)
        if q.device.type != "cpu":
            raise ValueError(f"backend='triton': tensors on {q.device} are not supported")
        if not interpreter_active():
            raise ValueError("backend='triton' with CPU tensors runs Triton's interpreter, which "
                             "must be enabled before Triton is imported: set TRITON_INTERPRET=1 "
                             "in the environment (or use backend='torch' on CPU)")
        return Executor.INTERPRET, "interpret"
    return Executor.TORCH, "cpu"


def check_table_grads(executor: Executor, tables) -> None:
    """A window-offset rel_bias table (N-D) gets its gradient from the torch executor only
    so far: the generated dK/dV kernel sums token-offset tables along tile diagonals,
    which window offsets do not follow. Refuse, rather than return no gradient."""
    if executor is Executor.TORCH or not torch.is_grad_enabled():
        return
    for t in tables:  # the window-offset tables (``window_tables``)
        if t.requires_grad:
            raise ValueError(f"rel_bias(table=[{'x'.join(map(str, t.shape))}]): the Triton "
                             "kernels do not compute a window-offset table's gradient yet; pass "
                             "table.detach() (q, k and v still get gradients) or train on "
                             "backend='torch'")


def execute_forward(executor: Executor, p: Plan, compiled: CompiledPattern, q, k, v, scale: float,
                    routed=None):
    """(out, lse) of the plan's kernels on tokens already in the plan's order: the one
    place a forward runs. The torch executor, the split-KV decode kernel for a few new
    tokens, or the forward kernel (with the call's routing, ``routed``, for a routed
    plan)."""
    b, hq, lq, _ = q.shape
    # both executors write every row of every head (empty rows included): no fill needed
    out = torch.empty((b, hq, lq, v.shape[-1]), dtype=q.dtype, device=q.device)  # contiguous
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    if executor is Executor.TORCH and cpu_flash.supports(compiled.scored, q, v):
        cpu_flash.run_forward(p, compiled.head_patterns, q, k, v, out, lse, scale)
    elif executor is Executor.TORCH:
        torch_exec.run_forward(p, compiled.head_patterns, q, k, v, out, lse, scale)
    elif triton_launch.decode_eligible(p):  # a few new tokens: split-KV
        if routed is not None:  # the selection's bucket lists for one tile of all new tokens
            routed = relaid(compiled.routed_node[0], routed, lq, k.shape[2], max(lq, 1))
        triton_launch.run_decode(p, compiled.head_patterns, q.contiguous(), k.contiguous(),
                                 v.contiguous(), out, lse, scale, interpret=executor.interpret,
                                 routed=routed)
    else:
        triton_launch.run_forward(p, compiled.head_patterns, q.contiguous(), k.contiguous(),
                                  v.contiguous(), out, lse, scale,
                                  interpret=executor.interpret, routed=routed)
    return out, lse


def execute_backward(executor: Executor, p: Plan, compiled: CompiledPattern, q, k, v, out, lse,
                     grad_out, grad_lse, scale, routed=None):
    """dq, dk, dv and the rel_bias tables' grads (id(table) -> grad) by the FlashAttention
    backward over the plan's schedule, on tokens in the plan's order: the one place a
    backward runs. The generated dQ and dK/dV kernels for the Triton executors, torch ops
    for the torch executor."""
    if executor is Executor.TORCH and cpu_flash.supports(compiled.scored, q, v):
        return cpu_flash.run_backward(p, compiled.head_patterns, q, k, v, out, lse,
                                      grad_out, grad_lse, scale)
    if executor is Executor.TORCH:
        return torch_exec.run_backward(p, compiled.head_patterns, q, k, v, out, lse,
                                       grad_out.contiguous(), grad_lse, scale)
    if routed is None:
        return triton_launch.run_backward(p, compiled.head_patterns, q, k, v, out, lse, grad_out,
                                          grad_lse, scale, interpret=executor.interpret)
    node = compiled.routed_node[0]  # the forward's selection, laid out for the backward's tiles
    dq_cfg, dkdv_cfg = p.backward_dq, p.backward_dkdv
    routed = backward_routing(node, routed, q.shape[2], k.shape[2],
                              (dq_cfg.block_m, dq_cfg.block_n), (dkdv_cfg.block_m, dkdv_cfg.block_n))
    dq, dk, dv, grads = triton_launch.run_backward(p, compiled.head_patterns, q, k, v, out, lse,
                                                   grad_out, grad_lse, scale,
                                                   interpret=executor.interpret, routed=routed)
    if routed.key_bias_grad is not None:  # topk_keys: [B, Hq, Lkv], summed where broadcast
        g = routed.key_bias_grad
        grads[id(node.bias)] = (g.sum(0) if node.bias.dim() == 2 else g).to(node.bias.dtype)
    return dq, dk, dv, grads


class _SparseAttentionFunction(torch.autograd.Function):
    """Forward by the chosen executor; backward recomputes tile probabilities from the
    saved lse (only out and lse are kept, never an Lq x Lkv matrix). A routed plan keeps
    its call's selection (``routed``, ``routed_tiles.RoutedTiles``): the backward walks
    the same tiles; the routing itself is not differentiated (as in MoBA and NSA)."""

    @staticmethod
    def forward(ctx, q, k, v, executor, p, compiled, scale, routed, *tables):
        out, lse = execute_forward(executor, p, compiled, q, k, v, scale, routed=routed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (executor, p, compiled, scale, routed)
        ctx.table_ids = tuple(id(t) for t in tables)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        executor, p, compiled, scale, routed = ctx.args
        dq, dk, dv, table_grads = execute_backward(executor, p, compiled, q, k, v, out, lse,
                                                   grad_out, grad_lse, scale, routed)
        return (dq, dk, dv, None, None, None, None, None,
                *(table_grads.get(t) for t in ctx.table_ids))


def attend(executor: Executor, p: Plan, compiled: CompiledPattern, q, k, v, scale: float,
           routed=None):
    """A plan's forward on tokens in its order (a routed plan's with this call's
    ``routed`` tiles), differentiable when a gradient is wanted (through
    ``_SparseAttentionFunction``, whose backward is ``execute_backward``)."""
    learned = learned_inputs(compiled, routed)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *learned)):
        return _SparseAttentionFunction.apply(q, k, v, executor, p, compiled, scale, routed,
                                              *learned)
    return execute_forward(executor, p, compiled, q, k, v, scale, routed=routed)


def learned_inputs(compiled: CompiledPattern, routed=None) -> tuple:
    """The tensors besides q, k and v a gradient flows to: the pattern's rel_bias tables
    and pair biases, and with a routed call a ``topk_keys`` node's key bias (DMA: the
    bias is on every score; the selection it decides is not differentiated)."""
    node = compiled.routed_node[0] if routed is not None else None
    return compiled.tables + ((node.bias,) if isinstance(node, TopkKeys) else ())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
              scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
              backend: str = "auto"):
    """``sf.attention`` on an executor (every backend but ``"reference"``): out ``[B, Hq,
    Lq, D]`` (and lse ``[B, Hq, Lq]``, natural log, if ``return_lse``). A query with no
    allowed key gives 0 and lse ``-inf``."""
    shape = check_attention_inputs(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa)
    if torch.compiler.is_compiling() and is_dynamic(pattern):  # torch ops dynamo traces
        out, lse = routed_attention(q, k, v, pattern, shape.scale)
        return (out, lse) if return_lse else out
    executor, target = resolve_backend(backend, q)
    if is_dynamic(pattern):
        out, lse = _run_routed(executor, target, backend, q, k, v, pattern, shape)
        return (out, lse) if return_lse else out
    compiled = compile_pattern(pattern)
    check_table_grads(executor, compiled.window_tables)
    p = cached_plan(compiled, shape.q_len, shape.kv_len, shape.head_dim, q.dtype, target,
                    shape.value_dim)
    if p.layout is None:
        out, lse = attend(executor, p, compiled, q, k, v, shape.scale)
    else:  # N-D tiles: gather into the layout's order, attend, scatter back
        run = tiled_run(p, q.device)
        out, lse = run.scatter(*attend(executor, p, run.patterns, *run.gather(q, k, v),
                                       shape.scale))
    return (out, lse) if return_lse else out


def _run_routed(executor: Executor, target: str, backend: str, q, k, v, pattern: Pattern, shape,
                selection=None):
    """A routed pattern: the generated pre-kernels route, then the routed forward kernel
    walks the static segments plus the selected tiles; with a gradient wanted, the
    generated backward walks the same selection. The torch executor and patterns without
    a kernel (two routing nodes, per-head patterns, balanced clusters) run
    ``routed_attention`` (torch ops, exact, differentiable); ``backend='triton'`` refuses
    what it cannot run rather than fall back silently. ``selection`` (a
    ``(BlockSelection, origin)`` pair, ``attention_with_selection``): no routing, that
    selection is attended."""
    compiled = compile_pattern(pattern)
    node, siblings = compiled.routed_node or (None, ())
    why_not = ("it has no generated kernel (one routing node per pattern, no per-head "
               "patterns; clusters: nearest-centroid, no static part, documents or "
               "position-reading score modifiers)" if node is None else None)
    if executor is not Executor.TORCH and why_not is None and shape.q_len and shape.kv_len:
        p = cached_plan(compiled, shape.q_len, shape.kv_len, shape.head_dim, q.dtype, target,
                        shape.value_dim)
        prekernels = executor.prekernels
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if isinstance(node, Clusters):  # gather in cluster order, attend, scatter back
            with torch.no_grad():
                order = ClusterOrder(*cluster_tiles(node, q, k, p.block_m, prekernels))
            # (the gather and scatter carry the gradient: the backward kernels run on the
            # sorted tokens too)
            return order.scatter(*attend(executor, p, compiled, *order.gather(q, k, v),
                                         shape.scale, order.tiles))
        # bucket lists per forward query tile, or for decode one tile of all new tokens
        rows = max(shape.q_len, 1) if triton_launch.decode_eligible(p) else p.block_m
        with torch.no_grad():  # routing decisions are not differentiated
            routed = (route_tiles(node, siblings, q, k, shape.scale, rows, prekernels, p.block_n)
                      if selection is None else
                      selection_tiles(node, selection[0], shape.q_len, shape.kv_len, rows,
                                      selection[1]))
        return attend(executor, p, compiled, q, k, v, shape.scale, routed)
    if backend == "triton" and why_not is not None:
        raise ValueError(f"backend='triton' with {pattern!r}: {why_not}; backend='auto' or "
                         "'torch' runs it with torch ops")
    return routed_attention(q, k, v, pattern, shape.scale, "compiled" if q.is_cuda else None,
                            None if selection is None else selection[0])


def attention_with_selection(q, k, v, pattern: Pattern, selection: BlockSelection, *,
                             scale: float | None = None, enable_gqa: bool = False,
                             backend: str = "auto", origin: tuple = ()):
    """(out, lse) of ``pattern`` (one top-k / coverage routing node) with its node's
    ``selection`` given instead of routed here: the same kernels, the same torch path,
    the same backward as a routed ``sf.attention`` call. Context parallelism attends a
    part of a longer sequence this way, with the whole sequence's selection cut to the
    part (``origin`` names where the part sits, for the bucket geometry's cache)."""
    shape = check_attention_inputs(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa)
    node = compile_pattern(pattern).routed_node
    if not isinstance(selection, BlockSelection) or not node or not isinstance(
            node[0], (TopkBlocks, TopkChunks, ThresholdBlocks)):
        raise ValueError(f"pattern {pattern!r}: attention_with_selection takes one "
                         "topk_blocks, topk_chunks or threshold_blocks node and a BlockSelection")
    executor, target = resolve_backend(backend, q)
    return _run_routed(executor, target, backend, q, k, v, pattern, shape, (selection, origin))


@dataclass(frozen=True)
class ClusterOrder:
    """Routing Transformer in the kernel: each head's tokens sorted by cluster (query order
    ``[B, Hq, Lq]``, key order ``[B, Hkv, Lkv]``) and the routed tiles over that order
    (each query cluster reads its own key cluster's run, the predicate on original
    positions)."""

    order_q: torch.Tensor
    order_k: torch.Tensor
    tiles: object

    def gather(self, q, k, v):
        def by(x, order):
            return torch.gather(x, 2, order[..., None].expand(-1, -1, -1, x.shape[-1]))

        return by(q, self.order_q), by(k, self.order_k), by(v, self.order_k)

    def scatter(self, out, lse):
        rows = self.order_q[..., None].expand(-1, -1, -1, out.shape[-1])
        return (torch.empty_like(out).scatter_(2, rows, out),
                torch.empty_like(lse).scatter_(2, self.order_q, lse))


@dataclass(frozen=True)
class TiledRun:
    """A tiled plan's token order on one device, built once: index vectors (run position
    -> original token, padding reading token 0; original token -> run position) and each
    kernel's mask on run positions, as the executors take it. ``index_select`` carries
    the gradient; padding tokens never hold an allowed pair, so their rows and columns
    contribute nothing to it."""

    q_gather: torch.Tensor
    q_scatter: torch.Tensor
    q_padding: torch.Tensor  # bool per run position
    kv_gather: torch.Tensor
    kv_scatter: torch.Tensor
    patterns: CompiledPattern

    def gather(self, q, k, v):
        return (q.index_select(2, self.q_gather), k.index_select(2, self.kv_gather),
                v.index_select(2, self.kv_gather))

    def scatter(self, out, lse):
        return out.index_select(2, self.q_scatter), lse.index_select(2, self.q_scatter)

    def gather_rows(self, x):
        """Query-side tensors (out, lse and their gradients) in run order."""
        return None if x is None else x.index_select(2, self.q_gather)

    def scatter_grads(self, dq, dk, dv):
        return (dq.index_select(2, self.q_scatter), dk.index_select(2, self.kv_scatter),
                dv.index_select(2, self.kv_scatter))


_tiled_runs: dict[tuple[int, str], tuple[Plan, TiledRun]] = {}


def tiled_run(p: Plan, device) -> TiledRun:
    key = (id(p), str(device))
    hit = _tiled_runs.get(key)
    if hit is not None and hit[0] is p:
        return hit[1]
    q_gather, q_scatter = p.layout[0].index_tensors(device)
    kv_gather, kv_scatter = p.layout[1].index_tensors(device)
    padding = torch.ones(p.layout[0].run_len, dtype=torch.bool, device=device)
    padding[q_scatter] = False
    heads = tuple(k.pattern for k in p.kernels)
    tables = {id(t): t for head in heads for t in learned_tensors(head)}
    patterns = CompiledPattern(p.pattern, repr(p.pattern), heads, tuple(tables.values()))
    run = TiledRun(q_gather, q_scatter, padding, kv_gather, kv_scatter, patterns)
    _tiled_runs[key] = (p, run)  # holding the plan keeps its id unique
    return run


def attention_backward(q, k, v, out, lse, grad_out, grad_lse, pattern: Pattern, *,
                       scale: float | None = None, enable_gqa: bool = False,
                       backend: str = "auto"):
    """(dq, dk, dv, table grads) of ``attention``'s (out, lse) given their gradients
    (``grad_lse`` may be None); table grads follow the pattern's rel_bias tables in
    order (``CompiledPattern.tables``). The torch.compile custom op's backward; also
    usable on its own."""
    shape = check_attention_inputs(q, k, v, pattern, scale=scale, enable_gqa=enable_gqa)
    executor, target = resolve_backend(backend, q)
    compiled = compile_pattern(pattern)
    p = cached_plan(compiled, shape.q_len, shape.kv_len, shape.head_dim, q.dtype, target,
                    shape.value_dim)
    if p.layout is None:
        dq, dk, dv, grads = execute_backward(executor, p, compiled, q, k, v, out, lse, grad_out,
                                             grad_lse, shape.scale)
        return dq, dk, dv, [grads.get(id(t)) for t in compiled.tables]
    run = tiled_run(p, q.device)  # gather into run order, backward, scatter the grads back
    go, gl = run.gather_rows(grad_out), run.gather_rows(grad_lse)
    go = go.masked_fill(run.q_padding[:, None], 0)
    if gl is not None:
        gl = gl.masked_fill(run.q_padding, 0)
    dq, dk, dv, grads = execute_backward(executor, p, run.patterns, *run.gather(q, k, v),
                                         run.gather_rows(out), run.gather_rows(lse), go, gl,
                                         shape.scale)
    return (*run.scatter_grads(dq, dk, dv), [grads.get(id(t)) for t in run.patterns.tables])
