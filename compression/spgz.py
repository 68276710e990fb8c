"""Read-only access to ``SPGZ0001`` files written by the original Go diskrsync / spgz tools.

Existing backups made by the Go tools must stay restorable and mountable, so this module exposes
them through the same ``DiskImage`` / ``DiskSnapshot`` protocols as our own images.

Layout (as the Go library reads it): an 8-byte magic, a uint32 LE ``(blockSize+1)/4096``, padding
to 4096. Block ``n`` lives in the slot of ``blockSize+1`` bytes at ``4096 + n*(blockSize+1)``; its
first byte is 0 (raw data follows) or 1 (one gzip member follows, trailing bytes are ignored). A
slot inside a punched hole reads as zeros, i.e. a raw block of zeros. A full-length slot whose
gzip member inflates to fewer than ``blockSize`` bytes is zero-padded. The file stores no size:
the last, partial slot decides it (raw: its length minus the flag byte; gzip: the inflated length),
and a file ending exactly on a slot boundary holds only full blocks.

Reads use ``os.pread`` and a fresh decompressor per call, so snapshots are safe to share between
threads. Nothing here ever writes to the file.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from types import TracebackType
from typing import Final, TypeVar

from diskrsync.base.errors import CorruptChunkError, DataError, LocalError, UsageError
from diskrsync.compression.api import GenerationInfo

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_BLOCK_SIZE_FIELD",
    "SpgzImage",
    "SpgzLayout",
    "SpgzSnapshot",
    "is_spgz",
]

_T = TypeVar("_T", bound="_OwnsFd")

MAGIC: Final = b"SPGZ0001"
HEADER_SIZE: Final = 4096  # blocks start here; bytes 12..4095 are ignored padding
_HEADER_FIELDS: Final = len(MAGIC) + 4
_FLAG_RAW: Final = 0
_FLAG_GZIP: Final = 1
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS  # gzip wrapper only, header and CRC32/ISIZE checked
# The Go writer never goes below 3 (12 KiB slots) but its reader accepts any value; above
# 64 MiB slots a single block would be an unreasonable amount of memory, so treat it as damage.
MAX_BLOCK_SIZE_FIELD: Final = 16384
_SOURCE: Final = "SPGZ0001 file"
_ZERO_SCAN: Final = 1 << 20  # bytes compared per step when checking a data extent for zeros


class _BadBlock(Exception):
    """Internal: one block cannot be served; ``str()`` is the detail for CorruptChunkError."""


@dataclass(frozen=True)
class SpgzLayout:
    """The geometry of one SPGZ file at one moment, so a snapshot never changes under a reader."""

    path: str
    block_size: int  # logical bytes per block (slot size minus the flag byte)
    file_length: int  # bytes in the container file when the layout was taken
    size: int  # logical bytes
    mtime: float

    @property
    def slot_size(self) -> int:
        return self.block_size + 1

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.block_size)

    def slot_offset(self, index: int) -> int:
        return HEADER_SIZE + index * self.slot_size

    def slot_length(self, index: int) -> int:
        """Bytes of slot ``index`` present in the file (the last slot may be partial)."""
        return max(0, min(self.slot_size, self.file_length - self.slot_offset(index)))

    def slot_is_full(self, index: int) -> bool:
        """Go pads a short gzip block with zeros only when its slot is not the file's last."""
        return self.slot_offset(index) + self.slot_size <= self.file_length

    def chunk_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)


def is_spgz(path_or_header: str | bytes) -> bool:
    """True when the header bytes (or the file at the path) start with the SPGZ0001 magic."""
    if isinstance(path_or_header, bytes):
        return path_or_header.startswith(MAGIC)
    try:
        st = os.stat(path_or_header)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return False  # never open a FIFO (it would block) or a directory
        with open(path_or_header, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (OSError, ValueError):
        return False


def _pread(fd: int, length: int, offset: int, path: str) -> bytes:
    """``os.pread`` that retries short reads and turns OS failures into LocalError."""
    parts: list[bytes] = []
    done = 0
    while done < length:
        try:
            part = os.pread(fd, length - done, offset + done)
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            raise LocalError(
                f"{path}: read error at file offset {offset + done}: {e.strerror or e}"
            ) from None
        if not part:
            break
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _inflate(payload: bytes, block_size: int) -> bytes:
    """Inflate the single gzip member at the start of ``payload``; raise _BadBlock on damage.

    Like the Go reader, bytes after the member (zero padding up to the slot end) are ignored.
    Output is capped just above the block size so a damaged stream cannot balloon memory.
    """
    d = zlib.decompressobj(_GZIP_WBITS)
    try:
        data = d.decompress(payload, block_size + 1)
    except zlib.error as e:
        raise _BadBlock(f"gzip data is damaged ({e})") from None
    if len(data) > block_size:
        raise _BadBlock(f"gzip data inflates to more than the block size {block_size}")
    if not d.eof:
        raise _BadBlock("gzip stream is truncated")
    return data


def _decode_slot(slot: bytes, block_size: int, full: bool) -> bytes:
    """The logical bytes of one slot: raw, inflated, or zero-padded; raise _BadBlock if bad."""
    if not slot:
        return b""
    flag = slot[0]
    if flag == _FLAG_RAW:
        return slot[1:]
    if flag != _FLAG_GZIP:
        raise _BadBlock(f"unknown block type byte 0x{flag:02x}")
    data = _inflate(slot[1:], block_size)
    if full and len(data) < block_size:
        data += bytes(block_size - len(data))
    return data


def _read_layout(fd: int, path: str) -> SpgzLayout:
    """Parse the header and work out the logical size; DataError if the file is not usable."""
    try:
        st = os.fstat(fd)
        length = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for block devices
    except OSError as e:
        raise LocalError(f"{path}: cannot stat: {e.strerror or e}") from None
    header = _pread(fd, _HEADER_FIELDS, 0, path)
    if not header:
        raise DataError(f"{path}: not an SPGZ0001 file (empty file)")
    if header[: len(MAGIC)] != MAGIC[: len(header)]:
        raise DataError(f"{path}: not an SPGZ0001 file (bad magic)")
    if len(header) < _HEADER_FIELDS:
        raise DataError(f"{path}: truncated SPGZ0001 header ({len(header)} of 12 bytes)")
    (field,) = struct.unpack_from("<I", header, len(MAGIC))
    if not 1 <= field <= MAX_BLOCK_SIZE_FIELD:
        raise DataError(f"{path}: unsupported SPGZ0001 block size field {field}")
    block_size = field * 4096 - 1
    slot_size = block_size + 1
    full_slots, rest = divmod(max(0, length - HEADER_SIZE), slot_size)
    size = full_slots * block_size
    if rest:
        tail_slot = _pread(fd, rest, HEADER_SIZE + full_slots * slot_size, path)
        if len(tail_slot) != rest:
            raise DataError(f"{path}: file shrank while it was being opened")
        try:
            size += len(_decode_slot(tail_slot, block_size, full=False))
        except _BadBlock as e:
            raise DataError(
                f"{path}: last block {full_slots} is damaged ({e}); the size cannot be known"
            ) from None
    return SpgzLayout(path, block_size, length, size, st.st_mtime)


def _open_fd(path: str) -> int:
    """Open read-only with a one-line UsageError/LocalError for the usual path mistakes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise LocalError(f"{path}: cannot stat: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: is a directory, not an SPGZ0001 file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{path}: not a regular file")
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise LocalError(f"{path}: cannot open: {e.strerror or e}") from None


def _generation(layout: SpgzLayout) -> GenerationInfo:
    return GenerationInfo(
        number=1,
        commit_time=layout.mtime,
        size=layout.size,
        root_hash=b"",
        source=_SOURCE,
        meta={"path": layout.path, "block_size": layout.block_size},
    )


class _OwnsFd:
    """Closes its file descriptor once; usable as a context manager."""

    _fd: int

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SpgzSnapshot(_OwnsFd):
    """The file's content as of ``open``/``refresh``; chunk ``i`` is spgz block ``i``.

    The file has no generations to pin, so a snapshot only pins the geometry; if another
    program rewrites the file meanwhile, reads fail or follow the new bytes (never garbage
    passed off as good: a slot that no longer matches the geometry raises).
    """

    def __init__(self, fd: int, layout: SpgzLayout) -> None:
        self._fd = fd  # owned: a dup of the image's descriptor, so either can close first
        self._layout = layout
        self._info = _generation(layout)

    @property
    def info(self) -> GenerationInfo:
        return self._info

    @property
    def layout(self) -> SpgzLayout:
        return self._layout

    @property
    def size(self) -> int:
        return self._layout.size

    @property
    def chunk_size(self) -> int:
        return self._layout.block_size

    @property
    def chunk_count(self) -> int:
        return self._layout.chunk_count

    def _live_fd(self) -> int:
        if self._fd < 0:
            raise UsageError(f"{self._layout.path}: snapshot is closed")
        return self._fd

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.chunk_count:
            raise UsageError(
                f"{self._layout.path}: chunk {index} out of range (0..{self.chunk_count - 1})"
            )

    def _corrupt(self, index: int, detail: str) -> CorruptChunkError:
        where = self._layout.slot_offset(index)
        return CorruptChunkError(
            index,
            index * self._layout.block_size,
            f"{detail} ({self._layout.path}, slot at {where})",
        )

    def _decode_block(self, index: int) -> bytes:
        """Block ``index`` checked against the geometry; raise _BadBlock if it cannot be served."""
        lay = self._layout
        fd = self._live_fd()
        want_slot = lay.slot_length(index)
        slot = _pread(fd, want_slot, lay.slot_offset(index), lay.path)
        if len(slot) != want_slot:
            raise _BadBlock(f"slot is {len(slot)} bytes, expected {want_slot}: file shrank")
        data = _decode_slot(slot, lay.block_size, full=lay.slot_is_full(index))
        expected = lay.chunk_length(index)
        if len(data) != expected:
            raise _BadBlock(f"block holds {len(data)} bytes, expected {expected}: file changed")
        return data

    def read_chunk(self, index: int) -> bytes:
        """The block's bytes (the last one short); CorruptChunkError if it cannot be trusted."""
        self._check_index(index)
        try:
            return self._decode_block(index)
        except _BadBlock as e:
            raise self._corrupt(index, str(e)) from None

    def _read_part(self, index: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of a block; raw slots are read in place instead of whole."""
        lay = self._layout
        if start == 0 and end == lay.chunk_length(index):
            return self.read_chunk(index)
        base = lay.slot_offset(index)
        flag = _pread(self._live_fd(), 1, base, lay.path)
        if flag != bytes([_FLAG_RAW]):
            return self.read_chunk(index)[start:end]
        if lay.slot_length(index) != lay.chunk_length(index) + 1:
            return self.read_chunk(index)[start:end]  # kind changed since open: full checks
        data = _pread(self._live_fd(), end - start, base + 1 + start, lay.path)
        if len(data) != end - start:
            raise self._corrupt(index, "slot is shorter than expected: file shrank")
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the size, spanning blocks as needed."""
        if offset < 0 or length < 0:
            raise UsageError(f"{self._layout.path}: negative read offset or length")
        end = min(offset + length, self.size)
        bs = self._layout.block_size
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            index, start = divmod(pos, bs)
            stop = min(bs, end - index * bs)
            parts.append(self._read_part(index, start, stop))
            pos += stop - start
        return b"".join(parts)

    def chunk_is_zero(self, index: int) -> bool:
        """True when the block's slot is a hole or all zero bytes; gzip blocks are never inflated.

        Holes are skipped with SEEK_DATA/SEEK_HOLE, so a punched slot costs no data reads; data
        extents of a raw slot are compared with zeros (the Go tools punch zero blocks, but a
        copy without sparseness keeps them as written zeros).
        """
        self._check_index(index)
        lay = self._layout
        fd = self._live_fd()
        pos = lay.slot_offset(index)
        end = pos + lay.slot_length(index)
        if _pread(fd, 1, pos, lay.path) not in (b"", bytes([_FLAG_RAW])):
            return False
        while pos < end:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
                data_end = min(end, os.lseek(fd, data_start, os.SEEK_HOLE))
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return True  # only a hole up to the end of the file
                data_start, data_end = pos, end  # no hole support: read everything
            if data_start >= end:
                return True
            while data_start < data_end:
                step = min(_ZERO_SCAN, data_end - data_start)
                buf = _pread(fd, step, data_start, lay.path)
                if buf.count(0) != len(buf):
                    return False
                if len(buf) < step:
                    return True  # file shrank; what is left was zeros
                data_start += step
            pos = data_end
        return True

    def verify(self) -> list[tuple[int, int, str]]:
        """Every block that cannot be served, as (block index, logical offset, problem)."""
        problems: list[tuple[int, int, str]] = []
        bs = self._layout.block_size
        for index in range(self.chunk_count):
            try:
                self._decode_block(index)
            except _BadBlock as e:
                problems.append((index, index * bs, str(e)))
            except LocalError as e:
                problems.append((index, index * bs, e.message))
        return problems



class SpgzImage(_OwnsFd):
    """An ``SPGZ0001`` file seen as a ``DiskImage`` with exactly one generation (number 1)."""

    def __init__(self, fd: int, layout: SpgzLayout) -> None:
        self._fd = fd
        self._layout = layout

    @classmethod
    def open(cls, path: str) -> SpgzImage:
        """Open read-only; one-line DataError/UsageError/LocalError naming the path on failure."""
        fd = _open_fd(path)
        try:
            layout = _read_layout(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, layout)

    @property
    def path(self) -> str:
        return self._layout.path

    @property
    def block_size(self) -> int:
        return self._layout.block_size

    def _live_fd(self) -> int:
        if self._fd < 0:
            raise UsageError(f"{self._layout.path}: image is closed")
        return self._fd

    def generations(self) -> list[GenerationInfo]:
        self._live_fd()
        return [_generation(self._layout)]

    def refresh(self) -> None:
        """Re-read the length and mtime: the Go tools rewrite SPGZ files in place."""
        self._layout = _read_layout(self._live_fd(), self._layout.path)

    def snapshot(self, number: int | None = None) -> SpgzSnapshot:
        if number not in (None, 1):
            raise UsageError(f"{self._layout.path}: an SPGZ0001 file has only generation 1")
        try:
            fd = os.dup(self._live_fd())
        except OSError as e:
            raise LocalError(f"{self._layout.path}: cannot open snapshot: {e.strerror}") from None
        return SpgzSnapshot(fd, self._layout)

    def verify(self) -> list[tuple[int, int, str]]:
        """Every damaged block as (block index, logical offset, problem); [] when all are fine."""
        with self.snapshot() as snap:
            return snap.verify()

