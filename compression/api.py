"""The read-side interface every disk container offers (our images and Go `SPGZ0001` files).

The mount, restore, verify and push-from-an-image all code against these two protocols, so a
new container kind only has to provide them. Reads are thread-safe: the mount calls
``read_chunk`` from worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerationInfo:
    """What a listing shows of one committed generation."""

    number: int
    commit_time: float  # seconds since the epoch, UTC
    size: int  # logical bytes
    root_hash: bytes  # empty when the container stores no hashes (SPGZ0001)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class DiskSnapshot(Protocol):
    """One immutable version of a disk, pinned until ``close()``."""

    @property
    def info(self) -> GenerationInfo: ...

    @property
    def size(self) -> int: ...

    @property
    def chunk_size(self) -> int: ...

    @property
    def chunk_count(self) -> int: ...

    def chunk_is_zero(self, index: int) -> bool:
        """True when the chunk is known to be all zeros without reading data."""
        ...

    def read_chunk(self, index: int) -> bytes:
        """The chunk's bytes (the last chunk may be short), checked; raises CorruptChunkError."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the size."""
        ...

    def close(self) -> None: ...


class DiskImage(Protocol):
    """A container holding one or more generations of a disk."""

    def generations(self) -> list[GenerationInfo]:
        """Retained generations, oldest first."""
        ...

    def refresh(self) -> None:
        """Re-read metadata so generations committed by other processes become visible."""
        ...

    def snapshot(self, number: int | None = None) -> DiskSnapshot:
        """Pin generation ``number`` (default: the current one) for reading."""
        ...

    def close(self) -> None: ...


def read_span(
    read_chunk: Callable[[int], bytes | bytearray], size: int, chunk_size: int,
    offset: int, length: int,
) -> bytes:
    """Bytes [offset, offset+length) clipped to ``size``, assembled from whole chunks."""
    end = min(offset + length, size)
    if offset >= end:
        return b""
    parts = []
    for i in range(offset // chunk_size, (end - 1) // chunk_size + 1):
        base = i * chunk_size
        parts.append(bytes(read_chunk(i)[max(offset - base, 0) : end - base]))
    return b"".join(parts)
