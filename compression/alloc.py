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
