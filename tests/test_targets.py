"""The store layer's own bookkeeping: which chunks a target stored (its stats, bounded)."""

from __future__ import annotations

import itertools
import random

import pytest

from diskrsync.base.merkle import Shape
from diskrsync.compression.targets import StoredCounts

pytestmark = pytest.mark.pure


def test_stored_counts_are_runs_and_count_a_resent_chunk_once() -> None:
    counts = StoredCounts()
    for i in [0, 1, 2, 7, 8, 2, 5, 4, 3, 6, 20]:
        counts.add(i)
    assert counts.chunks == 10
    shape = Shape(20 * 128 + 50, 128, 128)
    assert list(counts.byte_ranges(shape)) == [(0, 9 * 128), (20 * 128, 50)]


def test_stored_counts_match_a_set_in_any_order() -> None:
    rng = random.Random(3)
    for _ in range(200):
        seen = [rng.randrange(60) for _ in range(rng.randrange(80))]
        counts = StoredCounts()
        for i in seen:
            counts.add(i)
        shape = Shape(60 * 16, 16, 128)
        assert counts.chunks == len(set(seen))
        got = {c for off, n in counts.byte_ranges(shape) for c in range(off // 16, (off + n) // 16)}
        assert got == set(seen)
        ranges = list(counts.byte_ranges(shape))
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(ranges))


def test_in_order_chunks_cost_one_run() -> None:
    counts = StoredCounts()
    for i in range(100_000):
        counts.add(i)
    assert counts.chunks == 100_000 and len(counts._starts) == 1
