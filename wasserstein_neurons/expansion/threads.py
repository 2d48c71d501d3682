"""CPU thread use of Sparse Expansion: temporary torch thread counts and concurrent workers.

Routers (k-means on ``[tokens, p]`` arrays with ``p ~ d_in / 32``, one ``[d_in, d_in]``
eigensolve) and per-expert SparseGPT column loops are thousands of small kernels: OpenMP gains
little there, and on a loaded machine its barriers make them 10-100x slower (measured:
``eigh`` of a 576 x 576 matrix takes 8 s with 2 busy threads, 0.07 s with one; one
``1536 x 576`` SparseGPT prune 0.1-0.2 s with 1 thread, 2.6-10 s with 2).

The cores are used instead by running *independent* pieces of work side by side
(:func:`thread_map`): the k-means restarts of a router, the experts of a linear.  Each worker
is a Python thread whose torch kernels run single-threaded; torch releases the GIL inside its
kernels, so ``w`` workers keep ``w`` cores busy.  Every piece of work runs exactly the kernels
it would run alone with one torch thread, so results do not depend on the number of workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["MAX_DEFAULT_WORKERS", "cpu_threads", "resolve_workers", "thread_imap", "thread_map"]

T = TypeVar("T")
R = TypeVar("R")

#: Upper bound of the default worker count (each expert worker holds one ``[d_in, d_in]``
#: Hessian and a copy of the weight, so memory grows with the count).
MAX_DEFAULT_WORKERS = 4


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


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """Concurrent workers for ``device``: 1 off the CPU; ``None`` means torch's thread count
    (at most :data:`MAX_DEFAULT_WORKERS`).

    Raises
    ------
    ValueError
        For a count below 1.
    """
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    if device.type != "cpu":
        return 1
    if workers is None:
        return max(1, min(torch.get_num_threads(), MAX_DEFAULT_WORKERS))
    return int(workers)


def thread_imap(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(x) for x in items``, computed by ``workers`` threads with one torch thread each.

    Results are yielded in the order of ``items``; at most ``workers + 1`` are computed ahead
    of the consumer (so memory is bounded), and a long item does not stop the other workers
    (no wave barrier).  With one worker (or one item) ``fn`` runs in the calling thread under
    the current torch thread setting.  The torch thread count stays 1 while the consumer runs.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from (fn(x) for x in items)
        return
    ahead = workers + 1
    with (
        cpu_threads(1, torch.device("cpu")),
        ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool,
    ):
        pending = deque(pool.submit(fn, x) for x in items[:ahead])
        for x in items[ahead:]:
            done = pending.popleft().result()
            pending.append(pool.submit(fn, x))
            yield done
        while pending:
            yield pending.popleft().result()


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``list(thread_imap(fn, items, workers))``: every result, in the order of ``items``."""
    return list(thread_imap(fn, items, workers))
