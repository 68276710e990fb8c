"""An in-memory ``DiskImage`` for the mount's tests (until the real image lands).

``FakeImage`` holds several generations of a disk as chunks (zero chunks stored as nothing,
optionally zstd-compressed), can add and prune generations at run time, and can mark chunks
corrupt so that ``read_chunk`` raises ``CorruptChunkError``. It counts pinned snapshots and
``read_chunk`` calls so tests can check pinning and miss coalescing.

``DirectoryImage`` is the same image driven from another process through a directory (for real
mounts in a subprocess): ``<N>.raw`` files are generations (commit time = the file's mtime),
a ``corrupt`` file lists ``<N> <chunk>`` lines; ``refresh()`` rescans. A generation's file is
opened when its snapshot is pinned, so deleting the file (a prune) keeps it readable while open.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import zstandard

from diskrsync.base.errors import CorruptChunkError, UsageError
from diskrsync.compression.api import GenerationInfo
from diskrsync.compression.image import GenerationGoneError

DEFAULT_CHUNK = 64 * 1024


class ChunkSource(Protocol):
    size: int

    def is_zero(self, index: int) -> bool: ...

    def chunk(self, index: int) -> bytes: ...

    def close(self) -> None: ...


class MemorySource:
    """Chunks in memory: None for a zero chunk, else raw or zstd-compressed bytes."""

    def __init__(self, data: bytes, chunk_size: int, *, compress: bool = False, level: int = 3):
        self.size = len(data)
        self.chunk_size = chunk_size
        self.compressed = compress
        cctx = zstandard.ZstdCompressor(level=level) if compress else None
        self._chunks: list[bytes | None] = []
        data = bytes(data)
        view = memoryview(data)
        for start in range(0, len(data), chunk_size):
            piece = view[start : start + chunk_size]
            if data.count(0, start, start + len(piece)) == len(piece):
                self._chunks.append(None)
            elif cctx is not None:
                self._chunks.append(cctx.compress(piece))
            else:
                self._chunks.append(bytes(piece))
        self._dctx = threading.local()

    def is_zero(self, index: int) -> bool:
        return self._chunks[index] is None

    def chunk(self, index: int) -> bytes:
        stored = self._chunks[index]
        length = min(self.chunk_size, self.size - index * self.chunk_size)
        if stored is None:
            return bytes(length)
        if self.compressed:
            dctx = getattr(self._dctx, "d", None)
            if dctx is None:
                dctx = self._dctx.d = zstandard.ZstdDecompressor()
            return dctx.decompress(stored, max_output_size=length)
        return stored

    def close(self) -> None:
        return None


class FileSource:
    """A generation backed by an open file; zero chunks found with SEEK_DATA (holes)."""

    def __init__(self, path: str | os.PathLike[str], chunk_size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self.chunk_size = chunk_size
        self._data_chunks = self._scan()

    def _scan(self) -> set[int]:
        chunks: set[int] = set()
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            chunks.update(range(data // self.chunk_size, (hole - 1) // self.chunk_size + 1))
            pos = hole
        return chunks

    def is_zero(self, index: int) -> bool:
        return index not in self._data_chunks

    def chunk(self, index: int) -> bytes:
        length = min(self.chunk_size, self.size - index * self.chunk_size)
        return os.pread(self._fd, length, index * self.chunk_size)

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class _Generation:
    info: GenerationInfo
    source: ChunkSource
    corrupt: set[int] = field(default_factory=set)
    pins: int = 0
    pruned: bool = False


class FakeSnapshot:
    """One pinned generation (implements ``DiskSnapshot``)."""

    def __init__(self, image: FakeImage, gen: _Generation) -> None:
        self._image = image
        self._gen = gen
        self.closed = False

    @property
    def info(self) -> GenerationInfo:
        return self._gen.info

    @property
    def size(self) -> int:
        return self._gen.source.size

    @property
    def chunk_size(self) -> int:
        return self._image.chunk_size

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_is_zero(self, index: int) -> bool:
        return index not in self._gen.corrupt and self._gen.source.is_zero(index)

    def read_chunk(self, index: int) -> bytes:
        if self.closed:
            raise ValueError("snapshot is closed")
        if not 0 <= index < self.chunk_count:
            raise IndexError(index)
        with self._image.lock:
            self._image.chunk_reads += 1
        if self._image.read_delay:
            time.sleep(self._image.read_delay)
        if index in self._gen.corrupt:
            raise CorruptChunkError(index, index * self.chunk_size)
        return self._gen.source.chunk(index)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            index = pos // self.chunk_size
            data = self.read_chunk(index)
            base = index * self.chunk_size
            out += data[pos - base : end - base]
            pos = base + len(data)
        return bytes(out)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._image._unpin(self._gen)


class FakeImage:
    """In-memory ``DiskImage`` with run-time add/prune/corrupt; thread-safe reads."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK, *, compress: bool = False) -> None:
        self.chunk_size = chunk_size
        self.compress = compress
        self.lock = threading.Lock()
        self._gens: dict[int, _Generation] = {}
        self._next = 1
        self.chunk_reads = 0
        self.read_delay = 0.0  # seconds per read_chunk (to widen race windows in tests)
        self.refreshes = 0
        self.closed = False
        self._pinned: list[_Generation] = []

    # --- test controls --------------------------------------------------------------------

    def add_generation(
        self, data: bytes | ChunkSource, *, commit_time: float | None = None,
        number: int | None = None,
    ) -> int:
        source = (
            MemorySource(data, self.chunk_size, compress=self.compress)
            if isinstance(data, bytes | bytearray) else data
        )
        with self.lock:
            n = self._next if number is None else number
            self._next = max(self._next, n + 1)
            when = time.time() if commit_time is None else commit_time
            info = GenerationInfo(n, when, source.size, b"\x01" * 32, source="fake")
            self._gens[n] = _Generation(info, source)
        return n

    def prune(self, number: int) -> None:
        with self.lock:
            gen = self._gens.pop(number)
            gen.pruned = True
            if gen.pins == 0:
                gen.source.close()

    def corrupt_chunk(self, number: int, index: int) -> None:
        with self.lock:
            self._gens[number].corrupt.add(index)

    def pins(self, number: int) -> int:
        """How many snapshots of generation ``number`` are open (pruned ones included)."""
        with self.lock:
            return sum(g.pins for g in self._pinned if g.info.number == number)

    def open_snapshots(self) -> int:
        with self.lock:
            return sum(g.pins for g in self._pinned)

    # --- DiskImage ------------------------------------------------------------------------

    def generations(self) -> list[GenerationInfo]:
        with self.lock:
            return [self._gens[n].info for n in sorted(self._gens)]

    def refresh(self) -> None:
        self.refreshes += 1

    def snapshot(self, number: int | None = None) -> FakeSnapshot:
        with self.lock:
            if not self._gens:
                raise UsageError("the image holds no generation")
            n = max(self._gens) if number is None else number
            gen = self._gens.get(n)
            if gen is None:
                raise GenerationGoneError(f"generation {n} is not in the image")
            gen.pins += 1
            if gen not in self._pinned:
                self._pinned.append(gen)
        return FakeSnapshot(self, gen)

    def _unpin(self, gen: _Generation) -> None:
        with self.lock:
            gen.pins -= 1
            if gen.pins == 0:
                self._pinned.remove(gen)
                if gen.pruned:
                    gen.source.close()

    def close(self) -> None:
        self.closed = True


class DirectoryImage(FakeImage):
    """A ``FakeImage`` whose generations come from ``<N>.raw`` files in a directory."""

    def __init__(self, directory: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(chunk_size)
        self.directory = Path(directory)
        self.refresh()

    def refresh(self) -> None:
        super().refresh()
        present: dict[int, Path] = {}
        for path in self.directory.glob("*.raw"):
            if path.stem.isdigit():
                present[int(path.stem)] = path
        with self.lock:
            known = set(self._gens)
        for number in sorted(set(present) - known):
            path = present[number]
            try:
                source = FileSource(path, self.chunk_size)
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            self.add_generation(source, commit_time=mtime, number=number)
        for number in known - set(present):
            self.prune(number)
        corrupt_file = self.directory / "corrupt"
        if corrupt_file.exists():
            for line in corrupt_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and all(p.isdigit() for p in parts):
                    with self.lock:
                        gen = self._gens.get(int(parts[0]))
                        if gen is not None:
                            gen.corrupt.add(int(parts[1]))


def disk_bytes(size: int, pattern: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """``size`` zero bytes with each ``(offset, data)`` of ``pattern`` written in."""
    buf = bytearray(size)
    for offset, data in pattern:
        buf[offset : offset + len(data)] = data
    return bytes(buf)
