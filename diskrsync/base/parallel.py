"""Ordered parallel map with bounded memory.

hashlib, blake3 and zstandard release the GIL, so two threads keep both cores busy on chunk
work while results stay in input order and at most ``window`` are in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS = 2


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int = WORKERS, window: int = 8
) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, at most ``window`` pending."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diskrsync") as pool:
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
