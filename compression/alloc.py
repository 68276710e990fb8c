"""Free-space map of an image file (pure).

Free extents are kept twice in sorted containers: by offset, to merge neighbours when space is
released, and by (length, offset), to find the best fit in O(log n). Whatever no extent covers
below ``end`` is in use; allocations that fit nowhere are appended at ``end``.
"""

from __future__ import annotations

from collections.abc import Iterable

from sortedcontainers import SortedDict, SortedList


class FreeSpace:
    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = max(end, start)
        self._by_off: SortedDict = SortedDict()
        self._by_len: SortedList = SortedList()

    @classmethod
    def from_used(cls, start: int, end: int, used: Iterable[tuple[int, int]]) -> FreeSpace:
        """Free space of ``[start, end)`` minus the ``used`` extents (which may overlap)."""
        fs = cls(start, end)
        pos = start
        for off, length in sorted(used):
            if length <= 0:
                continue
            if off > pos:
                fs._add(pos, min(off, fs.end) - pos)
            pos = max(pos, off + length)
            if pos >= fs.end:
                break
        if pos < fs.end:
            fs._add(pos, fs.end - pos)
        return fs

    def _add(self, off: int, length: int) -> None:
        if length > 0:
            self._by_off[off] = length
            self._by_len.add((length, off))

    def _remove(self, off: int) -> int:
        length: int = self._by_off.pop(off)
        self._by_len.remove((length, off))
        return length

    def allocate(self, length: int) -> int:
        """Offset of ``length`` bytes no one uses: the smallest free extent that fits, else EOF."""
        i = self._by_len.bisect_left((length, -1))
        if i < len(self._by_len):
            ext_len, off = self._by_len[i]
            self._remove(off)
            self._add(off + length, ext_len - length)
            return int(off)
        off = self.end
        # a free extent touching the end can be extended instead of leaving it stranded
        last = self._by_off.peekitem(-1) if self._by_off else None
        if last is not None and last[0] + last[1] == self.end:
            off = last[0]
            self._remove(off)
        self.end = off + length
        return off

    def allocate_aligned(self, length: int, align: int) -> int:
        """Like ``allocate``, but the extent starts at a multiple of ``align`` and covers whole
        blocks of ``align`` bytes: no other extent of this map shares a block with it."""
        span = -(-length // align) * align
        off = self.allocate(span + align - 1)
        start = -(-off // align) * align
        self.release(off, start - off)
        self.release(start + span, off + span + align - 1 - (start + span))
        return start

    def release(self, off: int, length: int) -> None:
        """Give an extent back, merging it with free neighbours."""
        if length <= 0:
            return
        i = self._by_off.bisect_left(off)
        if i > 0:
            poff, plen = self._by_off.peekitem(i - 1)
            if poff + plen == off:
                self._remove(poff)
                off, length = poff, plen + length
        nxt = off + length
        if nxt in self._by_off:
            length += self._remove(nxt)
        self._add(off, length)

    def trim_end(self) -> int:
        """Drop a free extent that ends at EOF; returns the new end (the file can shrink to it)."""
        if self._by_off:
            off, length = self._by_off.peekitem(-1)
            if off + length == self.end:
                self._remove(off)
                self.end = off
        return self.end

    def extents(self) -> list[tuple[int, int]]:
        return list(self._by_off.items())

    @property
    def free_bytes(self) -> int:
        return sum(self._by_off.values())


class UsedSpace:
    """The union of extents added in any order, kept as disjoint sorted runs.

    What the writer's walk of the live trees finds: the same extent may come more than once
    (pages or chunks shared between generations) and in no order. Memory follows the runs
    the union has, the image's fragments, not the extents added (a chunk each: 8 M per TiB
    of data), so the free-space map is built in memory flat in the disk size (issue 16). A
    run being extended (a push writes its chunks one after another) is kept aside and
    merged only when an extent does not continue it, which keeps adding cheap.
    """

    def __init__(self) -> None:
        self._runs: SortedDict = SortedDict()  # start -> end, disjoint, not touching
        self._cur = (0, 0)  # start, end of the run being extended (empty: start == end)

    def add(self, off: int, length: int) -> None:
        if length <= 0:
            return
        start, end = self._cur
        if off == end and start < end:
            self._cur = (start, off + length)
            return
        self._merge(start, end)
        self._cur = (off, off + length)

    def _merge(self, start: int, end: int) -> None:
        if start >= end:
            return
        runs = self._runs
        i = runs.bisect_right(start)
        if i > 0:  # a run starting at or before ``start`` that reaches it absorbs it
            s, e = runs.peekitem(i - 1)
            if e >= start:
                if e >= end:
                    return
                start = s
                i -= 1
        while i < len(runs):  # runs starting inside [start, end] are absorbed
            s, e = runs.peekitem(i)
            if s > end:
                break
            end = max(end, e)
            del runs[s]
        runs[start] = end

    def remove(self, off: int, length: int) -> None:
        """Take ``[off, off + length)`` out of the union, which holds all of it."""
        if length <= 0:
            return
        self._merge(*self._cur)
        self._cur = (0, 0)
        runs = self._runs
        i = runs.bisect_right(off) - 1
        start, end = runs.peekitem(i) if i >= 0 else (off, off)
        if not start <= off < off + length <= end:
            raise ValueError(f"extent ({off}, {length}) is not held")
        del runs[start]
        if start < off:
            runs[start] = off
        if off + length < end:
            runs[off + length] = end

    def runs(self) -> list[tuple[int, int]]:
        """The union as (offset, length), sorted, disjoint and not touching."""
        self._merge(*self._cur)
        self._cur = (0, 0)
        return [(s, e - s) for s, e in self._runs.items()]

    def __len__(self) -> int:
        """Runs held (what the memory is)."""
        return len(self._runs) + (self._cur[0] < self._cur[1])
