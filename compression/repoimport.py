"""Write a whole disk into a repository in one pass (the repository's counterpart of
``importer.py``, and the reference its pushes are measured against): runs of chunks are
read, tested for zeros, hashed to their content ids and, when the repository lacks them,
encoded, on the worker threads; chunks equal to the newest generation's cost nothing more."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from diskrsync.base.parallel import ordered_map
from diskrsync.compression.codec import ChunkAt
from diskrsync.compression.importer import BATCH_CHUNKS, batch_pieces
from diskrsync.compression.repository import Manifest, Repository


def write_disk(repo: Repository, disk: str, read: Callable[[int, int], bytes], size: int, *,
               source: str = "", meta: dict[str, Any] | None = None, incremental: bool = True,
               progress: Callable[[int], None] | None = None,
               now: Callable[[], float] = time.time,
               new_generation: bool = True) -> tuple[Manifest, dict[str, int]]:
    """Store ``size`` bytes that ``read(offset, length)`` returns (thread-safe) as a new
    generation of ``disk``; with ``incremental``, chunks whose content id equals the newest
    generation's at the same place are not even encoded. Returns the manifest and counts."""
    codec = repo.codec
    with repo.writer(disk) as w:
        base = repo.snapshot(disk) if incremental and repo.generations(disk) else None
        w.begin(size, base)
        shape = w.shape
        assert shape is not None

        def work(first: int) -> list[tuple[int, bytes, int, bytes, int]]:
            out = []
            for c, piece, n in batch_pieces(read, shape, first, source or disk):
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

        for batch in ordered_map(work, range(0, shape.chunks, BATCH_CHUNKS)):
            for c, bid, kind, stored, n in batch:
                if kind < 0:
                    w.set_leaf(c, bid)
                else:
                    w.put_stored(c, bid, kind, stored, n)
            if progress is not None:
                progress(sum(item[4] for item in batch))
        if not new_generation and base is not None and w.root() == base.manifest.root:
            return base.manifest, w.stats
        manifest = w.commit(source=source, meta=meta, now=now)
        return manifest, w.stats
