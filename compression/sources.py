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
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from diskrsync.base.errors import (
    DiskrsyncError,
    LocalError,
    ReadError,
    UsageError,
    from_oserror,
)
from diskrsync.compression.codec import STANDARD, ChunkCodec, encode, is_zero
from diskrsync.compression.container import open_image, sniff
from diskrsync.compression.crypto import Keyring
from diskrsync.compression.nbd import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    STATE_DIRTY,
    STATE_ZERO,
    NbdClient,
    is_nbd_url,
    merge_ranges,
    parse_nbd_url,
)
from diskrsync.compression.qmp import ManagedBitmap

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
        """A hint: these bytes will be read soon. The scan gives it a window ahead of its
        reads, in ascending order, each byte once, so that a cold disk keeps reading while
        the workers hash (the kernel's own read-ahead is 128 KiB on a block device, and a
        scan that skips parts of the disk reads the rest in pieces, which defeats it)."""

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

    def committed(self) -> None:
        """The push committed a generation from this source (never called after a failed
        one): a source that tracks changes starts its next interval here."""

    def warnings(self) -> list[str]:
        """What the user should hear about this source once the push ends."""
        return []


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
        # the kernel starts reading these pages and returns; no POSIX_FADV_DONTNEED after
        # reading: it would also drop pages others use (a VM's image file) and make every
        # later push cold (docs/benchmarks.md, "Cold source")
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


#: ranges from NBD maps are rounded out to at least this grain (coarser on huge disks), so that
#: their lists stay bounded whatever the server sends
MAP_GRAIN = 4096
MAX_MAP_RANGES = 1 << 20
MAX_NBD_CONNECTIONS = 4  # one per reading thread, at most


class NbdSource(SourceReader):
    """A disk read through NBD, typically QEMU's export of a VM disk.

    ``extents`` come from the ``base:allocation`` context (what reads as zeros is not read).
    With ``dirty_bitmap``, ``changed_ranges`` come from ``qemu:dirty-bitmap:NAME``: the export
    offers it and whoever runs QEMU clears or rotates it after each committed push. With
    ``qmp`` as well, this push manages the bitmap itself through QEMU's monitor (see
    compression/qmp.py): it reads a frozen copy through its own export and clears the bitmap
    only in ``committed``.
    """

    extents_map = "allocation"

    def __init__(self, url: str, dirty_bitmap: str | None = None,
                 qmp: str | None = None) -> None:
        address = parse_nbd_url(url)
        if qmp is not None and dirty_bitmap is None:
            raise UsageError("--qmp needs --dirty-bitmap NAME: the bitmap to manage")
        self.description = url
        self.bitmap = dirty_bitmap
        self.bytes_read = 0
        self._notes: list[str] = []
        self._local = threading.local()
        self._clients: list[NbdClient] = []
        self._lock = threading.Lock()
        self._changed: list[tuple[int, int]] | None = None
        self.managed = ManagedBitmap(qmp, address.export, dirty_bitmap) \
            if qmp is not None and dirty_bitmap is not None else None
        exported = dirty_bitmap
        if self.managed is not None:
            address = replace(address, export=self.managed.export_name)
            exported = self.managed.scan_bitmap
            if self.managed.problem:
                self._notes.append(f"{self.managed.problem}: every block was read; it records "
                                   f"writes from now on, so the next push reads only those")
            if self.managed.live:
                self._notes.append(f"no point-in-time view of the disk ({self.managed.live}): "
                                   f"it was read while it changed (freeze the guest's file "
                                   f"systems for a consistent backup)")
        self.address = address
        self._bitmap_context = DIRTY_BITMAP_PREFIX + exported if exported else None
        self._contexts = (BASE_ALLOCATION,) + (
            (self._bitmap_context,) if self._bitmap_context else ())
        try:
            first = self._client()
        except BaseException:
            self.close()
            raise
        self.size = first.info.size
        self.sector = max(SECTOR, first.info.min_block)
        self._grain = MAP_GRAIN
        while self.size // self._grain > 2 * MAX_MAP_RANGES:
            self._grain *= 2
        if dirty_bitmap is not None and self.managed is None \
                and self._bitmap_context not in first.contexts:
            self._notes.append(f"the NBD export {url} offers no dirty bitmap {dirty_bitmap}: "
                               f"every block was read")

    def _client(self) -> NbdClient:
        """This thread's connection (a few threads read in parallel, one request each)."""
        c: NbdClient | None = getattr(self._local, "client", None)
        if c is not None:
            return c
        with self._lock:
            if len(self._clients) >= MAX_NBD_CONNECTIONS:
                c = self._clients[threading.get_ident() % len(self._clients)]
            else:
                c = NbdClient(self.address, self._contexts)
                self._clients.append(c)
        self._local.client = c
        return c

    def read(self, offset: int, length: int) -> bytes:
        data = self._client().read(offset, length)
        with self._lock:
            self.bytes_read += length
        return data

    def extents(self) -> Iterator[tuple[int, int]]:
        """What may hold data: every range ``base:allocation`` does not say reads as zeros."""
        c = self._client()
        if BASE_ALLOCATION not in c.contexts:
            yield from super().extents()
            return
        data = ((off, n) for off, n, flags in c.walk(BASE_ALLOCATION) if not flags & STATE_ZERO)
        yield from merge_ranges(data, self._grain, self.size)

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        """The ranges the dirty bitmap marks as written; None without a usable bitmap."""
        if self._changed is None:
            c = self._client()
            if self._bitmap_context is None or self._bitmap_context not in c.contexts:
                return None
            dirty = ((off, n) for off, n, flags in c.walk(self._bitmap_context)
                     if flags & STATE_DIRTY)
            self._changed = merge_ranges(dirty, self._grain, self.size)
        return self._changed

    def change_base(self) -> dict[str, Any] | None:
        """The bitmap and disk the ranges belong to: a push records it, and the next one uses
        the bitmap only against a generation that recorded the same (else a full scan)."""
        if self.bitmap is None:
            return None
        if self.managed is not None:
            return {"map": "dirty-bitmap", "bitmap": self.bitmap, "node": self.managed.node,
                    "size": self.size}
        return {"map": "dirty-bitmap", "bitmap": self.bitmap, "export": self.address.export,
                "size": self.size}

    def committed(self) -> None:
        if self.managed is not None:
            self.managed.committed()

    def warnings(self) -> list[str]:
        return list(self._notes)

    def close(self) -> None:
        clients, self._clients = self._clients, []
        for c in clients:
            c.close()
        managed, self.managed = self.managed, None
        if managed is not None:
            # never in place of the error that ended the push (QEMU may be gone): whatever
            # is left (the export, the copies; never a change) the next push removes first
            with contextlib.suppress(DiskrsyncError):
                managed.close()


def source_name(path: str) -> str:
    """The name a push gives its source (an image in a DST directory is named after it): a
    path's last component, an NBD export's name."""
    if is_nbd_url(path):
        return parse_nbd_url(path).export or "disk"
    return os.path.basename(path.rstrip("/"))


def open_source(path: str, generation: int | None = None, keyring: Keyring | None = None, *,
                dirty_bitmap: str | None = None, qmp: str | None = None) -> SourceReader:
    """A raw file or device, a generation of an image / SPGZ0001 file (an encrypted image
    unlocked through ``keyring``), or an NBD export (``nbd://`` / ``nbd+unix://``, with a
    QEMU dirty bitmap: see NbdSource)."""
    if is_nbd_url(path):
        if generation is not None:
            raise UsageError(f"{path} is an NBD export: it has no generations")
        return NbdSource(path, dirty_bitmap, qmp)
    if dirty_bitmap is not None or qmp is not None:
        raise UsageError("--dirty-bitmap and --qmp are for an NBD source (nbd://... or "
                         "nbd+unix:///EXPORT?socket=PATH)")
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
