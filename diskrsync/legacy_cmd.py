"""Working with the original Go diskrsync: its remote end, ``push --legacy``, and ``convert``.

Design note
-----------
The protocol itself (``BSNC0002``) lives in ``synccore/legacy.py`` as two sans-I/O state
machines. This module is the thin I/O layer around them, in three parts:

* **Storage adapters.** :class:`ImageTargetStore` lets the Go protocol write into a diskrsync
  image *transaction*: nothing is visible until the commit, so a Go client that dies mid-way
  leaves the previous generation untouched (the Go tool itself writes in place). The Go tree's
  leaves (~128 KiB, split by integer division) do not line up with image chunks, so writes are
  read-modify-write of whole chunks, with the last partly written chunk kept in memory until a
  write moves past it: leaves and tail blocks arrive in ascending order, so each chunk is
  compressed once. :class:`RawTargetStore` is ``--no-compress``: a raw file or block device
  updated in place, as the Go tool does it.
* **Targets that must appear atomically.** A new image, or an existing ``SPGZ0001`` file that
  is converted, is built in a temporary file beside PATH and put in place only after the
  commit: a new image with ``link`` (which fails if PATH appeared meanwhile, e.g. a native push
  created an image there: that image is kept and this sync fails), a converted one with
  ``os.replace`` once PATH is checked to be still the very file that was converted. On any
  failure the temporary file is removed.
* **Drivers.** :func:`go_remote_main` is what a Go client starts over SSH
  (``CMD --target|--source [FLAGS] PATH``); :func:`legacy_push` is ``push --legacy`` toward a
  host that runs the Go tool. Both pump bytes between a state machine and a byte pipe with
  :func:`run_machine`; a single thread suffices because BSNC0002 is lock-step (the target
  sends a digest and waits for its answer; only the source's tail is a one-way stream).

The Go tree's leaf digests are computed from data on two threads (``ordered_map``): reading,
decompressing and BLAKE2b all release the GIL.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from diskrsync.base.errors import (
    BusyError,
    DiskrsyncError,
    LocalError,
    PeerError,
    UsageError,
    from_oserror,
    stat_or_none,
)
from diskrsync.base.parallel import ordered_map
from diskrsync.base.progress import Progress
from diskrsync.base.units import human
from diskrsync.cli.requests import ssh_options
from diskrsync.compression.api import GenerationInfo, read_span
from diskrsync.compression.codec import zeros
from diskrsync.compression.container import sniff
from diskrsync.compression.destination import check_push_target, open_dest
from diskrsync.compression.format import DEFAULT_CHUNK
from diskrsync.compression.image import (
    Image,
    Transaction,
    fsync_dir,
    punch_hole,
    pwrite_all,
    remove_stale_temps,
    take_writer_lock,
    temp_name,
)
from diskrsync.compression.importer import write_new_image
from diskrsync.compression.spgz import SpgzImage
from diskrsync.synccore.legacy import (
    TAIL_BLOCK_SIZE,
    HeaderExchanged,
    LeafHashProvider,
    LegacySource,
    LegacyTarget,
    ProgressLineWriter,
    RangeSynced,
    SyncFinished,
    TreeShape,
    leaf_hash,
    parse_go_remote_args,
)
from diskrsync.synccore.location import LocalPath, Location, RemotePath
from diskrsync.synccore.push import PushRequest, open_source
from diskrsync.synccore.source import PushStats
from diskrsync.synccore.ssh.config import SshOptions
from diskrsync.synccore.ssh.connection import connect
from diskrsync.synccore.ssh.errors import RemoteCommandError

__all__ = [
    "CONVERT_SOURCE",
    "GO_CLIENT_SOURCE",
    "GoProgressLines",
    "ImageTargetStore",
    "LegacyTargetEnd",
    "ProgressLineParser",
    "RawTargetStore",
    "convert",
    "convert_snapshot",
    "go_remote_main",
    "legacy_push",
    "open_legacy_target",
    "parallel_leaf_hashes",
    "run_machine",
]

#: ``source`` recorded in a generation written by a Go client.
GO_CLIENT_SOURCE = "Go diskrsync client"
#: ``source`` recorded in the generation a conversion creates.
CONVERT_SOURCE = "converted from SPGZ0001"

_LEAF_BATCH_BYTES = 4 << 20  # bytes per hashing task: amortises the thread hand-off
_RECV_SIZE = 1 << 20


# ---------------------------------------------------------------------------------------------
# Leaf hashing on two threads
# ---------------------------------------------------------------------------------------------


def _leaf_batches(shape: TreeShape, batch_bytes: int) -> Iterator[list[tuple[int, int]]]:
    """Consecutive leaves grouped into runs of about ``batch_bytes`` (one read per run)."""
    batch: list[tuple[int, int]] = []
    size = 0
    for leaf in shape.iter_leaf_ranges():
        batch.append(leaf)
        size += leaf[1]
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def parallel_leaf_hashes(
    read: Callable[[int, int], bytes],
    *,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_done: Callable[[], None] | None = None,
    batch_bytes: int = _LEAF_BATCH_BYTES,
) -> LeafHashProvider:
    """A ``leaf_hashes`` provider that reads and hashes runs of leaves on two threads.

    ``read(offset, length)`` must be thread-safe (pread, image snapshots and transactions
    are). The callbacks report the "calc" phase: its size, the bytes hashed so far (in
    order, from the calling thread), and its end.
    """

    def work(batch: list[tuple[int, int]]) -> tuple[int, list[bytes]]:
        start = batch[0][0]
        end = batch[-1][0] + batch[-1][1]
        data = read(start, end - start)
        if len(data) != end - start:
            raise LocalError(
                f"short read while hashing: expected {end - start} bytes at offset {start}, "
                f"got {len(data)}"
            )
        view = memoryview(data)
        return end, [leaf_hash(view[off - start : off - start + n]) for off, n in batch]

    def provider(shape: TreeShape) -> Sequence[bytes]:
        if on_start:
            on_start(shape.size)
        out: list[bytes] = []
        for end, digests in ordered_map(work, _leaf_batches(shape, batch_bytes)):
            out.extend(digests)
            if on_progress:
                on_progress(end)
        if on_done:
            on_done()
        return out

    return provider


# ---------------------------------------------------------------------------------------------
# Target stores
# ---------------------------------------------------------------------------------------------


class ImageTargetStore:
    """``LegacyTargetStore`` over an image transaction: read-modify-write of whole chunks.

    ``final_size`` (set by the caller once the target machine exists) tells the store the
    source's size, so that the first write past the end grows the transaction once instead
    of once per tail block (each resize re-stores the boundary chunk).

    Everything from ``_zero_from`` on reads as zeros (it was grown and not written since), so
    a zero run there costs nothing: a peer's run of many terabytes is not a loop over chunks.
    """

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.chunk_size = tx.chunk_size
        self.final_size: Callable[[], int | None] = lambda: None
        self._pending: tuple[int, bytearray] | None = None  # chunk written in part
        self._zero_from = tx.size
        self.chunks_stored = 0

    @property
    def size(self) -> int:
        """The transaction's current logical size."""
        return self.tx.size

    def _chunk(self, index: int) -> bytes | bytearray:
        pending = self._pending
        if pending is not None and pending[0] == index:
            return pending[1]
        return self.tx.read_chunk(index)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the target as the transaction has them (thread-safe while not writing)."""

        return read_span(self._chunk, self.size, self.chunk_size, offset, length)

    def flush(self) -> None:
        """Store the chunk held in memory, if any."""
        if self._pending is not None:
            index, buf = self._pending
            self._pending = None
            self.tx.write_chunk(index, bytes(buf))
            self.chunks_stored += 1

    def _grow(self, end: int) -> None:
        if end > self.size:
            self.flush()
            self.tx.resize(max(end, self.final_size() or 0))

    def _patch(self, offset: int, data: memoryview | None, length: int) -> None:
        """Put ``data`` (or zeros when None) at ``offset``, chunk by chunk."""

        cs = self.chunk_size
        end = offset + length
        shape = self.tx.shape
        for c in range(offset // cs, (end - 1) // cs + 1):
            base = c * cs
            clen = shape.chunk_length(c)
            lo, hi = max(offset, base) - base, min(end, base + clen) - base
            piece = None if data is None else data[base + lo - offset : base + hi - offset]
            if lo == 0 and hi == clen:
                if self._pending is not None and self._pending[0] == c:
                    self._pending = None
                self.tx.write_chunk(c, zeros(clen) if piece is None else piece)
                self.chunks_stored += 1
                continue
            if self._pending is None or self._pending[0] != c:
                self.flush()
                self._pending = (c, bytearray(self.tx.read_chunk(c)))
            buf = self._pending[1]
            buf[lo:hi] = zeros(hi - lo) if piece is None else piece

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` (growing the transaction when past its end)."""
        if data:
            self._grow(offset + len(data))
            self._patch(offset, memoryview(data), len(data))
            self._zero_from = max(self._zero_from, offset + len(data))

    def write_zeros(self, offset: int, length: int) -> None:
        """Make a range read as zeros; whole chunks become zero entries (no data stored)."""
        if length > 0:
            self._grow(offset + length)
            length = min(offset + length, self._zero_from) - offset
            if length > 0:
                self._patch(offset, None, length)

    def truncate(self, size: int) -> None:
        """Shrink or grow the transaction."""
        self.flush()
        self.tx.resize(size)
        self._zero_from = min(self._zero_from, size)


class RawTargetStore:
    """``LegacyTargetStore`` over a raw file or block device, updated in place (as Go does).

    Zero ranges of a regular file are punched as holes where the filesystem can; a device is
    never resized (a source larger than the device is refused before anything is written).
    """

    def __init__(self, path: str, fd: int, *, is_file: bool) -> None:
        self.path = path
        self.fd = fd
        self.is_file = is_file
        self._size = os.lseek(fd, 0, os.SEEK_END)

    @property
    def size(self) -> int:
        """Current size of the file or device."""
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset`` (pread: thread-safe)."""
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise from_oserror(e, f"reading {self.path}") from None

    def _check_room(self, end: int) -> None:
        if not self.is_file and end > self._size:
            raise UsageError(
                f"{self.path} is a {self._size}-byte device; the source needs {end} bytes"
            )

    def write(self, offset: int, data: bytes) -> None:
        """pwrite all of ``data``."""

        self._check_room(offset + len(data))
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as e:
            raise from_oserror(e, f"writing {self.path}") from None
        self._size = max(self._size, offset + len(data))

    def write_zeros(self, offset: int, length: int) -> None:
        """Punch (file) or write (device) zeros; space past the end of a file is a hole."""

        end = offset + length
        self._check_room(end)
        try:
            if self.is_file and end > self._size:
                inside = max(self._size - offset, 0)
                os.ftruncate(self.fd, end)  # the grown part reads as zeros
                self._size = end
                length = inside
                if not length:
                    return
            if self.is_file and punch_hole(self.fd, offset, length):
                head = min(-offset % 4096, length)
                tail = (offset + length) % 4096 if length > head else 0
                if head:
                    pwrite_all(self.fd, zeros(head), offset)
                if tail:
                    pwrite_all(self.fd, zeros(tail), offset + length - tail)
                return
            pos = offset
            while pos < offset + length:
                n = min(TAIL_BLOCK_SIZE * 8, offset + length - pos)
                pwrite_all(self.fd, zeros(n), pos)
                pos += n
        except OSError as e:
            raise from_oserror(e, f"writing {self.path}") from None

    def truncate(self, size: int) -> None:
        """Cut or extend a file; a device keeps its size (bytes past the source stay)."""
        self._check_room(size)
        if self.is_file:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                raise from_oserror(e, f"resizing {self.path}") from None
            self._size = size

    def flush(self) -> None:
        """Nothing is held in memory."""


# ---------------------------------------------------------------------------------------------
# Opening a target: image, conversion, new image, raw
# ---------------------------------------------------------------------------------------------


class _Store(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def write_zeros(self, offset: int, length: int) -> None: ...

    def truncate(self, size: int) -> None: ...

    def flush(self) -> None: ...


@dataclass
class LegacyTargetEnd:
    """An opened target: the store to sync into and how to make the result durable or drop it.

    ``kind`` is "image", "new", "converted" or "raw". For "new" and "converted" the image is
    built in ``temp`` and put at ``path`` by :meth:`commit`; ``replaces`` is the SPGZ0001
    file a "converted" image replaces, as it was when the sync began.
    """

    path: str
    kind: Literal["image", "new", "converted", "raw"]
    store: _Store
    keep: int = 2
    temp: str | None = None
    replaces: os.stat_result | None = None
    image: Image | None = None
    tx: Transaction | None = None
    fd: int = -1
    created: bool = False  # a raw file this sync created: its name needs a directory fsync
    log: Callable[[str], None] = field(default=lambda _m: None)
    generation: GenerationInfo | None = None
    _finished: bool = False

    def commit(self, source: str, meta: dict[str, Any] | None = None) -> GenerationInfo | None:
        """Make the synced content durable: commit the transaction (and move the temporary
        image over PATH), or fsync the raw file. Returns the new generation (None for raw)."""
        self.store.flush()
        self._finished = True
        try:
            if self.tx is not None:
                self.generation = self.tx.commit(source=source, meta=meta or {}, keep=self.keep)
                self.tx = None
                if self.temp is not None:
                    _put_in_place(self.temp, self.path, self.replaces)
                    if self.kind == "converted":
                        self.log(f"{self.path}: the SPGZ0001 file was replaced by the converted "
                                 f"diskrsync image (generation 1: the old content, generation "
                                 f"{self.generation.number}: this backup)")
                    self.temp = None
            elif self.fd >= 0:
                try:
                    os.fsync(self.fd)
                    if self.created:
                        fsync_dir(self.path)
                except OSError as e:
                    raise from_oserror(e, f"flushing {self.path}") from None
        finally:
            self.close()
        return self.generation

    def close(self) -> None:
        """Drop anything not committed: abort the transaction, remove the temporary image."""
        if self.tx is not None:
            self.tx.abort()
            self.tx = None
        if self.image is not None:
            self.image.close()
            self.image = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)
            self.temp = None


def _put_in_place(temp: str, path: str, replaces: os.stat_result | None) -> None:
    """Move the committed image ``temp`` to ``path``, never over anything that changed there
    since the sync began (a native push may have committed an image there meanwhile): a new
    image is linked (EEXIST if PATH appeared), a converted one replaces PATH only while PATH
    is still the SPGZ0001 file it was converted from (a native push never writes into one,
    so only a rename over PATH in the instant between the check and ours could slip by)."""
    changed = BusyError(f"{path} changed while this sync ran (another push wrote it); it is "
                        f"kept as it is and this sync's result is dropped")
    try:
        if replaces is None:
            try:
                os.link(temp, path)
            except FileExistsError:
                raise changed from None
            os.unlink(temp)
        else:
            now = stat_or_none(path, "cannot open")
            if now is None or ((now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns)
                               != (replaces.st_dev, replaces.st_ino, replaces.st_size,
                                   replaces.st_mtime_ns)):
                raise changed
            os.replace(temp, path)
        fsync_dir(path)  # the sync is reported done only once the new name is durable
    except OSError as e:
        raise from_oserror(e, f"moving {temp} to {path}") from None


def _open_image_end(
    path: str, kind: Literal["image", "new", "converted"], image_path: str, keep: int,
    log: Callable[[str], None], temp: str | None,
) -> LegacyTargetEnd:

    img = Image.open(image_path)
    try:
        tx = img.begin(what="sync from a Go diskrsync")
    except BaseException:
        img.close()
        raise
    end = LegacyTargetEnd(path, kind, ImageTargetStore(tx), keep=keep, temp=temp, image=img,
                          tx=tx, log=log)
    return end


def open_legacy_target(
    path: str,
    *,
    raw: bool,
    keep: int = 2,
    log: Callable[[str], None] = lambda _m: None,
    chunk_size: int | None = None,
) -> LegacyTargetEnd:
    """Open PATH as the target of a BSNC0002 sync.

    * a diskrsync image: a new generation, written in a transaction;
    * an ``SPGZ0001`` file: converted into a temporary image beside it (its content becomes
      generation 1), synced into, and moved over PATH at the commit if PATH is unchanged;
    * nothing: a new image, built beside PATH and linked there at the commit (never over
      an image that appeared meanwhile);
    * an empty file: made an image in place (keeping its inode, owner and mode);
    * a block device, ``raw`` (``--no-compress``), or a non-empty file that is neither an
      image nor SPGZ0001 (the Go tool updates such a file raw, and so do we, saying so):
      updated in place.

    Anything else (a character device, a FIFO, a socket) is refused and left untouched.
    """

    chunk_size = chunk_size or DEFAULT_CHUNK
    st = stat_or_none(path, "cannot open")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory: give the target file's path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"target directory {folder} does not exist")
    is_block = st is not None and stat.S_ISBLK(st.st_mode)
    kind = sniff(path) if st is not None and stat.S_ISREG(st.st_mode) and st.st_size else None
    if raw and kind == "image":
        raise UsageError(f"{path} is a diskrsync image; drop --no-compress to update it")
    if raw and kind == "spgz":
        raise UsageError(f"{path} is an SPGZ0001 file; drop --no-compress to update it (it "
                         f"is then converted into a diskrsync image)")
    check_push_target(path, st)
    if raw or is_block or (st is not None and st.st_size and kind is None):
        if not raw and not is_block:
            log(f"{path} is neither a diskrsync image nor an SPGZ0001 file: updating it in "
                f"place as a raw file (as the Go diskrsync does)")
        return _open_raw_end(path, is_file=not is_block)
    remove_stale_temps(path, log)

    if kind == "image":
        return _open_image_end(path, "image", path, keep, log, None)
    if st is not None and not st.st_size:
        Image.create(path, chunk_size=chunk_size, in_place=True).close()
        return _open_image_end(path, "image", path, keep, log, None)
    if kind == "spgz":
        temp = temp_name(path, "convert")
        log(f"{path} is a Go SPGZ0001 file: converting it into a diskrsync image "
            f"({os.path.basename(temp)}), which replaces it when this sync completes")
        try:
            _convert_file(path, temp, chunk_size=chunk_size)
            end = _open_image_end(path, "converted", temp, keep, log, temp)
            end.replaces = st
            return end
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    temp = temp_name(path, "new")
    try:
        Image.create(temp, chunk_size=chunk_size).close()
        return _open_image_end(path, "new", temp, keep, log, temp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _open_raw_end(path: str, *, is_file: bool) -> LegacyTargetEnd:
    fd, _st, created = open_dest(path)
    try:

        if not take_writer_lock(fd):
            raise BusyError(f"{path} is being written by another push")
        store = RawTargetStore(path, fd, is_file=is_file)
    except BaseException:
        os.close(fd)
        raise
    return LegacyTargetEnd(path, "raw", store, fd=fd, created=created)


# ---------------------------------------------------------------------------------------------
# Conversion of SPGZ0001 files
# ---------------------------------------------------------------------------------------------


def convert_snapshot(
    snap: Any,
    path: str,
    *,
    chunk_size: int,
    source: str = CONVERT_SOURCE,
    meta: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> GenerationInfo:
    """Write ``snap``'s content (anything with ``size`` and thread-safe ``read``) into a new
    image at ``path`` as its first generation; ``path`` must not exist. The caller removes
    ``path`` if this fails."""

    return write_new_image(snap.read, snap.size, path, chunk_size=chunk_size, source=source,
                           meta=meta, progress=progress)


def _convert_file(old: str, new: str, *, chunk_size: int,
                  progress: Callable[[int], None] | None = None) -> GenerationInfo:
    """Convert the SPGZ0001 file ``old`` into a new image ``new`` (which must not exist)."""

    spgz = SpgzImage.open(old)
    try:
        snap = spgz.snapshot()
        try:
            meta = {"converted_from": os.path.abspath(old), "format": "SPGZ0001",
                    "spgz_block_size": snap.chunk_size}
            return convert_snapshot(snap, new, chunk_size=chunk_size, meta=meta,
                                    progress=progress)
        finally:
            snap.close()
    finally:
        spgz.close()


def convert(old: str, new: str, *, chunk_size: int) -> int:
    """``diskrsync convert OLD NEW``: an SPGZ0001 file into a new diskrsync image.

    NEW is written under a temporary name and linked into place only when complete, so an
    interrupted conversion leaves no half image, and an existing NEW is never replaced.
    """

    if os.path.isdir(old):
        raise UsageError(f"{old} is a directory, not an SPGZ0001 file")
    kind = sniff(old)
    if kind == "image":
        raise UsageError(f"{old} is already a diskrsync image: nothing to convert")
    if kind != "spgz":
        raise UsageError(f"{old} is not an SPGZ0001 file (no SPGZ0001 magic)")
    if os.path.lexists(new):
        raise UsageError(f"{new} already exists; refusing to overwrite it")
    folder = os.path.dirname(os.path.abspath(new))
    if not os.path.isdir(folder):
        raise UsageError(f"directory {folder} does not exist")
    remove_stale_temps(new, lambda m: print(f"diskrsync: {m}", file=sys.stderr))
    temp = temp_name(new, "convert")
    size = os.path.getsize(old)
    bar = Progress(size, "convert")
    try:
        gen = _convert_file(old, temp, chunk_size=chunk_size, progress=bar.update)
        try:
            os.link(temp, new)  # fails if NEW appeared meanwhile: never clobbered
            fsync_dir(new)
        except FileExistsError:
            raise UsageError(f"{new} already exists; refusing to overwrite it") from None
        except OSError as e:
            raise from_oserror(e, f"creating {new}") from None
    finally:
        bar.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
    print(f"converted {old} into {new}: generation {gen.number}, {human(gen.size)}")
    return 0


# ---------------------------------------------------------------------------------------------
# Progress lines (the remote end) and their parser (the client end)
# ---------------------------------------------------------------------------------------------


class GoProgressLines:
    """The stderr lines a Go client parses with ``--calc-progress`` / ``--sync-progress``.

    The Go client reads "[Start calc]", "Size: N", then "Update: P" lines until P reaches N;
    then, with ``--sync-progress``, the same for "sync". Each phase ends with
    ``Update: <size>``, and sync lines are written only when asked for (the Go client would
    echo them otherwise). As the Go tool, nothing is written for a calc phase with nothing to
    hash (a new or empty target): a Go client with ``--verbose`` that reads "Size: 0" for
    calc draws a bar of total 0 that never completes, and waits for it forever.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        calc: bool,
        sync: bool,
        sync_total: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._calc = ProgressLineWriter("calc") if calc else None
        self._sync = ProgressLineWriter("sync") if sync else None
        self._sync_total = sync_total
        self._clock = clock
        self.sync_started = False
        self._sync_size = 0

    def calc_start(self, size: int) -> None:
        """The calc phase starts hashing ``size`` bytes."""
        if self._calc:
            self._write(self._calc.start(size, self._clock()))

    def calc_update(self, position: int) -> None:
        """``position`` bytes hashed."""
        if self._calc:
            self._write(self._calc.update(position, self._clock()))

    def calc_done(self) -> None:
        """Hashing is over (or there was nothing to hash): the sync phase starts."""
        if not self.sync_started:
            self.sync_started = True
            self._sync_size = self._sync_total()
            if self._sync:
                self._write(self._sync.start(self._sync_size, self._clock()))

    def sync_update(self, position: int) -> None:
        """``position`` bytes of the result settled."""
        if not self.sync_started:
            self.calc_done()
        if self._sync:
            self._write(self._sync.update(min(position, self._sync_size), self._clock()))

    def events(self, machine: LegacySource | LegacyTarget, events: list[Any]) -> None:
        """Turn a machine's events into lines."""
        for ev in events:
            if isinstance(ev, HeaderExchanged):
                if ev.shape is None:
                    self.calc_done()
            elif isinstance(ev, (RangeSynced, SyncFinished)):
                self.sync_update(machine.position)


@dataclass
class ProgressLineParser:
    """Client side: sorts a Go remote's stderr lines into progress and everything else.

    ``feed(line)`` returns ("start", phase, size), ("update", phase, position) or
    ("text", line, 0) — the last to be shown to the user.
    """

    phase: str = ""

    def feed(self, line: str) -> tuple[str, str, int]:
        """Classify one line (without its newline)."""
        if line.startswith("[Start ") and line.endswith("]"):
            self.phase = line[len("[Start ") : -1]
            return ("start", self.phase, -1)
        for prefix, kind in (("Size: ", "start"), ("Update: ", "update")):
            if line.startswith(prefix) and line[len(prefix) :].isdigit():
                return (kind, self.phase, int(line[len(prefix) :]))
        return ("text", line, 0)


# ---------------------------------------------------------------------------------------------
# Pumping bytes
# ---------------------------------------------------------------------------------------------


def run_machine(
    machine: LegacySource | LegacyTarget,
    *,
    recv: Callable[[int], bytes],
    send: Callable[[bytes], None],
    on_events: Callable[[list[Any]], None] | None = None,
) -> tuple[int, int]:
    """Drive ``machine`` over a byte pipe until it is done; returns (bytes sent, received).

    One thread is enough: BSNC0002 is lock-step, and the only long one-way stream (the
    source's tail) is produced on demand by ``data_to_send``. The caller closes its send side
    afterwards (a Go target finds the end of the tail by EOF).
    """
    sent = received = 0
    while True:
        out = machine.data_to_send()
        if on_events is not None:
            on_events(machine.next_events())
        if out:
            send(out)
            sent += len(out)
            continue
        if machine.done:
            return sent, received
        data = recv(_RECV_SIZE)
        received += len(data)
        machine.receive_data(data)


def _fd_send(fd: int, what: str) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except (BrokenPipeError, ConnectionResetError):
                raise PeerError(f"{what} closed the connection") from None
            except OSError as e:
                raise from_oserror(e, f"writing to {what}") from None
            view = view[n:]

    return send


def _fd_recv(fd: int, what: str) -> Callable[[int], bytes]:
    def recv(n: int) -> bytes:
        try:
            return os.read(fd, n)
        except ConnectionResetError:
            return b""
        except OSError as e:
            raise from_oserror(e, f"reading from {what}") from None

    return recv


# ---------------------------------------------------------------------------------------------
# The remote end of a Go client
# ---------------------------------------------------------------------------------------------


class _Stopped(PeerError):
    """SIGTERM/SIGHUP: the connection is gone; unwind so nothing half done is kept."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stopped(f"stopped by signal {signal.Signals(signum).name}: nothing was committed")


def _stderr(text: str) -> None:
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def _log(message: str) -> None:
    _stderr(f"diskrsync: {message}\n")


def go_remote_main(argv: list[str]) -> int:
    """Act as the Go tool's remote end: ``[CMD] --target|--source [FLAGS] PATH``.

    stdin/stdout carry BSNC0002; stdout is moved aside first so that nothing else can be
    printed there. stderr carries log lines and, if asked, the progress lines the Go client
    parses.
    """
    req = parse_go_remote_args(argv)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stdout carries the protocol: nothing else may be printed there
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        if req.mode == "target":
            _serve_go_target(req.path, raw=req.no_compress, calc=req.calc_progress,
                             sync=req.sync_progress, verbose=req.verbose, out_fd=out_fd)
        else:
            _serve_go_source(req.path, calc=req.calc_progress, sync=req.sync_progress,
                             verbose=req.verbose, out_fd=out_fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(out_fd)
    return 0


def _serve_go_target(path: str, *, raw: bool, calc: bool, sync: bool, verbose: bool,
                     out_fd: int) -> None:
    end = open_legacy_target(path, raw=raw, log=_log)
    try:
        target_box: list[LegacyTarget] = []
        progress = GoProgressLines(_stderr, calc=calc, sync=sync,
                                   sync_total=lambda: target_box[0].peer_size or 0)
        target = LegacyTarget(
            end.store,
            leaf_hashes=parallel_leaf_hashes(end.store.read, on_start=progress.calc_start,
                                             on_progress=progress.calc_update,
                                             on_done=progress.calc_done),
        )
        target_box.append(target)
        if isinstance(end.store, ImageTargetStore):
            end.store.final_size = lambda: target.peer_size

        def on_events(events: list[Any]) -> None:
            if verbose:
                for ev in events:
                    if isinstance(ev, HeaderExchanged):
                        _log(f"local size: {ev.local_size}, remote size: {ev.peer_size}")
                        if ev.shape:
                            s = ev.shape
                            _log(f"levels: {s.levels}, order: {s.order}, target block size: "
                                 f"{s.target_block_size}, block size: {s.leaf_size}")
            progress.events(target, events)

        run_machine(target, recv=_fd_recv(0, "the Go client"),
                    send=_fd_send(out_fd, "the Go client"), on_events=on_events)
        gen = end.commit(GO_CLIENT_SOURCE, {"protocol": "BSNC0002"})
        if verbose:
            what = f"generation {gen.number}" if gen else "raw file updated"
            _log(f"{path}: {what}, {target.peer_size} bytes")
    finally:
        end.close()


def _serve_go_source(path: str, *, calc: bool, sync: bool, verbose: bool, out_fd: int) -> None:

    reader = open_source(path)
    try:
        progress = GoProgressLines(_stderr, calc=calc, sync=sync, sync_total=lambda: reader.size)
        source = LegacySource(
            reader,
            leaf_hashes=parallel_leaf_hashes(reader.read, on_start=progress.calc_start,
                                             on_progress=progress.calc_update,
                                             on_done=progress.calc_done),
        )
        if verbose:
            _log(f"serving {reader.description} ({reader.size} bytes) as a Go diskrsync source")
        run_machine(source, recv=_fd_recv(0, "the Go client"),
                    send=_fd_send(out_fd, "the Go client"),
                    on_events=lambda evs: progress.events(source, evs))
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# push --legacy: this machine is the client, the remote runs the Go tool
# ---------------------------------------------------------------------------------------------


def _ssh_options(args: argparse.Namespace) -> tuple[SshOptions, list[str]]:
    """The same SSH settings as a plain push (``--remote-cmd`` may be several words, e.g.
    ``sudo -n diskrsync``: the rest lead the remote argv)."""


    # paramiko logs socket errors it also raises: keep them out of our one-line errors
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    return ssh_options(args)


def _want_remote_progress(args: argparse.Namespace) -> bool:
    """Ask the remote for progress lines only when a bar is shown: very old Go releases do
    not know ``--calc-progress``."""
    return not getattr(args, "quiet", False) and not getattr(args, "json", False) \
        and sys.stderr.isatty()


class _Tally:
    """PushStats from a machine's events (the summary and ``--json`` of ``push --legacy``).

    A "chunk" here is a Go tree leaf, or a tail block / zero run past the common part.
    ``reads_ranges``: the source re-reads the leaves it sends and reads its tail; the
    target only reads to hash.
    """

    def __init__(self, stats: PushStats, *, reads_ranges: bool) -> None:
        self.stats = stats
        self.reads_ranges = reads_ranges
        self.tail_start = 0

    def events(self, events: list[Any]) -> None:
        """Account for one batch of events."""
        st = self.stats
        for ev in events:
            if isinstance(ev, HeaderExchanged):
                shape = ev.shape
                self.tail_start = min(ev.local_size, ev.peer_size)
                st.chunk_size = shape.leaf_size if shape is not None else TAIL_BLOCK_SIZE
                if shape is not None:
                    st.chunks += shape.leaf_count
                    st.bytes_hashed += shape.size
                    st.bytes_read += shape.size
            elif isinstance(ev, RangeSynced):
                tail = ev.offset >= self.tail_start and ev.kind != "equal"
                if tail:
                    st.chunks += 1
                if ev.kind == "equal":
                    continue
                st.chunks_differing += 1
                st.chunk_bytes_differing += ev.length
                if ev.kind == "hole":
                    st.zero_chunks += 1
                if self.reads_ranges:
                    st.bytes_read += ev.length


class _Relay:
    """Shows a Go remote's stderr as ``host: line``, minus the progress lines; remembers the
    last line so a failure can be explained in one line."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.parser = ProgressLineParser()
        self.last = ""

    def __call__(self, line: str) -> None:
        kind, text, _n = self.parser.feed(line)
        if kind == "text" and text.strip():
            self.last = text.strip()
            sys.stderr.write(f"{self.host}: {text}\n")
            sys.stderr.flush()


def _converse(
    conn: Any, argv: list[str], machine: LegacySource | LegacyTarget, what: str,
    on_events: Callable[[list[Any]], None],
) -> tuple[int, int]:
    """Run ``argv`` remotely and drive ``machine`` against it to the end; then check that
    the remote sent nothing more and exited 0. Returns (bytes sent, bytes received)."""

    relay = _Relay(conn.host)
    proc = conn.run(argv, on_stderr=relay)
    with proc:
        try:
            sent, received = run_machine(machine, recv=proc.recv, send=proc.send,
                                         on_events=on_events)
            proc.close_send()  # a Go target finds the end of the tail by EOF
            extra = proc.recv(65536)
            if extra:
                raise PeerError(f"{what} on {conn.host} sent {len(extra)} bytes after the end "
                                f"of the sync")
            status = proc.wait(120)
        except PeerError as e:
            # the remote may have stopped on purpose: its exit status and last words say more
            status = -1
            with contextlib.suppress(DiskrsyncError):
                proc.close_send()
                status = proc.wait(5)
            if status <= 0:
                raise
            why = f": {relay.last}" if relay.last else ""
            raise RemoteCommandError(
                f"{what} on {conn.host} failed (exit status {status}){why}"
            ) from e
        if status != 0:
            why = f": {relay.last}" if relay.last else ""
            raise RemoteCommandError(f"{what} on {conn.host} failed (exit status {status}){why}")
    return sent, received


def legacy_push(src_loc: Location, dst_loc: Location, req: PushRequest,
                args: argparse.Namespace) -> PushStats:
    """``push --legacy``: one end is a host running the original Go diskrsync.

    Push (``SRC host:PATH``) runs ``CMD --target [--no-compress] PATH`` there and speaks
    BSNC0002 as the source; pull (``host:PATH DST``) runs ``CMD --source PATH`` and writes a
    local image (crash-safe, a new generation) or, with ``--no-compress``, a raw file.
    """

    if req.target.dry_run or req.source.dry_run:
        raise UsageError("--dry-run is not possible with --legacy: the Go protocol cannot "
                         "compare without writing")
    if req.source.ignore_read_errors:
        raise UsageError("--ignore-read-errors is not possible with --legacy")
    if isinstance(src_loc, RemotePath) and isinstance(dst_loc, RemotePath):
        raise UsageError("--legacy: one end must be on this machine")
    if isinstance(src_loc, LocalPath) and isinstance(dst_loc, LocalPath):
        raise UsageError("--legacy needs a remote end ([user@]host:path) running the Go "
                         "diskrsync; between local paths use plain push")
    opts, extra = _ssh_options(args)
    if isinstance(dst_loc, RemotePath):
        assert isinstance(src_loc, LocalPath)
        return _push_to_go(src_loc.path, dst_loc, req, args, opts, extra)
    assert isinstance(src_loc, RemotePath) and isinstance(dst_loc, LocalPath)
    return _pull_from_go(src_loc, dst_loc.path, req, args, opts, extra)


def _push_to_go(src: str, dst: RemotePath, req: PushRequest, args: argparse.Namespace,
                opts: SshOptions, extra: list[str]) -> PushStats:

    started = time.monotonic()
    reader = open_source(src, req.generation)
    try:
        stats = PushStats(size=reader.size)
        tally = _Tally(stats, reads_ranges=True)
        argv = [*extra, "--target"]
        if req.raw_target:
            argv.append("--no-compress")  # we quote word by word: no leading space (cf. Go)
        progress = _want_remote_progress(args)
        if progress:
            argv += ["--calc-progress", "--sync-progress"]
        argv.append(dst.path)
        source = LegacySource(reader, leaf_hashes=parallel_leaf_hashes(reader.read))
        bar = Progress(reader.size, "push", progress)
        done = [0]

        def on_events(events: list[Any]) -> None:
            tally.events(events)
            bar.update(source.position - done[0])
            done[0] = source.position

        try:
            with connect(dst, opts) as conn:
                sent, received = _converse(conn, argv, source, opts.remote_cmd, on_events)
        finally:
            bar.close()
    finally:
        reader.close()
    stats.bytes_sent, stats.bytes_received = sent, received
    stats.duration = time.monotonic() - started
    return stats


def _pull_from_go(src: RemotePath, dst: str, req: PushRequest, args: argparse.Namespace,
                  opts: SshOptions, extra: list[str]) -> PushStats:

    started = time.monotonic()
    if os.path.isdir(dst):
        name = os.path.basename(src.path.rstrip("/")) or "disk"
        dst = os.path.join(dst, name if req.raw_target else name + ".spgz")
    stats = PushStats()
    tally = _Tally(stats, reads_ranges=False)
    progress = _want_remote_progress(args)
    argv = [*extra, "--source", *(["--calc-progress"] if progress else []), src.path]

    def log(message: str) -> None:
        print(f"diskrsync: {message}", file=sys.stderr)

    end = open_legacy_target(dst, raw=req.raw_target, keep=req.target.keep, log=log,
                             chunk_size=req.source.chunk_size)
    bars = [Progress(0, "pull", False)]
    try:
        target = LegacyTarget(end.store, leaf_hashes=parallel_leaf_hashes(end.store.read),
                              max_size=req.target.max_size)
        if isinstance(end.store, ImageTargetStore):
            end.store.final_size = lambda: target.peer_size
        done = [0]

        def on_events(events: list[Any]) -> None:
            tally.events(events)
            for ev in events:
                if isinstance(ev, HeaderExchanged):
                    stats.size = ev.peer_size
                    bars[0] = Progress(ev.peer_size, "pull", progress)
            bars[0].update(target.position - done[0])
            done[0] = target.position

        with connect(src, opts) as conn:
            sent, received = _converse(conn, argv, target, opts.remote_cmd, on_events)
        # only a complete exchange with a remote that exited 0 becomes a generation
        gen = end.commit(f"Go diskrsync on {src}", {"protocol": "BSNC0002"})
    finally:
        bars[0].close()
        end.close()
    stats.bytes_sent, stats.bytes_received = sent, received
    stats.generation = gen.number if gen else None
    stats.root_hash = gen.root_hash.hex() if gen else ""
    stats.duration = time.monotonic() - started
    return stats
