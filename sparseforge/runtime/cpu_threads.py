"""How the CPU executor uses the cores: independent units on a small pool of threads.

Each intra-op parallel region of PyTorch splits its work statically between its
threads and waits for the slowest; when another process shares the cores, one thread
of ours loses its time slice and the others wait, call after call (measured on the
2-core dev machine: many small regions ran 2.5x slower under a competing 2-thread
torch job, one large region 1.7x). So the executor cuts a call into units (a head's
batch of query tiles) and hands them to ``torch.get_num_threads()`` worker threads that
each run the fused kernel single-threaded, taking the next unit when done: a thread
that is descheduled delays only its own unit. Units never write the same memory.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _single_threaded() -> None:
    torch.set_num_threads(1)  # this worker's intra-op threads only


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="sparseforge-cpu",
                                                 initializer=_single_threaded))
        return _pool[1]


def run_units(units, workers: int | None = None) -> None:
    """Run the callables in ``units`` (no results; exceptions propagate), on a pool of
    ``workers`` threads (default ``torch.get_num_threads()``) when there is more than one
    unit and more than one worker, else in this thread."""
    units = list(units)
    workers = torch.get_num_threads() if workers is None else workers
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            unit()
        return

    # grad and inference mode are per thread: workers must not record graphs, and under
    # the caller's inference mode they write its inference-mode tensors
    inference = torch.is_inference_mode_enabled()

    def guarded(unit):
        with torch.inference_mode(inference), torch.no_grad():
            unit()
    for future in [_executor(workers).submit(guarded, u) for u in units]:
        future.result()
