"""Byte ranges of a disk: a source's extents, a map of changed ranges, read errors. Both
the push's scan (synccore) and the one-pass writers (compression) ask them which chunks
they touch."""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with overlapping and adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], off + n) - last[0])
        else:
            out.append((off, n))
    return out


class Ranges:
    """Disjoint [start, end) byte ranges within a disk, answering overlap queries by bisection
    (a source's extents or changed ranges: validated here, since a reader may be sloppy)."""

    def __init__(self, ranges: Iterable[tuple[int, int]], size: int) -> None:
        clipped = []
        for off, n in ranges:
            a, b = max(int(off), 0), min(int(off) + int(n), size)
            if a < b:
                clipped.append((a, b - a))
        merged = merge_ranges(clipped)
        self.starts = [o for o, _n in merged]
        self.ends = [o + n for o, n in merged]
        self.total = sum(n for _o, n in merged)

    def pieces(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of [a, b) inside the ranges, as (start, end)."""
        out = []
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            out.append((max(self.starts[i], a), min(self.ends[i], b)))
            i += 1
        return out

    def ranges(self) -> list[tuple[int, int]]:
        """As (offset, length)."""
        return [(a, b - a) for a, b in zip(self.starts, self.ends, strict=True)]

    def overlaps(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self.ends, a)
        return i < len(self.starts) and self.starts[i] < b
