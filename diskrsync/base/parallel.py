"""Ordered parallel map with bounded memory, and how many worker threads chunk work uses.

hashlib, blake3 and zstandard release the GIL, so each thread keeps a core busy on chunk work
while results stay in input order and at most ``window`` are in flight.

The worker count follows the cores (``os.cpu_count()``) up to ``MAX_AUTO_WORKERS``: past it
the one thread that reads the source or writes the image, not the workers, is the limit (the
model in docs/benchmarks.md, "Closer to the limits"), and each worker's batch in flight costs
memory. ``--workers N`` (push, restore, verify) sets it for the process.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from diskrsync.base.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_WORKERS = 16
MAX_WORKERS = 256  # what --workers accepts
_chosen: int | None = None


def worker_count() -> int:
    """Worker threads for chunk work: ``--workers`` when given, else one per core (at most
    ``MAX_AUTO_WORKERS``)."""
    if _chosen is not None:
        return _chosen
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_WORKERS))


def set_workers(n: int | None) -> None:
    """Use ``n`` worker threads from now on in this process (None: one per core)."""
    global _chosen
    if n is not None and not 1 <= n <= MAX_WORKERS:
        raise UsageError(f"--workers must be 1-{MAX_WORKERS}")
    _chosen = n


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None,
    window: int = 8,
) -> Generator[R, None, None]:
    """``map(fn, items)`` on ``workers`` threads (default: ``worker_count()``), in order, at
    most ``window`` pending (at least ``workers + 2``, so that every worker stays busy).
    Closing the generator early cancels what is pending and waits for what runs."""
    n = workers or worker_count()
    window = max(window, n + 2)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="diskrsync") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
