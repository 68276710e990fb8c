"""The Go protocol's target semantics over the image and raw stores.

The Go protocol (``synccore/legacy.py``, a pure machine) writes its target as a file: byte
ranges, zero runs and a final size, read back to hash. This adapter gives it that over the
same targets as the native protocol, opened by the same rules (``compression.targets``'s
:func:`plan_target` with :data:`GO_RULES`):

* :class:`ImageTargetStore` writes into an image *transaction*: nothing is visible until the
  commit, so a Go client that dies mid-way leaves the previous generation untouched (the Go
  tool itself writes in place). The Go tree's leaves (~128 KiB, split by integer division) do
  not line up with image chunks, so writes are read-modify-write of whole chunks, with the
  last partly written chunk kept in memory until a write moves past it: leaves and tail
  blocks arrive in ascending order, so each chunk is compressed once.
* :class:`RawTargetStore` is ``--no-compress``: a raw file or block device updated in place,
  as the Go tool does it.
* A new image, or an existing ``SPGZ0001`` file that is converted, is built in a temporary
  file beside PATH and put in place only after the commit: a new image with ``link`` (which
  fails if PATH appeared meanwhile, e.g. a native push created an image there: that image is
  kept and this sync fails), a converted one with ``os.replace`` once PATH is checked to be
  still the very file that was converted. On any failure the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from diskrsync.base.errors import BusyError, UsageError, from_oserror, stat_or_none
from diskrsync.base.retention import Retention
from diskrsync.compression.api import GenerationInfo, read_span
from diskrsync.compression.codec import zeros
from diskrsync.compression.convert import convert_file
from diskrsync.compression.format import DEFAULT_CHUNK
from diskrsync.compression.image import (
    Image,
    Transaction,
    fsync_dir,
    punch_hole,
    pwrite_all,
    remove_stale_temps,
    temp_name,
)
from diskrsync.compression.targets import GO_RULES, open_raw, plan_target

__all__ = ["ImageTargetStore", "LegacyTargetEnd", "RawTargetStore", "open_legacy_target"]

_ZERO_WRITE = 1 << 20  # bytes of zeros per pwrite where no hole can be punched


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
                n = min(_ZERO_WRITE, offset + length - pos)
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


class GoStore(Protocol):
    """What the Go protocol machine writes through (``synccore.legacy.LegacyTargetStore``)
    plus ``flush``."""

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
    store: GoStore
    keep: int | Retention = 2
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
    path: str, kind: Literal["image", "new", "converted"], image_path: str, keep: int | Retention,
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
    keep: int | Retention = 2,
    log: Callable[[str], None] = lambda _m: None,
    chunk_size: int | None = None,
    name: str | None = None,
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

    Anything else (a character device, a FIFO, a socket) is refused and left untouched. The
    rules are ``compression.targets.plan_target``'s with :data:`GO_RULES`; a directory is
    ``DIR/<name>.spgz`` (``DIR/<name>`` when ``raw``), and refused when ``name`` is None (a Go
    client does not say its source's name).
    """

    chunk_size = chunk_size or DEFAULT_CHUNK
    plan = plan_target(path, raw=raw, rules=GO_RULES, name=name)
    path, st = plan.path, plan.st
    if plan.kind in ("raw", "foreign"):
        if plan.kind == "foreign":
            log(f"{path} is neither a diskrsync image nor an SPGZ0001 file: updating it in "
                f"place as a raw file (as the Go diskrsync does)")
        return _open_raw_end(path)
    remove_stale_temps(path, log)

    if plan.kind == "image":
        return _open_image_end(path, "image", path, keep, log, None)
    if plan.kind == "empty":
        Image.create(path, chunk_size=chunk_size, in_place=True).close()
        return _open_image_end(path, "image", path, keep, log, None)
    if plan.kind == "spgz":
        temp = temp_name(path, "convert")
        log(f"{path} is a Go SPGZ0001 file: converting it into a diskrsync image "
            f"({os.path.basename(temp)}), which replaces it when this sync completes")
        try:
            convert_file(path, temp, chunk_size=chunk_size)
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


def _open_raw_end(path: str) -> LegacyTargetEnd:
    fd, is_file, created = open_raw(path)
    try:
        store = RawTargetStore(path, fd, is_file=is_file)
    except BaseException:
        os.close(fd)
        raise
    return LegacyTargetEnd(path, "raw", store, fd=fd, created=created)
