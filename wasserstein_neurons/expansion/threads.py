"""Temporary torch CPU thread count for the many small kernels of Sparse Expansion.

Routers (k-means on ``[tokens, p]`` arrays with ``p ~ d_in / 32``, one ``[d_in, d_in]``
eigensolve) and per-expert SparseGPT column loops are thousands of small kernels: OpenMP gains
little there, and on a loaded machine its barriers make them 10-100x slower (measured:
``eigh`` of a 576 x 576 matrix takes 8 s with 2 busy threads, 0.07 s with one; one
``1536 x 576`` SparseGPT prune 0.1-0.2 s with 1 thread, 2.6-10 s with 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["cpu_threads"]


@contextmanager
def cpu_threads(n: int | None, device: torch.device) -> Iterator[None]:
    """Temporarily use ``n`` torch threads on CPU (restored afterwards).

    Parameters
    ----------
    n : int or None
        Threads while active; ``None`` leaves the setting as is.
    device : torch.device
        Where the work runs: nothing changes unless it is the CPU.

    Notes
    -----
    ``torch.set_num_threads`` is process-wide while this is active.
    """
    if n is None or device.type != "cpu" or torch.get_num_threads() == n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
