"""The one place where torch's process-wide thread settings change; every change is undone on exit.

Two context managers, for the two situations that need other settings than torch's
defaults:

* :func:`kernel_threads` (the evaluation kernel): torch ops single-threaded with
  denormals flushed to zero, while the kernel runs its own pool of one thread per
  former torch thread (one tile per core; elementwise ops on one tile are too small
  for OpenMP to pay off, and the same settings wherever a set is prepared keep its
  norms bitwise reproducible).
* :func:`training_threads` (a training process): intra-op threads = this process's
  share of the cores minus its loader workers, because OpenMP threads spin while
  they wait: with more threads than free cores a step slows down many times over
  (measured on 2 shared cores: 1 thread 31.9 img/s, 2 threads 3.9 img/s).
  ``OMP_NUM_THREADS``, when set, wins.

Nothing else in the library calls ``torch.set_num_threads`` or ``torch.set_flush_denormal``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_KERNEL_DEPTH = [0, 1]   # nesting depth of kernel_threads, worker count of the outermost


@contextlib.contextmanager
def kernel_threads() -> Iterator[int]:
    """While active: torch ops single-threaded, denormals flushed; yields the worker count.

    The worker count is the torch thread count on entry of the outermost use. Both
    settings are restored on exit; nested uses leave them to the outermost.
    """
    if _KERNEL_DEPTH[0]:
        _KERNEL_DEPTH[0] += 1
        try:
            yield _KERNEL_DEPTH[1]
        finally:
            _KERNEL_DEPTH[0] -= 1
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    flushed = torch.set_flush_denormal(True)
    _KERNEL_DEPTH[:] = [1, n]
    try:
        yield n
    finally:
        _KERNEL_DEPTH[0] = 0
        if flushed:
            torch.set_flush_denormal(False)
        torch.set_num_threads(n)


def training_thread_count(num_workers: int) -> int:
    """Intra-op threads for one training process (see module docstring)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (os.cpu_count() or 1) // local - num_workers)


@contextlib.contextmanager
def training_threads(num_workers: int, device: torch.device | str = "cpu") -> Iterator[int]:
    """On CPU, run the block with :func:`training_thread_count` threads; yields the count in use."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        yield before
        return
    torch.set_num_threads(training_thread_count(num_workers))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
