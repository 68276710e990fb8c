"""The chunk LRU: bounded by bytes, least recently used out first, thread-safe."""

from __future__ import annotations

import random
import threading

import pytest

from diskrsync.fsmount.cache import ChunkCache


@pytest.mark.pure
def test_evicts_least_recently_used_by_bytes() -> None:
    cache = ChunkCache(100)
    cache.put((1, 0), b"a" * 40)
    cache.put((1, 1), b"b" * 40)
    assert cache.get((1, 0)) == b"a" * 40  # now (1, 1) is the oldest
    cache.put((1, 2), b"c" * 40)
    assert (1, 1) not in cache
    assert cache.get((1, 0)) is not None and cache.get((1, 2)) is not None
    assert cache.nbytes == 80
    stats = cache.stats()
    assert stats.evictions == 1 and stats.entries == 2


@pytest.mark.pure
def test_several_evicted_for_one_big_item() -> None:
    cache = ChunkCache(100)
    for i in range(10):
        cache.put((1, i), bytes(10))
    cache.put((2, 0), bytes(95))
    assert len(cache) == 1 and cache.nbytes == 95


@pytest.mark.pure
def test_oversized_item_not_stored_and_replace_counts_once() -> None:
    cache = ChunkCache(100)
    cache.put((1, 0), bytes(101))
    assert len(cache) == 0 and cache.nbytes == 0
    cache.put((1, 0), bytes(30))
    cache.put((1, 0), bytes(50))
    assert cache.nbytes == 50
    disabled = ChunkCache(0)
    disabled.put((1, 0), b"x")
    assert disabled.get((1, 0)) is None
    with pytest.raises(ValueError):
        ChunkCache(-1)


@pytest.mark.pure
def test_discard_generation() -> None:
    cache = ChunkCache(1000)
    for gen in (1, 2):
        for i in range(3):
            cache.put((gen, i), bytes(10))
    assert cache.discard_generation(1) == 3
    assert cache.nbytes == 30 and all((2, i) in cache for i in range(3))


@pytest.mark.pure
def test_hit_and_miss_counts() -> None:
    cache = ChunkCache(1000)
    cache.put((1, 0), b"x")
    cache.get((1, 0))
    cache.get((1, 1))
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (1, 1)


@pytest.mark.inproc
def test_thread_safety_keeps_the_byte_count_exact() -> None:
    cache = ChunkCache(64 * 1024)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                key = (rng.randrange(3), rng.randrange(200))
                if rng.random() < 0.5:
                    cache.put(key, bytes([key[1] % 256]) * rng.randrange(1, 4096))
                else:
                    data = cache.get(key)
                    assert data is None or data[:1] == bytes([key[1] % 256])
                if rng.random() < 0.01:
                    cache.discard_generation(rng.randrange(3))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.nbytes <= cache.max_bytes
    assert cache.nbytes == sum(len(v) for v in cache._items.values())
