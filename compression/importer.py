"""Write a whole disk's content into a new image in one pass (convert, and the format's own
write-speed reference): runs of chunks are read, hashed and compressed on the worker threads and
stored in order into one transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from diskrsync.base.errors import DataError
from diskrsync.base.merkle import Shape
from diskrsync.base.parallel import ordered_map
from diskrsync.compression.api import GenerationInfo
from diskrsync.compression.codec import STANDARD, ChunkAt, ChunkCodec, Kind, zeros
from diskrsync.compression.format import DEFAULT_CHUNK
from diskrsync.compression.image import Image

BATCH_CHUNKS = 32  # chunks per worker task: amortises the hand-off, bounds memory


def batch_pieces(read: Callable[[int, int], bytes], shape: Shape, first: int,
                 what: str) -> Iterator[tuple[int, memoryview | None, int]]:
    """Chunks ``first ..`` (one batch) of a disk ``read(offset, length)`` returns, read at
    once: ``(index, bytes or None for zeros, length)``. A short read is a DataError naming
    ``what``. (Both one-pass writers, into an image and into a repository, read this way.)"""
    return read_pieces(read, shape, first, min(first + BATCH_CHUNKS, shape.chunks), what)


def read_pieces(read: Callable[[int, int], bytes], shape: Shape, first: int, last: int,
                what: str) -> Iterator[tuple[int, memoryview | None, int]]:
    """Chunks ``first`` to ``last`` (exclusive), read at once, as ``batch_pieces`` gives
    them."""
    cs = shape.chunk_size
    start, stop = first * cs, min(last * cs, shape.size)
    data = read(start, stop - start)
    if len(data) != stop - start:
        raise DataError(f"short read at offset {start} while writing {what}")
    view = memoryview(data)
    for c in range(first, last):
        at, n = (c - first) * cs, shape.chunk_length(c)
        zero = data.startswith(zeros(n), at)  # memcmp in place, no copy
        yield c, None if zero else view[at : at + n], n


def write_new_image(
    read: Callable[[int, int], bytes],
    size: int,
    path: str,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    source: str = "",
    meta: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    codec: ChunkCodec = STANDARD,
) -> GenerationInfo:
    """Create the image ``path`` (which must not exist) holding ``size`` bytes that
    ``read(offset, length)`` returns (thread-safe) as its first generation. The caller
    removes ``path`` if this fails."""
    img = Image.create(path, chunk_size=chunk_size, codec=codec)
    codec = img.codec
    try:
        tx = img.begin(what="import")
        try:
            tx.resize(size)
            shape = tx.shape

            def encode(first: int) -> list[tuple[int, Kind, bytes, bytes, int]]:
                out = []
                for c, piece, n in batch_pieces(read, shape, first, path):
                    if piece is None:
                        out.append((c, Kind.ZERO, b"", codec.zero_hash(n), n))
                    else:
                        digest = codec.leaf_hash(piece, c)
                        kind, stored = codec.encode(piece, ChunkAt(c, digest))
                        out.append((c, kind, stored, digest, n))
                return out

            for batch in ordered_map(encode, range(0, shape.chunks, BATCH_CHUNKS)):
                for c, kind, stored, digest, n in batch:
                    tx.put_chunk(c, kind, stored, digest, n)
                if progress is not None:
                    progress(sum(item[4] for item in batch))
            return tx.commit(source=source, meta=dict(meta or {}))
        finally:
            tx.close()
    finally:
        img.close()
