"""Write a whole disk into a repository in one pass (the repository's counterpart of
``importer.py``, and the reference its pushes are measured against): runs of chunks are
read, tested for zeros, hashed to their content ids and, when the repository lacks them,
encoded, on the worker threads; chunks equal to the newest generation's cost nothing more."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from diskrsync.base.errors import BusyError
from diskrsync.base.merkle import Shape
from diskrsync.base.parallel import ordered_map
from diskrsync.base.ranges import Ranges
from diskrsync.compression.codec import ChunkAt
from diskrsync.compression.importer import BATCH_CHUNKS, batch_pieces, read_pieces
from diskrsync.compression.repository import Manifest, Repository


class ChunkPlan:
    """Which chunks a one-pass write reads. ``data``: byte ranges that may hold non-zero
    bytes (a sparse file's extents): a chunk outside them is zeros, never read. ``changed``
    (a map of changed ranges relative to the base generation, or None): a chunk outside it
    keeps the base's content id, never read; ``base_root``: the root of the generation that
    map is relative to (the writer's base must still be it). Counts the bytes it reads."""

    def __init__(self, data: Ranges, changed: Ranges | None = None,
                 base_root: bytes | None = None) -> None:
        self.data, self.changed, self.base_root = data, changed, base_root
        self.bytes_read = 0
        self._lock = threading.Lock()

    def _read_run(self, read: Callable[[int, int], bytes], shape: Shape, a: int, b: int,
                  what: str) -> Iterator[tuple[int, memoryview | None, int]]:
        cs = shape.chunk_size
        with self._lock:
            self.bytes_read += min(b * cs, shape.size) - a * cs
        return read_pieces(read, shape, a, b, what)

    def pieces(self, read: Callable[[int, int], bytes], shape: Shape, first: int,
               what: str) -> Iterator[tuple[int, memoryview | None, int]]:
        """As ``importer.batch_pieces`` for the batch at ``first``, less the chunks that keep
        the base's id; runs of chunks to read are read at once."""
        cs = shape.chunk_size
        last = min(first + BATCH_CHUNKS, shape.chunks)
        end = min(last * cs, shape.size)
        if self.changed is not None and not self.changed.overlaps(first * cs, end):
            return
        if not self.data.overlaps(first * cs, end):
            for c in range(first, last):
                if self.changed is None or self.changed.overlaps(c * cs, c * cs + cs):
                    yield c, None, shape.chunk_length(c)
            return
        run = None
        for c in range(first, last):
            lo, hi = c * cs, min(c * cs + cs, shape.size)
            if self.changed is not None and not self.changed.overlaps(lo, hi):
                state = "keep"
            else:
                state = "read" if self.data.overlaps(lo, hi) else "zero"
            if state != "read" and run is not None:
                yield from self._read_run(read, shape, run, c, what)
                run = None
            if state == "zero":
                yield c, None, shape.chunk_length(c)
            elif state == "read" and run is None:
                run = c
        if run is not None:
            yield from self._read_run(read, shape, run, last, what)


def write_disk(repo: Repository, disk: str, read: Callable[[int, int], bytes], size: int, *,
               source: str = "", meta: dict[str, Any] | None = None, incremental: bool = True,
               progress: Callable[[int], None] | None = None,
               now: Callable[[], float] = time.time,
               new_generation: bool = True,
               plan: ChunkPlan | None = None) -> tuple[Manifest, dict[str, int]]:
    """Store ``size`` bytes that ``read(offset, length)`` returns (thread-safe) as a new
    generation of ``disk``; with ``incremental``, chunks whose content id equals the newest
    generation's at the same place are not even encoded. ``plan``: read only the chunks it
    names (its ``changed`` map needs ``incremental`` and, under the writer's lock, a newest
    generation whose root is the plan's ``base_root``: else a BusyError, nothing written).
    Returns the manifest and counts."""
    codec = repo.codec
    with repo.writer(disk) as w:
        base = repo.snapshot(disk) if incremental and repo.generations(disk) else None
        if plan is not None and plan.changed is not None and (
                base is None or base.shape.size != size
                or base.manifest.root != plan.base_root):
            # planned against another generation (another push committed before this one
            # took the lock): the chunks it would keep are not this source's
            raise BusyError(f"disk {disk}'s newest generation changed while this push planned "
                            f"its reads (another push committed meanwhile): nothing was "
                            f"written; run it again")
        w.begin(size, base)
        shape = w.shape
        assert shape is not None

        def work(first: int) -> list[tuple[int, bytes, int, bytes, int]]:
            out = []
            what = source or disk
            pieces = batch_pieces(read, shape, first, what) if plan is None \
                else plan.pieces(read, shape, first, what)
            for c, piece, n in pieces:
                if piece is None:
                    out.append((c, codec.zero_hash(n), -1, b"", n))
                    continue
                bid = codec.leaf_hash(piece, c)
                if bid == w.leaf(c) or w.knows(bid):
                    out.append((c, bid, -1, b"", n))
                else:
                    kind, stored = codec.encode(piece, ChunkAt(c, bid))
                    out.append((c, bid, int(kind), stored, n))
            return out

        firsts = range(0, shape.chunks, BATCH_CHUNKS)
        for first, batch in zip(firsts, ordered_map(work, firsts), strict=True):
            for c, bid, kind, stored, n in batch:
                if kind < 0:
                    w.set_leaf(c, bid)
                else:
                    w.put_stored(c, bid, kind, stored, n)
            if progress is not None:  # the batch's bytes, also those a plan did not read
                cs = shape.chunk_size
                progress(min((first + BATCH_CHUNKS) * cs, shape.size) - first * cs)
        if not new_generation and base is not None and w.root() == base.manifest.root:
            return base.manifest, w.stats
        manifest = w.commit(source=source, meta=meta, now=now)
        return manifest, w.stats
