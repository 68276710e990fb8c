"""What a push reads: the source disk as a file, a block device, or a generation of an image.

A :class:`SourceReader` answers three questions for the sync engine: the bytes of a range
(``read``), which ranges may hold data at all (``extents``), and, for an image, digests and
stored chunks it already has (``index_for``, ``read_stored``), so they need not be read and
recomputed. ``extents`` narrows a scan down to what may hold data (a regular file's data found
with ``SEEK_DATA``, an image's non-zero chunks, a file system's allocated blocks); a source that
knows what changed since the generation it was last pushed into says so with
``changed_ranges``/``change_base`` (a QEMU dirty bitmap), and the push then reads only those
and takes every other chunk's digest from the target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
from collections.abc import Iterator
from typing import Any

from diskrsync.base.errors import DiskrsyncError, LocalError, ReadError, UsageError, from_oserror
from diskrsync.compression.codec import STANDARD, ChunkCodec, encode, is_zero
from diskrsync.compression.container import open_image, sniff
from diskrsync.compression.crypto import Keyring

SECTOR = 512  # the smallest unit a failing read of a disk is narrowed down to


class SourceReader:
    """Bytes of the disk being pushed; subclasses add what they know without reading."""

    size: int
    description: str
    #: a failing read is narrowed down to aligned pieces of this size, no smaller
    sector: int = SECTOR
    #: the codec ``read_stored`` answers in (and whose digests ``index_for`` holds)
    codec: ChunkCodec = STANDARD
    #: what ``extents`` knows from, named in a generation's metadata when it skipped anything
    extents_map: str = "allocation"

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes; ReadError or OSError (CorruptChunkError for an image) when
        part of them cannot be read."""
        raise NotImplementedError

    def extents(self) -> Iterator[tuple[int, int]]:
        """(offset, length) ranges, ascending and disjoint, that may hold data: every byte
        outside them reads as zero, so a scan need not read it. Default: the whole disk."""
        if self.size:
            yield 0, self.size

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        """(offset, length) ranges, ascending and disjoint, that may differ from the generation
        this source was last pushed into (see ``change_base``); every byte outside them equals
        that generation. None: not known, read everything (the default)."""
        return None

    def change_base(self) -> dict[str, Any] | None:
        """What ``changed_ranges`` is relative to, recorded in the generation's metadata by
        the push that uses it and checked against the target's newest generation by the next
        one (a mismatch falls back to a full scan, loudly). None when not applicable."""
        return None

    def prefetch(self, offset: int, length: int) -> None:
        """A hint: these bytes will be read soon (a scan that skips parts of the disk reads
        the rest in pieces, which defeats the kernel's read-ahead)."""

    def index_for(self, chunk_size: int, fanout: int) -> Any:
        """An object with ``node_hashes(level)`` and ``leaf_hashes(page)`` when this source
        can answer digests from an index for that geometry, else None."""
        return None

    def read_stored(self, index: int, chunk_size: int) -> tuple[int, bytes] | None:
        """Chunk ``index`` of ``chunk_size`` in stored form (kind, bytes) when it can be sent
        without re-encoding, checked against its digest (CorruptChunkError if it fails)."""
        return None

    def close(self) -> None:
        pass


class RawSource(SourceReader):
    """A regular file or a block device."""

    def __init__(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError as e:
            raise from_oserror(e, f"cannot read {path}") from None
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path} is a directory: give a file, a block device or an image")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"{path} is neither a regular file nor a block device")
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise from_oserror(e, f"cannot read {path}") from None
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:  # e.g. a /proc file: EINVAL
            os.close(self.fd)
            raise from_oserror(e, f"cannot read {path}") from None
        self.description = path
        self.regular = stat.S_ISREG(st.st_mode)
        if self.regular:
            self.extents_map = "sparse"
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def extents(self) -> Iterator[tuple[int, int]]:
        """A regular file's data, found with ``SEEK_DATA``/``SEEK_HOLE``: its holes are never
        read. A block device (or a file system without those seeks) is one extent."""
        if not self.regular:
            yield from super().extents()
            return
        off, size = 0, self.size
        while off < size:
            try:
                data = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                    return
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no such seeks here
                    yield off, size - off
                    return
                raise from_oserror(e, f"cannot read {self.description}") from None
            if data >= size:
                return
            try:
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), size)
            except OSError:
                hole = size
            if hole <= data:  # the file changed under us: read the rest
                hole = size
            yield data, hole - data
            off = hole

    def read(self, offset: int, length: int) -> bytes:
        # a short read is continued where it stopped: a disk returns the bytes before a bad
        # sector, and only the read that starts at it fails (ReadError)
        data = self._pread(length, offset)
        done = len(data)
        if done == length:
            return data
        parts = [data]
        while done < length:
            part = self._pread(length - done, offset + done)
            if not part:
                raise LocalError(f"{self.description} shrank while being read (it ends at "
                                 f"offset {offset + done})")
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def prefetch(self, offset: int, length: int) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise ReadError(self.description, offset, e.errno or errno.EIO) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SnapshotSource(SourceReader):
    """A pinned generation of an image (or an SPGZ0001 file) used as the source."""

    def __init__(self, snapshot: Any, description: str, owner: Any = None) -> None:
        self.snap = snapshot
        self.size = snapshot.size
        self.description = description
        self._owner = owner
        self.sector = snapshot.chunk_size  # a damaged chunk is unreadable as a whole
        self.codec = getattr(snapshot, "codec", STANDARD)
        self.extents_map = "zero-chunks"
        #: an encrypted image's key entry (public parts): a push of it stays encrypted
        table = getattr(owner, "table", None)
        self.encryption: dict[str, Any] | None = getattr(table, "encryption", None)

    def read(self, offset: int, length: int) -> bytes:
        data: bytes = self.snap.read(offset, length)
        return data

    def extents(self) -> Iterator[tuple[int, int]]:
        """Runs of chunks the container stores (zero chunks are metadata only)."""
        cs, size = self.snap.chunk_size, self.size
        start = -1  # first chunk of the current run
        for c in range(self.snap.chunk_count):
            if self.snap.chunk_is_zero(c):
                if start >= 0:
                    yield start * cs, c * cs - start * cs
                    start = -1
            elif start < 0:
                start = c
        if start >= 0:
            yield start * cs, size - start * cs

    def index_for(self, chunk_size: int, fanout: int) -> Any:
        tree = getattr(self.snap, "tree", None)
        if tree is not None and tree.shape.chunk_size == chunk_size \
                and tree.shape.fanout == fanout:
            return tree
        return None

    def read_stored(self, index: int, chunk_size: int) -> tuple[int, bytes] | None:
        # only an image with the push's chunk size holds the chunk as one stored piece; it
        # decodes and hash-checks it before handing it out
        if self.snap.chunk_size != chunk_size or not hasattr(self.snap, "read_stored"):
            return None
        kind, data = self.snap.read_stored(index)
        return int(kind), data

    def close(self) -> None:
        self.snap.close()
        if self._owner is not None:
            self._owner.close()


def open_source(path: str, generation: int | None = None,
                keyring: Keyring | None = None) -> SourceReader:
    """A raw file or device, or a generation of an image / SPGZ0001 file (an encrypted
    image unlocked through ``keyring``)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory: give a file, a block device or an image")
    try:
        kind = sniff(path) if os.path.isfile(path) else None
    except LocalError:
        # its first sectors are unreadable (a failing disk under a disk image file): it
        # cannot be told to be an image, so it is read as the raw file it is, where the bad
        # sectors are found and, with --ignore-read-errors, mapped
        kind = None
    if kind is None:
        if generation is not None:
            raise UsageError(f"{path} is not an image, so it has no generation {generation}")
        return RawSource(path)
    img = open_image(path, keyring=keyring)
    try:
        snap = img.snapshot(generation)
    except BaseException:
        img.close()
        raise
    return SnapshotSource(snap, f"{path} (generation {snap.info.number})", owner=img)


# -- what a first push of a source will need at the target --------------------------------

SAMPLES = 32  # reads spread over the source: a few MiB in all, a fraction of a second on a disk
SAMPLE_BYTES = 64 << 10


def space_estimate(reader: SourceReader, samples: int = SAMPLES) -> dict[str, int]:
    """What a first push of ``reader`` will store, estimated from ``samples`` reads of 64
    KiB spread over it, each compressed as a chunk would be (zeros cost nothing, in an image and
    in a sparse raw file): ``{"stored": bytes in an image, "raw": bytes of a raw target,
    "sampled": bytes read}``. A source of at most ``samples`` pieces is read whole, so its
    estimate is exact; an unreadable sample is left out, a sample in a hole (outside the
    reader's extents) is zeros without being read."""
    size = reader.size
    pieces = -(-size // SAMPLE_BYTES)
    if pieces <= samples:
        starts = [i * SAMPLE_BYTES for i in range(pieces)]
    else:  # pseudo-random, the same for every push: even spacing would alias with layouts
        starts = sorted(p * SAMPLE_BYTES for p in random.Random(0).sample(range(pieces),
                                                                         samples))
    extents = list(reader.extents())
    sampled = stored = raw = 0
    for off in starts:
        length = min(SAMPLE_BYTES, size - off)
        if not any(a < off + length and off < a + n for a, n in extents):
            sampled += length  # a hole: zeros, stored as nothing, never read
            continue
        try:
            data = reader.read(off, length)
        except (DiskrsyncError, OSError):
            continue
        sampled += length
        if not is_zero(data):
            raw += length
            stored += len(encode(data)[1])
    if not sampled:
        return {"stored": size, "raw": size, "sampled": 0}
    return {"stored": stored * size // sampled, "raw": raw * size // sampled,
            "sampled": sampled}
