"""Moving key/value rows between ranks: one all-to-all-v, started before the local
attention and waited for after it, differentiable (its backward sends the gradients of
the received rows back to their owners, where autograd sums them into dK/dV).

``torch.distributed.all_to_all_single`` with split sizes does the moving (NCCL on
GPUs, gloo on CPU): no transport of our own. Every rank counts the bytes it sends and
receives (``counters``), so tests can hold the implementation to the layout's plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Counters:
    """Bytes this process sent and received through ``exchange`` (forward and backward
    separately), how many exchanges ran, the bytes routing across ranks contributed
    (pooled summaries and block requests: ``distributed/routing.py``), and how the
    attention ran: ``sf.attention`` calls on (query run, key run) parts, and passes of
    the torch evaluation on original positions (``distributed/attention.py``)."""

    sent: int = 0
    received: int = 0
    grad_sent: int = 0
    grad_received: int = 0
    calls: int = 0
    routing: int = 0
    part_calls: int = 0
    position_passes: int = 0

    def reset(self) -> None:
        self.sent = self.received = self.grad_sent = self.grad_received = 0
        self.calls = self.routing = self.part_calls = self.position_passes = 0


counters = Counters()


@dataclass
class _Pending:
    """An exchange in flight: its work handle, waited for once."""

    work: object = None
    done: bool = field(default=False)

    def wait(self) -> None:
        if not self.done and self.work is not None:
            self.work.wait()
        self.done = True


def _all_to_all(out: torch.Tensor, send: torch.Tensor, out_splits, in_splits, group,
                async_op: bool):
    return dist.all_to_all_single(out, send.contiguous(), list(out_splits), list(in_splits),
                                  group=group, async_op=async_op)


class _Start(torch.autograd.Function):
    """Starts sending ``send`` (rows for each rank, in rank order, ``in_splits`` rows
    each) and returns the receive buffer (``out_splits`` rows from each rank), filled
    once ``_Wait`` has run."""

    @staticmethod
    def forward(ctx, send, in_splits, out_splits, group, pending):
        out = send.new_empty((sum(out_splits), *send.shape[1:]))
        pending.work = _all_to_all(out, send, out_splits, in_splits, group, async_op=True)
        ctx.splits = (in_splits, out_splits)
        ctx.group = group
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        counters.sent += row_bytes * (sum(in_splits))
        counters.received += row_bytes * sum(out_splits)
        counters.calls += 1
        return out

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        _all_to_all(back, grad, in_splits, out_splits, ctx.group, async_op=False)
        row_bytes = math.prod(grad.shape[1:]) * grad.element_size()
        counters.grad_sent += row_bytes * sum(out_splits)
        counters.grad_received += row_bytes * sum(in_splits)
        return back, None, None, None, None


class _Wait(torch.autograd.Function):
    """Waits for the rows and passes them on, with ``anchors`` (the local attention's
    results): a rank that receives nothing, or whose received rows are masked out, still
    has the exchange on its output's graph, so its backward takes part in the reverse
    all-to-all the other ranks wait on (a rank skipping it would hang them)."""

    @staticmethod
    def forward(ctx, received, pending, *anchors):
        pending.wait()
        return (received.view_as(received), *(a.view_as(a) for a in anchors))

    @staticmethod
    def backward(ctx, grad, *anchor_grads):
        return (grad, None, *anchor_grads)


def start_exchange(send: torch.Tensor, in_splits, out_splits, group=None):
    """Start the all-to-all-v of ``send`` (rows grouped by destination rank). Returns
    ``(buffer, pending)``; pass both to ``finish_exchange`` before reading the buffer."""
    pending = _Pending()
    return _Start.apply(send, tuple(in_splits), tuple(out_splits), group, pending), pending


def finish_exchange(buffer: torch.Tensor, pending: _Pending, *anchors: torch.Tensor):
    """``(received rows, *anchors)`` once the rows have arrived; ``anchors``: the tensors
    computed while they travelled, which the caller must use from here on (see
    ``_Wait``)."""
    return _Wait.apply(buffer, pending, *anchors)
