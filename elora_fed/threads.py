"""Running torch single-threaded for a while, for code made of many small BLAS/LAPACK calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_torch_thread() -> Iterator[int]:
    """Set torch to one CPU thread, yield the previous thread count, and restore it on exit.

    Small matrix calls (a 400 x 400 factorization, an L-BFGS step at n = 500) gain nothing
    from two threads, and on a busy machine every multi-threaded call waits at a barrier for
    a descheduled thread: measured here, 10-50x slower. This setting is process-wide, so
    other threads' torch ops also run single-threaded meanwhile.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield previous
    finally:
        torch.set_num_threads(previous)
