"""A thread-safe LRU of decompressed chunks, bounded by the bytes it holds.

Keys are ``(generation, chunk index)``: a pinned generation never changes, so an entry never goes
stale; entries of a generation that leaves the mount are dropped with ``discard_generation``.
Values are read-only views: of a chunk decoded alone, or of its place in a read-ahead span's
buffer (which lives as long as any of its chunks is cached; its chunks are stored, and so
evicted, together).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_CACHE_SIZE = 256 * 1024 * 1024

ChunkKey = tuple[int, int]


@dataclass(frozen=True)
class CacheStats:
    entries: int
    nbytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


class ChunkCache:
    """Bounded LRU; ``get`` and ``put`` may be called from any thread.

    An item larger than the whole cache is not stored. ``max_bytes`` 0 disables caching.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_SIZE) -> None:
        if max_bytes < 0:
            raise ValueError("cache size must not be negative")
        self._max = max_bytes
        self._items: OrderedDict[ChunkKey, memoryview] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def max_bytes(self) -> int:
        return self._max

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: ChunkKey) -> memoryview | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return data

    def put(self, key: ChunkKey, data: bytes | memoryview) -> None:
        data = memoryview(data)
        size = data.nbytes
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            if size > self._max:
                return
            self._items[key] = data
            self._nbytes += size
            while self._nbytes > self._max:
                _, evicted = self._items.popitem(last=False)
                self._nbytes -= evicted.nbytes
                self._evictions += 1

    def discard_generation(self, generation: int) -> int:
        """Drop every entry of ``generation``; returns how many were dropped."""
        with self._lock:
            keys = [k for k in self._items if k[0] == generation]
            for key in keys:
                self._nbytes -= self._items.pop(key).nbytes
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._nbytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                len(self._items), self._nbytes, self._max, self._hits, self._misses,
                self._evictions,
            )
