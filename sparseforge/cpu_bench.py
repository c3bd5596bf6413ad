"""The CPU comparison (``sparseforge bench``): sparseforge, dense SDPA and compiled
FlexAttention side by side, on the same masks, in one run.

Each case is timed forward and forward+backward; FlexAttention's first call (its
``torch.compile``) and ``create_block_mask`` are timed too. Every FlexAttention mask is
written as a Flex user writes it (a ``mask_mod`` on indices) and checked equal to
sparseforge's mask before anything is timed. A second run repeats sparseforge's
forward while another process keeps every core busy (a torch matmul loop), to show
how the time holds up on a shared machine.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .api import attention
from .benchmarks import dispatch_overhead_spread_us, save_result
from .ir.neighborhood import neighborhood
from .ir.nodes import causal, documents, sliding_window
from .oracle import dense_mask, reference_attention

#: the load the busy run starts: one process keeping every core busy with matmuls
LOAD_SCRIPT = ("import torch, os; torch.set_num_threads(os.cpu_count()); "
               "a = torch.randn(1024, 1024)\nwhile True: a @ a")


def cases(length: int = 4096, window: int = 256):
    """(name, sparseforge pattern, FlexAttention mask_mod) of the four compared masks."""
    lengths = _document_lengths(length)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    side = int(round(length ** 0.5))
    kernel = 7

    def window_mod(b, h, q, kv):
        return (q >= kv) & (q - kv < window)

    def causal_mod(b, h, q, kv):
        return q >= kv

    def documents_mod(b, h, q, kv):
        return ids[q] == ids[kv]

    def neighborhood_mod(b, h, q, kv):  # NATTEN's window: shifted inward at the borders
        def inside(a, c):
            start = (a - kernel // 2).clamp(0, side - kernel)
            return (c >= start) & (c < start + kernel)
        return inside(q // side, kv // side) & inside(q % side, kv % side)

    out = [(f"sliding_window({window})", sliding_window(window), window_mod),
           ("causal()", causal(), causal_mod),
           (f"documents({'+'.join(map(str, lengths))})", documents(ids), documents_mod)]
    if side * side == length:
        out.insert(2, (f"neighborhood(({side}, {side}), {kernel})",
                       neighborhood((side, side), kernel), neighborhood_mod))
    return out


def _document_lengths(length: int) -> list[int]:
    """Four uneven documents: 1/2, 1/4, 5/32 and the rest of the sequence."""
    a, b, c = length // 2, length // 4, length * 5 // 32
    return [a, b, c, length - a - b - c]


def timed(fn, repeats: int) -> dict:
    """Best and median of ``repeats`` calls after one warm-up, in milliseconds."""
    return timed_together({"fn": fn}, repeats)["fn"]


def timed_together(fns: dict, repeats: int) -> dict:
    """Like ``timed`` for several contenders, called in turn within each round, so that a
    noisy shared machine slows them alike rather than whichever ran in a bad minute."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: {"best_ms": min(ts), "median_ms": statistics.median(ts)}
            for name, ts in times.items()}


def _forward_backward(fn, q, k, v):
    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).sum().backward()
    return step


def compare(name, pattern, mask_mod, length, heads, head_dim, repeats, with_flex=True) -> dict:
    """One case: times of the three, errors against the oracle, Flex's compile time."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3))
    mask = dense_mask(pattern, length, length).reshape(length, length)

    def ours(q, k, v):
        return attention(q, k, v, pattern)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.no_grad():
        ref = reference_attention(q, k, v, pattern)
    row = {"case": name, "pattern": repr(pattern), "density": mask.float().mean().item()}
    with torch.no_grad():
        row["max_abs_error_vs_oracle"] = (ours(q, k, v).double() - ref).abs().max().item()
    forward = {"sparseforge": lambda: ours(q, k, v), "sdpa": lambda: sdpa(q, k, v)}
    both = {"sparseforge": _forward_backward(ours, q, k, v), "sdpa": _forward_backward(sdpa, q, k, v)}
    if with_flex:
        i = torch.arange(length)
        if not torch.equal(mask_mod(0, 0, i[:, None], i[None, :]), mask):
            raise AssertionError("the FlexAttention mask_mod differs from sparseforge's mask")
        flex, call = flex_forward(q, k, v, mask_mod, length, ref)
        row.update(flex)
        if call is not None:
            qd, kd, vd = (x.detach() for x in (q, k, v))
            forward["flex"] = lambda: call(qd, kd, vd)
    with torch.no_grad():
        for who, t in timed_together(forward, repeats).items():
            row[f"{who}_forward"] = t
    if "flex" in forward:  # after its forward is timed: a failed backward may leave it eager
        try:
            _forward_backward(call, q, k, v)()
            both["flex"] = _forward_backward(call, q, k, v)
            row["flex_backward_status"] = "ok"
        except Exception as exc:  # torch 2.13 has no FlexAttention backward on CPU: say so
            row["flex_backward_status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    for who, t in timed_together(both, repeats).items():
        row[f"{who}_forward_backward"] = t
    return row


def flex_forward(q, k, v, mask_mod, length: int, ref=None):
    """FlexAttention under ``torch.compile`` on ``mask_mod``: (its build and first-call
    times and status, the compiled callable ``(q, k, v) -> out`` or None when it fails
    on this machine)."""
    out = {}
    qd, kd, vd = (x.detach() for x in (q, k, v))  # Flex refuses inputs wanting grad on CPU
    threads = torch.get_num_threads()  # compiling leaves this thread at 1 (torch 2.13)
    try:
        t = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
        out["flex_create_block_mask_ms"] = (time.perf_counter() - t) * 1e3
        torch._dynamo.reset()  # each case compiles afresh: no recompiles, no dynamic shapes
        compiled = torch.compile(flex_attention)

        def call(q, k, v):
            return compiled(q, k, v, block_mask=block_mask)
        t = time.perf_counter()
        with torch.no_grad():
            first = call(qd, kd, vd)
        out["flex_first_call_ms"] = (time.perf_counter() - t) * 1e3
        out["threads_after_compile"] = torch.get_num_threads()
        torch.set_num_threads(threads)
        if ref is not None:
            out["flex_max_abs_error_vs_oracle"] = (first.double() - ref).abs().max().item()
        out["flex_status"] = "ok"
        return out, call
    except Exception as exc:  # report, do not hide: Flex on CPU may not compile here
        torch.set_num_threads(threads)
        out["flex_status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        return out, None


def quiet_and_busy(pattern, length, heads, head_dim, repeats) -> dict:
    """sparseforge's forward quiet, with every core kept busy by another process, and
    quiet again (the quiet time is the median of both quiet spells)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))

    def fn():
        return attention(q, k, v, pattern)
    before = timed(fn, repeats)
    load = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT])
    try:
        time.sleep(2.0)  # let the load reach every core
        busy = timed(fn, repeats)
    finally:
        load.kill()
        load.wait()
    after = timed(fn, repeats)
    quiet = statistics.median([before["median_ms"], after["median_ms"]])
    return {"quiet_before": before, "busy": busy, "quiet_after": after,
            "busy_over_quiet": busy["median_ms"] / quiet}


def machine_speed() -> float:
    """Median ms of a 2048^2 fp32 matmul: how fast this (shared) machine was just now,
    so runs on different days can be told apart."""
    a = torch.randn(2048, 2048)
    return timed(lambda: a @ a, 5)["median_ms"]


def run(length=4096, heads=4, head_dim=64, repeats=5, with_flex=True, busy=True,
        results_dir: str | None = "bench/results") -> dict:
    """All cases; saved as ``cpu_attention.json`` under ``results_dir`` (None: not saved)."""
    speed_before = machine_speed()
    rows = [compare(name, pattern, mod, length, heads, head_dim, repeats, with_flex)
            for name, pattern, mod in cases(length)]
    result = {"benchmark": "cpu_attention",
              "shape": {"B": 1, "H": heads, "L": length, "D": head_dim, "dtype": "float32"},
              "repeats": repeats, "cases": rows}
    if busy:
        result["busy_load"] = LOAD_SCRIPT
        for (_, pattern, _), row in zip(cases(length), rows):
            row["sparseforge_quiet_and_busy"] = quiet_and_busy(pattern, length, heads,
                                                               head_dim, repeats)
    loops = dispatch_overhead_spread_us()
    result["dispatch_overhead_us"] = min(loops)  # the best loop: see dispatch_overhead_us
    result["dispatch_overhead_loops_us"] = loops
    result["machine_matmul_ms"] = {"before": speed_before, "after": machine_speed()}
    if results_dir is not None:
        save_result(result, results_dir, "cpu_attention")
    return result


def table(result: dict) -> str:
    """The side-by-side table ``sparseforge bench`` prints (median ms)."""
    def busy(row):
        b = row.get("sparseforge_quiet_and_busy")
        return f"{b['busy']['median_ms']:6.1f} {b['busy_over_quiet']:.1f}x" if b else "        -"

    def ms(row, key):
        value = row.get(key)
        return f"{value['median_ms']:9.1f}" if value else "        -"

    lines = [f"{'case':34s} {'sf fwd':>9s} {'SDPA fwd':>9s} {'Flex fwd':>9s} {'sf f+b':>9s} "
             f"{'SDPA f+b':>9s} {'Flex f+b':>9s} {'sf busy':>12s} {'Flex 1st':>9s}"]
    for row in result["cases"]:
        first = row.get("flex_first_call_ms")
        lines.append(f"{row['case']:34s} {ms(row, 'sparseforge_forward')} {ms(row, 'sdpa_forward')} "
                     f"{ms(row, 'flex_forward')} {ms(row, 'sparseforge_forward_backward')} "
                     f"{ms(row, 'sdpa_forward_backward')} {ms(row, 'flex_forward_backward')} "
                     f"{busy(row)} "
                     + (f"{first:9.0f}" if first is not None else "        -"))
    lines.append("median ms of the repeats; 'busy': another process keeps every core busy; "
                 "'Flex 1st': its first call, torch.compile included")
    return "\n".join(lines)
