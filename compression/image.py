"""Crash-safe, copy-on-write disk images with generations.

Design note
-----------
An image is a file holding chunk data, index pages and generation tables anywhere past
``DATA_START``, and two superblock slots at the front. A superblock names one generation table;
the table lists the retained generations (each the top page of a Merkle-tree index, see
``diskrsync/base/merkle.py``), pruned generations that a reader may still pin ("zombies"), and an
optional checkpoint: a pending generation a killed push resumes from.

Nothing that a valid superblock can reach is ever overwritten. A writer computes free space as
the file minus everything reachable from *both* superblock slots (so falling back to the other
slot after damage still finds intact data) and from pinned zombies. A commit writes new chunks,
new index pages along the changed paths and two copies of the new table into free space,
fsyncs, then writes slot 0 (naming copy A), fsyncs, and slot 1 (copy B), fsyncs. A crash at
any point leaves the previous commit or the new one intact; after the commit one damaged copy
of anything leaves the other. A state that may lack a committed generation (see ``_read_state``)
is refused, never served, until ``Image.repair``. A new image is written under a temporary
name, fsynced and linked at its path, and the directory fsynced, so its path never names a
half-written image and its name is durable before a first commit can be reported (see
docs/format.md, "Durability and power loss", for every barrier).

Locks are open-file-description byte-range locks (``F_OFD_SETLK``): they belong to one open of
the file and vanish when it is closed or the process dies. One exclusive lock on
``WRITER_LOCK`` admits one writer. A reader pins generation G with a shared lock on
``PIN_BASE + G`` through its own open of the file, then re-reads the superblock and proceeds
only if G is still retained. A writer prunes G by first publishing it as a zombie, and frees a
zombie's space only when, in a later transaction, no pin lock on it is found. A reader that
pins after that check re-reads the table, sees the zombie and retries, so space is never
reused under a reader.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import heapq
import itertools
import json
import os
import queue
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from diskrsync.base.errors import (
    BusyError,
    CorruptChunkError,
    DataError,
    DiskrsyncError,
    FormatVersionError,
    LocalError,
    UsageError,
    from_oserror,
)
from diskrsync.base.merkle import Shape, node_hash_packed, root_hash
from diskrsync.base.retention import Retention, Verdict, select
from diskrsync.compression.alloc import FreeSpace, UsedSpace
from diskrsync.compression.api import GenerationInfo, read_span
from diskrsync.compression.codec import STANDARD, ChunkAt, ChunkCodec, Kind, is_zero, zeros
from diskrsync.compression.crypto import (
    Envelope,
    Keyring,
    MasterKey,
    OpaqueCodec,
    SealedCodec,
    SeenGenerations,
)
from diskrsync.compression.format import (
    DATA_START,
    DEFAULT_CHUNK,
    DEFAULT_FANOUT,
    ENTRY_SIZE,
    FLAG_MIRRORED,
    MAGIC,
    MAX_CHUNK,
    MIN_CHUNK,
    SECTOR,
    SLOT_SIZE,
    SUPERBLOCK_SLOTS,
    WRITER_SLOT,
    Entry,
    GenRecord,
    GenTable,
    Superblock,
    TreeRef,
    checksum,
    decode_page,
    encode_page,
    entry_digests,
    entry_hash,
    iter_entries,
    pack_entry,
    page_length,
    unpack_entry,
)


class GenerationGoneError(UsageError):
    """The generation asked for is not (or no longer) retained: pruned, or never existed."""


WRITER_LOCK = (1 << 40) - 1
PIN_BASE = 1 << 40
DEFAULT_KEEP = 2

# struct flock on Linux x86_64/aarch64: type, whence, start, len, pid
_flock = struct.Struct("hhqqi4x")


def _ofd_lock(fd: int, kind: int, start: int, *, probe: bool = False) -> int:
    """Set (or with ``probe``, test) an OFD lock on one byte; returns the conflicting type."""
    req = _flock.pack(kind, os.SEEK_SET, start, 1, 0)
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK if probe else fcntl.F_OFD_SETLK, req)
    return int(_flock.unpack(res)[0])


def _try_lock(fd: int, kind: int, start: int) -> bool:
    try:
        _ofd_lock(fd, kind, start)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def take_writer_lock(fd: int) -> bool:
    """Take the one-writer lock (of an image, or of a raw target) through this open file; it
    is held until the file is closed. False when another open holds it."""
    return _try_lock(fd, fcntl.F_WRLCK, WRITER_LOCK)


def writer_active(path: str) -> bool:
    """True while some process holds the writer lock of ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _ofd_lock(fd, fcntl.F_WRLCK, WRITER_LOCK, probe=True) != fcntl.F_UNLCK
    finally:
        os.close(fd)


def _is_pinned(fd: int, number: int) -> bool:
    return _ofd_lock(fd, fcntl.F_WRLCK, PIN_BASE + number, probe=True) != fcntl.F_UNLCK


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


class _Writeback:
    """Starts writeback of long runs of appended data early, on a background thread
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` only queues the I/O), so that a commit's fsync
    finds little left to flush: it saves ~0.15 s per GB written here. Durability still comes
    from the commit's fsync alone."""

    STEP = 64 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = self.end = -1
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def wrote(self, offset: int, length: int) -> None:
        if offset != self.end:  # not an append to the current run: start a new run
            self.start = offset
        self.end = offset + length
        if self.end - self.start >= self.STEP:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="writeback")
                self._thread.start()
            self._queue.put((self.start, self.end - self.start))
            self.start = self.end

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            _libc.sync_file_range(self.fd, ctypes.c_long(item[0]), ctypes.c_long(item[1]),
                                  _SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


_SYNC_FILE_RANGE_WRITE = 2


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate the whole 4 KiB blocks of a range; False where the filesystem cannot."""
    start = -(-offset // 4096) * 4096
    end = (offset + length) // 4096 * 4096
    if end <= start:
        return True
    r = _libc.fallocate(fd, _FALLOC_PUNCH, ctypes.c_long(start), ctypes.c_long(end - start))
    return r == 0


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until everything is written: a nearly full disk writes part and then fails."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync_dir(path: str) -> None:
    """Make the directory entries of ``path``'s folder durable (a new name, a link, a
    rename): a file's own fsync does not, and a power cut may lose the name of a file whose
    data is on disk."""
    # a bare name is in the working directory (which a restricted serve entered by fd)
    sync_folder(os.path.dirname(path) or ".")


def sync_folder(folder: str) -> None:
    """fsync a directory itself; a filesystem that cannot (EINVAL) has nothing to do."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise DataError(f"{what} at offset {offset} is cut short (image truncated?)")
    return data


class ChunkReader(Protocol):
    """Where an index reads stored chunks and pages from (see :class:`FileStore`)."""

    def read(self, offset: int, length: int, what: str) -> bytes:
        """Exactly the stored extent (offset, length); DataError when it is cut short."""
        ...


class FileStore:
    """The chunk store of an image: where stored chunks, index pages and generation tables
    live, and the head (superblock slots and writer slot) that names them.

    Today one file: an extent is (offset, length) in it, space comes from the
    :class:`FreeSpace` the writer computes from what the trees reach, ``sync`` is ``fsync``,
    and space given back is punched. Image, Snapshot, Transaction and TreeView do their I/O
    through this object only (an object store of immutable packs would replace it, extents
    becoming pack references); the locks stay on ``fd``. Thread-safe for reading; one writer.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._free = FreeSpace.from_used(DATA_START, DATA_START, [])
        # extents written since the last ``settle``: referenced by nothing on disk, given
        # back (punched, the file's free tail cut off) when the writer ends without commit
        # (runs: a commit of a first push writes an index page per 128 chunks, 16 M pages
        # for 4 TiB, one after another, issue 16)
        self._pending = UsedSpace()
        self._writeback: _Writeback | None = None

    # .. reading ..

    def read(self, offset: int, length: int, what: str) -> bytes:
        return _pread_exact(self.fd, length, offset, what)

    def read_head(self, offset: int, length: int) -> bytes:
        """Bytes of the head, zeros where the file ends (a new or damaged image)."""
        return os.pread(self.fd, length, offset).ljust(length, b"\0")

    def space(self) -> tuple[int, int]:
        """(bytes allocated, file size)."""
        st = os.fstat(self.fd)
        return st.st_blocks * 512, st.st_size

    # .. writing (one writer, holding the writer lock) ..

    def open_space(self, used: list[tuple[int, int]]) -> None:
        """Start writing: everything outside ``used`` is free (punched, the tail cut off)."""
        end = os.fstat(self.fd).st_size
        free = FreeSpace.from_used(DATA_START, end, used)
        for off, length in free.extents():
            punch_hole(self.fd, off, length)
        new_end = free.trim_end()
        if new_end < end:
            os.ftruncate(self.fd, new_end)
        self._free = free
        self._writeback = _Writeback(self.fd)

    def write(self, data: bytes, what: str, *, align: int = 0) -> tuple[int, int]:
        """Store ``data`` in free space (``align``: at a multiple of it, own sectors);
        returns its extent. Not durable before ``sync``."""
        n = len(data)
        off = self._free.allocate_aligned(n, align) if align else self._free.allocate(n)
        span = -(-n // align) * align if align else n
        self._pending.add(off, span)
        try:
            pwrite_all(self.fd, data, off)
        except OSError as e:
            self.release(off, span)
            raise from_oserror(e, f"writing {what} to {self.path}") from None
        if self._writeback is not None:
            self._writeback.wrote(off, n)
        return off, n

    def release(self, offset: int, length: int) -> None:
        """Give back an extent written since the last ``settle`` and no longer needed."""
        self._pending.remove(offset, length)
        self._free.release(offset, length)

    def write_head(self, offset: int, data: bytes) -> None:
        """Overwrite part of the head in place (a superblock slot, the writer slot)."""
        pwrite_all(self.fd, data, offset)

    def sync(self) -> None:
        """Make every write so far durable."""
        os.fsync(self.fd)

    def settle(self) -> None:
        """Everything written so far is referenced now (a table naming it was published)."""
        self._pending = UsedSpace()

    def give_back(self) -> None:
        """Return what was written since the last ``settle`` to the filesystem: a failed
        push (a full disk above all) must not keep the space until the next push."""
        self._stop_writeback()
        if not len(self._pending):
            return
        with contextlib.suppress(OSError):
            for off, length in self._pending.runs():
                self.release(off, length)
                punch_hole(self.fd, off, length)
            end = self._free.trim_end()
            if end < os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, end)

    def _stop_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.close()
            self._writeback = None

    def close(self) -> None:
        self._stop_writeback()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class _Slot:
    """One superblock slot as found on open: its superblock and table when they are valid."""

    index: int
    sb: Superblock | None
    table: GenTable | None
    problem: str = ""  # why sb or table is unusable


@dataclass(frozen=True)
class _State:
    """What the newest usable superblock commits to, the other slot, and what is wrong.

    ``lost`` is not empty when a committed generation may be missing from ``table``: using
    this state would silently roll back, so it is refused until ``Image.repair``."""

    sb: Superblock
    table: GenTable
    slots: tuple[_Slot, ...]
    warnings: tuple[str, ...] = ()  # a copy is damaged: redundancy lost, the newest is intact
    lost: tuple[str, ...] = ()  # the newest commit may be unreadable: refuse, name it
    head: bytes = b""  # both superblock slots as read: the same bytes name the same state

    @property
    def counter(self) -> int:
        """The highest counter any valid superblock holds (a new commit must exceed it)."""
        return max(s.sb.counter for s in self.slots if s.sb is not None)

    @property
    def damaged_slots(self) -> tuple[int, ...]:
        return tuple(s.index for s in self.slots if s.table is None)


def _read_slot(store: FileStore, path: str, index: int, raw: bytes) -> _Slot:
    try:
        sb = Superblock.decode(raw)
    except FormatVersionError as e:  # no other slot can be better: a newer release wrote it
        raise FormatVersionError(f"{path}: {e.message}") from None
    except DataError as e:
        return _Slot(index, None, None, e.message)
    try:
        # the table is fsynced before its superblock is written, so a valid superblock
        # with a bad table is damage, never a crash
        blob = store.read(sb.table_offset, sb.table_length, "generation table")
        if checksum(blob) != sb.table_checksum:
            raise DataError("generation table checksum mismatch")
        table = GenTable.decode(blob)
        if table.version != sb.version:  # encryption is never added or stripped silently
            raise DataError(f"superblock says format version {sb.version}, its table "
                            f"version {table.version}")
        return _Slot(index, sb, table)
    except DataError as e:
        return _Slot(index, sb, None, e.message)


def _read_state(store: FileStore, path: str) -> _State:
    """Decode both slots; the usable one with the higher counter wins (slot 0 on a tie).

    A commit of this version writes its table twice and both slots (``FLAG_MIRRORED``), so
    one damaged copy leaves the newest commit in the other: a warning. An image last written
    one slot per commit (older versions) cannot tell a damaged slot from one that held a newer
    commit, and a valid newer superblock with an unreadable table is a lost commit: both go
    to ``lost``."""
    head = store.read_head(0, SLOT_SIZE * 2)
    slots = tuple(
        _read_slot(store, path, i, head[off : off + SLOT_SIZE])
        for i, off in enumerate(SUPERBLOCK_SLOTS)
    )
    usable = [s for s in slots if s.table is not None]
    if not usable:
        if not any(head[o : o + len(MAGIC)] == MAGIC for o in SUPERBLOCK_SLOTS):
            raise DataError(f"{path} is not a diskrsync image (no DSKRSYNC magic)")
        problems = "; ".join(f"superblock {s.index}: {s.problem}" for s in slots)
        raise DataError(f"{path}: no valid superblock ({problems})")
    best = max(usable, key=lambda s: (s.sb.counter, -s.index))  # type: ignore[union-attr]
    assert best.sb is not None and best.table is not None
    gens = best.table.generations
    newest = f"generation {gens[-1].number}" if gens else "no generation"
    warnings: list[str] = []
    lost: list[str] = []
    for s in slots:
        if s is best:
            continue
        if s.sb is None:
            if best.sb.flags & FLAG_MIRRORED:
                warnings.append(f"superblock copy {s.index} is damaged ({s.problem}); "
                                f"copy {best.index} holds the newest commit")
            else:
                lost.append(f"superblock copy {s.index} is damaged ({s.problem}) and the image "
                            f"was written one copy per commit, so it may have held a commit "
                            f"newer than the one in use ({newest})")
        elif s.table is None and s.sb.counter > best.sb.counter:
            lost.append(f"superblock copy {s.index} names a newer commit (counter "
                        f"{s.sb.counter}) whose generation table is unreadable ({s.problem}); "
                        f"only an older one ({newest}) is readable")
        elif s.table is None:
            warnings.append(f"the generation table of superblock copy {s.index} is damaged "
                            f"({s.problem}); copy {best.index} holds the newest commit")
    return _State(best.sb, best.table, slots, tuple(warnings), tuple(lost), head)


class TreeView:
    """Read access to one tree of the index; pages are loaded on demand and checked both by
    their own checksum and against the digest their parent records.

    Pages above level 2 (1/fanout^2 of the index) stay in memory once read; of levels 1 and
    2, the bulk of the index (48 bytes per chunk: 384 MiB for 1 TiB of 128 KiB chunks, and
    3 MiB more), only the last ``LEAF_PAGES`` read, so walking a whole tree costs the same
    memory at any disk size (issue 16)."""

    LEAF_PAGES = 64

    def __init__(self, store: ChunkReader, ref: TreeRef, chunk_size: int, fanout: int) -> None:
        self.store = store
        self.ref = ref
        self.shape = Shape(ref.size, chunk_size, fanout)
        self._pages: dict[tuple[int, int], bytes] = {}  # levels >= 3
        # levels 1 and 2, least recently used first
        self._leaf_pages: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def cached_pages(self) -> int:
        """Index pages held in memory now (what the memory bound is about)."""
        with self._lock:
            return len(self._pages) + len(self._leaf_pages)

    def page(self, level: int, index: int) -> bytes:
        """Packed entries of index page (level, index), level >= 1."""
        key = (level, index)
        if level <= 2:
            with self._lock:
                got = self._leaf_pages.get(key)
                if got is not None:
                    self._leaf_pages.move_to_end(key)
                    return got
        else:
            got = self._pages.get(key)
            if got is not None:
                return got
        shape = self.shape
        top = shape.top_level
        if level == top:
            if index != 0:
                raise IndexError(key)
            off, length, want = self.ref.offset, self.ref.length, self.ref.hash
        else:
            parent = self.page(level + 1, index // shape.fanout)
            e = unpack_entry(parent, index % shape.fanout)
            if e.kind != Kind.PAGE:
                raise DataError(f"index page ({level + 1},{index // shape.fanout}) is damaged")
            off, length, want = e.offset, e.length, e.hash
        count = len(shape.children(level, index))
        if length != page_length(count):
            raise DataError(f"index page ({level},{index}) has the wrong length")
        raw = self.store.read(off, length, f"index page ({level},{index})")
        try:
            entries = decode_page(raw, level=level, count=count)
        except DataError as e:
            raise DataError(f"index page ({level},{index}) at offset {off}: {e.message}") from None
        if node_hash_packed(entry_digests(entries)) != want:
            raise DataError(f"index page ({level},{index}) at offset {off} fails its Merkle hash")
        with self._lock:
            if level <= 2:
                self._leaf_pages[key] = entries
                if len(self._leaf_pages) > self.LEAF_PAGES:
                    self._leaf_pages.popitem(last=False)
            else:
                self._pages[key] = entries
        return entries

    @classmethod
    def empty(cls, chunk_size: int, fanout: int) -> TreeView:
        """The tree of an empty disk (nothing to read)."""
        return cls(_NO_STORE, TreeRef(0), chunk_size, fanout)

    def entry(self, chunk: int) -> Entry:
        if not 0 <= chunk < self.shape.chunks:
            raise IndexError(f"chunk {chunk} outside the disk")
        f = self.shape.fanout
        return unpack_entry(self.page(1, chunk // f), chunk % f)

    def node_hashes(self, level: int) -> list[bytes]:
        """Digests of every node of ``level`` (0 = chunks), from the pages one level up."""
        return list(self.iter_node_hashes(level))

    def iter_node_hashes(self, level: int) -> Iterator[bytes]:
        """``node_hashes`` a page at a time (a target streams its page digests without
        holding them all: 64 bytes each in a list, 5 MiB per TiB of disk)."""
        shape = self.shape
        if level > shape.top_level or shape.chunks == 0:
            return
        if level == shape.top_level:
            yield self.ref.hash
            return
        for j in range(shape.count(level + 1)):
            entries = self.page(level + 1, j)
            for k in range(len(entries) // ENTRY_SIZE):
                yield entry_hash(entries, k)

    def leaf_hashes(self, page: int) -> list[bytes]:
        """Chunk digests under level-1 node ``page``."""
        entries = self.page(1, page)
        return [entry_hash(entries, k) for k in range(len(entries) // ENTRY_SIZE)]

    def pointer(self, level: int, index: int) -> bytes | None:
        """The packed entry naming node (level, index), level >= 1: digest, offset, length
        (the top's from the tree's ref); None where the tree has no such node or the page
        naming it cannot be read."""
        shape = self.shape
        if shape.chunks == 0 or not 1 <= level <= shape.top_level \
                or not 0 <= index < shape.count(level):
            return None
        if level == shape.top_level:
            r = self.ref
            return pack_entry(r.hash, r.offset, r.length, Kind.PAGE)
        f = shape.fanout
        try:
            page = self.page(level + 1, index // f)
        except DataError:
            return None
        k = index % f
        return bytes(page[k * ENTRY_SIZE : (k + 1) * ENTRY_SIZE])

    def extents_beside(self, prev: TreeView | None) -> Iterator[tuple[int, int]]:
        """Every stored extent this tree references but the subtrees it shares with ``prev``
        at the same place (a node whose pointer, digest and offset and length, equals
        ``prev``'s node of that level and index: a page is immutable, so is all it points
        to). The caller has counted all of ``prev``'s extents already.

        Copy-on-write keeps an unchanged page where it was, so walking the trees of
        successive generations side by side finds what one shares with the one before
        without remembering every page seen (a set of offsets grew with the disk, issue
        16): memory is a path of the walk. A page shared some other way is only walked
        again, never skipped wrongly. Extents come in ascending node order, so a push's
        chunks, written one after another, arrive one after another."""
        shape = self.shape
        if shape.chunks == 0:
            return
        top = shape.top_level
        r = self.ref
        stack = [(top, 0, pack_entry(r.hash, r.offset, r.length, Kind.PAGE))]
        while stack:
            level, index, ptr = stack.pop()
            if prev is not None and prev.pointer(level, index) == ptr:
                continue
            e = unpack_entry(ptr, 0)
            yield e.offset, e.length
            entries = self.page(level, index)
            if level == 1:
                for _h, offset, length, kind in iter_entries(entries):
                    if kind != Kind.ZERO:
                        yield offset, length
            else:
                n = len(entries) // ENTRY_SIZE
                first = index * shape.fanout
                for k in range(n - 1, -1, -1):  # popped in ascending order
                    stack.append((level - 1, first + k,
                                  bytes(entries[k * ENTRY_SIZE : (k + 1) * ENTRY_SIZE])))


class _NoStore:
    def read(self, offset: int, length: int, what: str) -> bytes:
        raise DataError(f"{what} at offset {offset}: an empty tree has nothing stored")


_NO_STORE = _NoStore()


def _refuse_loss(path: str, state: _State) -> None:
    """A state that may have lost its newest commit is not used (served, or written on top
    of, which would free the lost commit's space): that would be a silent rollback."""
    if state.lost:
        raise DataError(
            f"{path}: {'; '.join(state.lost)}; refusing to use the older state (see "
            f"`diskrsync verify {path}`; `diskrsync verify --repair` accepts the loss)"
        )
def temp_name(path: str, what: str) -> str:
    """A per-process temporary name beside ``path`` (the pid says whether it is stale)."""
    return f"{path}.diskrsync-{what}.{os.getpid()}.tmp"


def remove_stale_temps(path: str, log: Callable[[str], None] = lambda _m: None) -> None:
    """Remove temporary files an interrupted run (killed, or a power cut) left beside
    ``path``: those whose process is gone."""
    for name in glob.glob(glob.escape(path) + ".diskrsync-*.*.tmp"):
        pid_text = name.rsplit(".", 2)[-2]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still running: not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            os.unlink(name)
            log(f"removed {name}, left behind by an interrupted run")


def _claim_empty(fd: int, path: str) -> None:
    """Check, under the writer lock, that ``fd`` is an empty regular file nobody writes."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file, so not an image")
    if not take_writer_lock(fd):
        raise BusyError(f"{path} is being written by another process")
    if os.fstat(fd).st_size:
        raise BusyError(f"{path} was written by another process meanwhile")


def retention_of(keep: int | Retention) -> Retention:
    """``keep`` as a policy: an int N is ``--keep-last N`` (at least 1)."""
    if isinstance(keep, Retention):
        return keep
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    return Retention(last=keep)


def _retain(gens: tuple[GenRecord, ...],
            policy: Retention) -> tuple[tuple[GenRecord, ...], tuple[GenRecord, ...]]:
    """(kept, pruned) of ``gens`` under ``policy``, both in table order."""
    verdicts = select([(r.number, r.time) for r in gens], policy)
    kept = tuple(r for r, v in zip(gens, verdicts, strict=True) if v.kept)
    cut = tuple(r for r, v in zip(gens, verdicts, strict=True) if not v.kept)
    return kept, cut


def _info(rec: GenRecord) -> GenerationInfo:
    return GenerationInfo(rec.number, rec.time, rec.tree.size, rec.root_hash, rec.source, rec.meta)


def _open_fd(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise from_oserror(e, f"cannot open {path}") from None
    if not os.path.isfile(path):
        with contextlib.suppress(OSError):
            st = os.fstat(fd)

            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise UsageError(f"{path} is not a regular file, so not an image")
    return fd


class Image:
    """An image file: lists generations, hands out pinned snapshots, and begins transactions."""

    def __init__(self, path: str, fd: int, state: _State, *, accept_loss: bool = False,
                 codec: ChunkCodec = STANDARD, keyring: Keyring | None = None) -> None:
        self.path = path
        self.store = FileStore(fd, path)
        self._accept_loss = accept_loss
        self._state = self._checked(state)
        self.key: MasterKey | None = None
        self.codec: ChunkCodec = codec
        enc = state.table.encryption
        if enc is None and keyring is not None:
            self._check_not_stripped()
        if enc is not None:
            key_id = bytes.fromhex(enc["key_id"])
            if keyring is None:
                self.codec = OpaqueCodec(key_id, str(enc["cipher"]))
            else:
                envelope = Envelope.from_json(enc["envelope"]) if enc.get("envelope") else None
                self.key = keyring.unlock(key_id, envelope, path)
                self.codec = SealedCodec(self.key)
                self._check_seals(self._state)

    @property
    def encrypted(self) -> bool:
        return self._state.table.encryption is not None

    @property
    def key_id(self) -> bytes | None:
        enc = self._state.table.encryption
        return bytes.fromhex(enc["key_id"]) if enc is not None else None

    def _check_seals(self, state: _State) -> None:
        """With the key: every generation's seal opens for its number and root, and the
        image is not older than this client has seen it (see crypto.py)."""
        codec = self.codec
        assert isinstance(codec, SealedCodec) and self.key is not None
        for rec in state.table.generations:
            self._open_seal(rec, state.sb)
        gens = state.table.generations
        seen, place = SeenGenerations(), ":" + os.path.abspath(self.path)
        seen.check_key_at(place, self.key.key_id, self.path)
        seen.check(self.key.key_id, place,
                   (gens[-1].number, gens[-1].root_hash) if gens else None,
                   {r.number: r.root_hash for r in gens}, self.path)
        if gens:
            seen.record(self.key.key_id, place, gens[-1].number, gens[-1].root_hash)
        seen.remember_place(place, self.key.key_id)

    def _check_not_stripped(self) -> None:
        """A plain image where this client knows an encrypted one (it opened it with the
        key, or pushed into it) is someone else's data in its place: refused, as a push
        into it is (see crypto.SeenGenerations)."""
        place = ":" + os.path.abspath(self.path)
        was = SeenGenerations().encrypted_at(place)
        if was is not None:
            raise DataError(
                f"{self.path} was an encrypted image (key {was[:12]}…) when this client last "
                f"used it, and is not one now: refusing to read it as that backup (was it "
                f"replaced?). If it was replaced on purpose, remove its line from "
                f"{SeenGenerations().places_file}")

    def _open_seal(self, rec: GenRecord, sb: Superblock) -> dict[str, Any]:
        """The record sealed into generation ``rec``, once it is the generation the seal
        names: the seal binds the root hash, and the root must be that of the tree the
        record points at in this geometry (else a host could keep a newer generation's root
        and seal, and point it at an older tree or at pieces of several)."""
        assert isinstance(self.codec, SealedCodec)
        if root_hash(rec.tree.size, sb.chunk_size, sb.fanout, rec.tree.hash) != rec.root_hash:
            raise DataError(f"generation {rec.number} does not authenticate: its tree is not "
                            f"the one its root hash names (root {rec.root_hash.hex()[:16]}…)")
        return self.codec.open_seal(rec.number, rec.root_hash, rec.seal)

    def sealed_record(self, rec: GenRecord) -> dict[str, Any]:
        """What the client sealed into a generation (``{}`` for a plain image)."""
        if isinstance(self.codec, SealedCodec):
            return self._open_seal(rec, self._state.sb)
        return {}

    def _checked(self, state: _State) -> _State:
        if not self._accept_loss:
            _refuse_loss(self.path, state)
        return state

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, accept_loss: bool = False, nofollow: bool = False,
             codec: ChunkCodec = STANDARD, keyring: Keyring | None = None) -> Image:
        """Open an image for reading. A state that may have lost its newest commit is a
        DataError unless ``accept_loss`` (for verify and repair, which report it).
        ``nofollow``: refuse a symlink as the final component (ELOOP). ``codec``: how a
        plain image's chunks are stored and hashed (every snapshot and transaction of it
        uses it). An encrypted image is unlocked through ``keyring`` (every generation's
        seal checked); without one it is opened opaque: its structure can be read and
        written (a ``serve`` end), its data not."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise UsageError(f"{path} is a directory, not an image")
        fd = _open_fd(path, os.O_RDONLY | (os.O_NOFOLLOW if nofollow else 0))
        try:
            return cls(path, fd, _read_state(FileStore(fd, path), path), accept_loss=accept_loss,
                       codec=codec, keyring=keyring)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(
        cls, path: str, *, chunk_size: int = DEFAULT_CHUNK, fanout: int = DEFAULT_FANOUT,
        in_place: bool = False, nofollow: bool = False, codec: ChunkCodec = STANDARD,
        encryption: dict[str, Any] | None = None, keyring: Keyring | None = None,
    ) -> Image:
        """A new, empty image (no generation yet); fails if ``path`` exists.

        With ``in_place``, ``path`` must instead be an existing empty regular file, which
        becomes the image and keeps its inode, owner and mode; it is checked empty under the
        writer lock, so an image another writer put there meanwhile is never overwritten.
        ``nofollow``: refuse a symlink as the final component (ELOOP). ``encryption``
        (:func:`encryption_entry`) makes it an encrypted image (format version 2).
        """
        path = os.fspath(path)
        if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK and chunk_size & (chunk_size - 1) == 0):
            raise UsageError(
                f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}, "
                f"not {chunk_size}"
            )
        # a new image is written under a temporary name and linked at PATH once durable:
        # a power cut never leaves a half-written image there that the next push refuses
        target, path = path, path if in_place else temp_name(path, "create")
        if not in_place:
            if os.path.lexists(target):
                raise UsageError(f"{target} already exists")
            remove_stale_temps(target)
        flags = os.O_NONBLOCK | os.O_NOCTTY if in_place else os.O_CREAT | os.O_EXCL
        flags |= os.O_NOFOLLOW if nofollow else 0
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | flags, 0o644)
        except OSError as e:
            raise from_oserror(e, f"cannot create {target}") from None
        if in_place:
            try:
                _claim_empty(fd, path)
            except BaseException:
                os.close(fd)
                raise
        try:
            empty = GenTable(encryption=encryption)
            table = empty.encode()
            for slot, off in enumerate(SUPERBLOCK_SLOTS):
                at = DATA_START + slot * SECTOR  # one table copy per slot, own sectors
                os.pwrite(fd, table, at)
                sb = Superblock(chunk_size, fanout, 1, at, len(table), checksum(table),
                                FLAG_MIRRORED, empty.version)
                os.pwrite(fd, sb.encode(), off)
            os.fsync(fd)
            if not in_place:
                os.link(path, target)  # never over anything that appeared meanwhile
                os.unlink(path)
            fsync_dir(target)  # the first commit is reported only once the name is durable
        except OSError as e:
            if in_place:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)
            if isinstance(e, FileExistsError):
                raise UsageError(f"{target} already exists") from None
            raise from_oserror(e, f"cannot create {target}") from None
        finally:
            if not in_place and os.path.lexists(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        os.close(fd)
        return cls.open(target, nofollow=nofollow, codec=codec, keyring=keyring)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        return self._state.sb.chunk_size

    @property
    def fanout(self) -> int:
        return self._state.sb.fanout

    @property
    def table(self) -> GenTable:
        return self._state.table

    @property
    def damaged_slots(self) -> tuple[int, ...]:
        """Slots whose superblock or table copy is unusable."""
        return self._state.damaged_slots

    @property
    def redundancy_warnings(self) -> tuple[str, ...]:
        """Damaged copies that cost redundancy but no data (the newest commit is intact)."""
        return self._state.warnings

    @property
    def lost_commits(self) -> tuple[str, ...]:
        """Why the newest commit may be missing (only when opened with ``accept_loss``)."""
        return self._state.lost

    def refresh(self) -> None:
        """Re-read the image (a long-lived reader: the mount). Unlocked, the new state is
        checked as an open checks it: still this key, every seal, not rolled back."""
        state = self._checked(_read_state(self.store, self.path))
        if self.key is not None:
            enc = state.table.encryption
            if enc is None or bytes.fromhex(enc["key_id"]) != self.key.key_id:
                raise DataError(f"{self.path} is no longer encrypted with the key it was "
                                f"opened with (replaced?)")
            self._check_seals(state)
        self._state = state

    def generations(self) -> list[GenerationInfo]:
        return [_info(self._authentic(r)) for r in self._state.table.generations]

    def _authentic(self, rec: GenRecord, sb: Superblock | None = None) -> GenRecord:
        """``rec`` as its writer recorded it: an unlocked image's time, source and metadata
        come from the seal (the table's copies are the host's word: its clock, or whatever
        it wrote there, e.g. in the mount's generation names)."""
        if not isinstance(self.codec, SealedCodec):
            return rec
        sealed = self._open_seal(rec, sb or self._state.sb)
        t, source, meta = sealed.get("time"), sealed.get("source"), sealed.get("meta")
        return replace(rec, time=float(t) if isinstance(t, int | float) else rec.time,
                       source=source if isinstance(source, str) else "",
                       meta=meta if isinstance(meta, dict) else {})

    def record(self, number: int | None = None) -> GenRecord:
        gens = self._state.table.generations
        if not gens:
            raise UsageError(f"{self.path} has no committed generation yet")
        if number is None:
            return gens[-1]
        got = self._state.table.by_number.get(number)
        if got is not None:
            return got
        have = ", ".join(str(r.number) for r in gens)
        raise GenerationGoneError(f"{self.path} has no generation {number} (retained: {have})")

    def snapshot(self, number: int | None = None) -> Snapshot:
        """Pin a generation (default: current) for reading until the snapshot is closed."""
        for _attempt in range(20):
            rec = self.record(number)
            store = FileStore(_open_fd(self.path, os.O_RDONLY), self.path)
            try:
                _ofd_lock(store.fd, fcntl.F_RDLCK, PIN_BASE + rec.number)
                # the pin counts only if rec is still live. Superblocks as we read them last
                # name the tables we decoded then (each checksummed in its superblock): not
                # decoded again, or pinning every generation (the mount's start) would decode
                # the whole table once per generation (issue 16)
                head = store.read_head(0, SLOT_SIZE * 2)
                state = self._state if head == self._state.head and self._state.head \
                    else self._checked(_read_state(store, self.path))
            except BaseException:
                store.close()
                raise
            self._state = state
            if rec.number in state.table.by_number:
                try:
                    rec = self._authentic(rec, state.sb)
                except BaseException:
                    store.close()
                    raise
                return Snapshot(self.path, store, rec, state.sb.chunk_size, state.sb.fanout,
                                self.codec)
            store.close()
            if number is not None:
                raise GenerationGoneError(f"generation {number} of {self.path} was pruned")
        raise LocalError(f"{self.path}: generations change too fast to pin one")

    def usage(self) -> dict[str, int]:
        """Stored bytes (data and index reachable from retained generations) and allocation."""
        used = UsedSpace()
        prev: TreeView | None = None
        for rec in self._state.table.generations:
            tree = TreeView(self.store, rec.tree, self.chunk_size, self.fanout)
            for off, length in tree.extents_beside(prev):
                used.add(off, length)
            prev = tree if tree.shape.chunks else prev
        stored = sum(length for _o, length in used.runs())
        allocated, file_size = self.store.space()
        return {"stored": stored, "allocated": allocated, "file_size": file_size}

    # -- writing ---------------------------------------------------------------------------

    def begin(
        self, *, resume: bool = True, what: str = "push", repair: bool = False
    ) -> Transaction:
        """Start the one write transaction this image admits; fails at once if another runs.

        With ``resume`` the transaction starts from the checkpoint a killed push left (if
        any), so its chunks count as already there; the current generation is untouched.
        A state that may have lost its newest commit is refused (nothing of it is freed)
        unless ``repair``: only ``repair()`` passes it.
        """
        store = FileStore(_open_fd(self.path, os.O_RDWR), self.path)
        try:
            if not take_writer_lock(store.fd):
                holder = ""
                with contextlib.suppress(Exception):
                    raw = store.read_head(WRITER_SLOT, 1024).rstrip(b"\0")
                    w = json.loads(raw)
                    where = f" on {w['host']}" if w.get("host") else ""
                    holder = f" ({w['what']} by pid {w['pid']}{where} since {w['since']})"
                raise BusyError(f"{self.path} is being written by another process{holder}")
            info = {
                "pid": os.getpid(),
                # the file of an encrypted image may be all its host sees: not our name
                "host": "" if self.encrypted else socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "what": what,
            }
            store.write_head(WRITER_SLOT, json.dumps(info).encode().ljust(1024, b"\0"))
            state = _read_state(store, self.path)
            if not repair:
                _refuse_loss(self.path, state)
            self._state = state
            return Transaction(self, store, state, resume=resume)
        except OSError as e:
            store.close()
            raise from_oserror(e, f"cannot write {self.path}") from None
        except BaseException:
            store.close()
            raise

    def repair(self) -> list[str]:
        """Rewrite both superblocks and table copies from the newest usable state.

        This accepts what ``lost_commits`` names as lost (its space becomes free) and restores
        redundancy. Generation numbers that the lost commit may have used are skipped, so a
        number never names two different generations. Returns what was done, one line each.
        """
        tx = self.begin(what="repair", repair=True)
        try:
            state = self._state
            done = [f"accepted as lost: {msg}" for msg in state.lost]
            done += [f"rewritten: {msg}" for msg in state.warnings]
            # a lost commit used at most (its counter - ours) numbers; an unreadable slot of
            # a one-copy-per-commit image held at most one commit more
            skip = max(
                [s.sb.counter - state.sb.counter for s in state.slots
                 if s.sb is not None and s.table is None] + [1 if state.lost else 0]
            )
            table = tx.table  # the state's, less the zombies no reader pins any more
            tx.publish(replace(table, next_number=table.next_number + max(skip, 0)))
            if not done:
                done.append("both superblock copies and generation tables rewritten")
            return done
        finally:
            tx.close()

    def verdicts(self, keep: int | Retention) -> list[Verdict]:
        """What the retention policy ``keep`` would keep of the retained generations, and
        why (``prune --dry-run``), oldest first."""
        return select([(r.number, r.time) for r in self.table.generations], retention_of(keep))

    def prune(self, keep: int | Retention) -> list[int]:
        """Keep what the retention policy ``keep`` (an int: the newest N) keeps; returns the
        numbers pruned."""
        retention_of(keep)  # checked before the writer lock is taken
        tx = self.begin(what="prune")
        try:
            return tx.commit_prune(keep)
        finally:
            tx.close()


class Snapshot:
    """A pinned generation (implements DiskSnapshot). Thread-safe: reads use ``os.pread``.
    The pin is a lock on the open file its store reads through: closing releases it."""

    def __init__(self, path: str, store: FileStore, rec: GenRecord, chunk_size: int,
                 fanout: int, codec: ChunkCodec = STANDARD) -> None:
        self.path = path
        self.store = store
        self.codec = codec
        self.record = rec
        self.tree = TreeView(store, rec.tree, chunk_size, fanout)

    @property
    def info(self) -> GenerationInfo:
        return _info(self.record)

    @property
    def size(self) -> int:
        return self.record.tree.size

    @property
    def chunk_size(self) -> int:
        return self.tree.shape.chunk_size

    @property
    def chunk_count(self) -> int:
        return self.tree.shape.chunks

    def chunk_is_zero(self, index: int) -> bool:
        return self.tree.entry(index).kind == Kind.ZERO

    def read_stored(self, index: int) -> tuple[Kind, bytes]:
        """The chunk as stored (for sending it on without recompressing), once it has been
        decoded and matched its hash: a push out of a damaged image never passes bad bytes on."""
        e = self.tree.entry(index)
        if e.kind == Kind.ZERO:
            return Kind.ZERO, b""
        length = self.tree.shape.chunk_length(index)
        return e.kind, read_checked(self.store, self.codec, index, e, length, self.chunk_size)[0]

    def read_chunk(self, index: int) -> bytes:
        e = self.tree.entry(index)
        length = self.tree.shape.chunk_length(index)
        if e.kind == Kind.ZERO:
            return zeros(length)
        return decode_checked(self.store, self.codec, index, e, length, self.chunk_size)

    def read(self, offset: int, length: int) -> bytes:
        return read_span(self.read_chunk, self.size, self.chunk_size, offset, length)

    def close(self) -> None:
        self.store.close()  # releases the pin

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_checked(store: ChunkReader, codec: ChunkCodec, index: int, e: Entry, length: int,
                   chunk_size: int) -> bytes:
    """Read, decode and hash-check one stored chunk; wrong bytes never leave this function."""
    return read_checked(store, codec, index, e, length, chunk_size)[1]


def read_checked(store: ChunkReader, codec: ChunkCodec, index: int, e: Entry, length: int,
                 chunk_size: int) -> tuple[bytes, bytes]:
    """One stored chunk as (stored bytes, decoded bytes), both only once they hash right."""
    try:
        stored = store.read(e.offset, e.length, f"chunk {index}")
        data = codec.decode(e.kind, stored, length, ChunkAt(index, e.hash))
    except (DataError, ValueError) as err:
        detail = err.message if isinstance(err, DiskrsyncError) else str(err)
        raise CorruptChunkError(index, index * chunk_size, detail) from None
    if codec.leaf_hash(data, index) != e.hash:
        raise CorruptChunkError(index, index * chunk_size)
    return stored, data


class Transaction:
    """One writer's pending changes: chunk writes, a resize, checkpoints, then a commit.

    Level-1 index pages that changed are kept in memory as packed entries until a checkpoint
    or the commit writes them (with their paths to the top) into free space.
    """

    def __init__(self, image: Image, store: FileStore, state: _State, *, resume: bool) -> None:
        self.image = image
        self.path = image.path
        self.codec = image.codec
        self._store = store
        sb = state.sb
        self.chunk_size = sb.chunk_size
        self.fanout = sb.fanout
        self._counter = state.counter
        self._table = state.table
        self.resumed_from: GenRecord | None = None
        base = state.table.checkpoint if (resume and state.table.checkpoint) else None
        if base is not None:
            self.resumed_from = base
        elif state.table.generations:
            base = state.table.generations[-1]
        self._base_ref = base.tree if base else TreeRef(0)
        self.base = TreeView(store, self._base_ref, self.chunk_size, self.fanout)
        self.shape = self.base.shape
        self._dirty: dict[int, bytearray] = {}  # level-1 page -> entries in the new shape
        self._base_limit = self.shape.chunks  # base chunks past this were cut by a resize
        self._fresh: dict[int, tuple[int, int]] = {}  # chunk -> extent written since checkpoint
        store.open_space(self._used(state))
        self._torn_publish = False  # a superblock write failed: what it names must stay
        self.pruned: tuple[int, ...] = ()  # what the commit pruned
        self.unchanged = False  # the commit recorded a run in the newest generation
        self._closed = False

    # -- free space ----------------------------------------------------------------------

    def _live(self, state: _State) -> tuple[list[tuple[int, int]], list[GenRecord]]:
        """What a writer must keep: both slots' tables (extents) and the generations whose
        trees stay (both slots' generations and checkpoints, and their pinned zombies).
        Zombies no reader pins any more leave this transaction's table."""
        fd = self._store.fd
        live: list[GenRecord] = list(state.table.generations)
        if state.table.checkpoint:
            live.append(state.table.checkpoint)
        zombies = []
        for z in state.table.zombies:
            if _is_pinned(fd, z.number):
                live.append(z)
                zombies.append(z)
        self._table = replace(self._table, zombies=tuple(zombies))
        # every slot's table and trees stay: falling back to either copy finds intact data
        tables = [(s.sb.table_offset, s.sb.table_length) for s in state.slots if s.sb is not None]
        for s in state.slots:
            if s.table is None or s.table == state.table:
                continue
            live += s.table.generations
            if s.table.checkpoint:
                live.append(s.table.checkpoint)
            numbers = {r.number for r in live}  # a set: a list's `in` made this quadratic
            live += [z for z in s.table.zombies
                     if z.number not in numbers and _is_pinned(fd, z.number)]
        return tables, live

    def _used(self, state: _State) -> list[tuple[int, int]]:
        """Every extent a writer must not reuse: what both slots and pinned zombies reach."""
        store = self._store
        cs, fo = self.chunk_size, self.fanout
        tables, live = self._live(state)
        used = UsedSpace()
        for off, length in tables:
            used.add(off, length)
        # successive generations share most of their trees: walked side by side, in order
        # (a checkpoint, number 0, after the newest generation it was begun from)
        prev: TreeView | None = None
        walked: set[TreeRef] = set()  # a tree both slots' tables name is walked once
        for rec in sorted(live, key=lambda r: r.number or 1 << 64):
            if rec.tree in walked:
                continue
            tree = TreeView(store, rec.tree, cs, fo)
            try:
                for off, length in tree.extents_beside(prev):
                    used.add(off, length)
            except DataError:
                if rec in state.table.generations or rec is state.table.checkpoint:
                    raise
                # an unreadable tree of the older slot: keep its top, the rest is unknowable
                # (and it is no tree to skip against: not all it reaches was counted)
                used.add(rec.tree.offset, rec.tree.length)
                continue
            walked.add(rec.tree)
            if tree.shape.chunks:
                prev = tree
        return used.runs()

    # -- the tree being built ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self.shape.size

    def _base_entry(self, chunk: int) -> bytes | None:
        """Packed base entry for a chunk whose length is the same in base and new shape."""
        bs = self.base.shape
        if chunk >= self._base_limit or bs.chunk_length(chunk) != self.shape.chunk_length(chunk):
            return None
        f = self.fanout
        page = self.base.page(1, chunk // f)
        k = chunk % f
        return bytes(page[k * ENTRY_SIZE : (k + 1) * ENTRY_SIZE])

    def _page_entries(self, page: int) -> bytearray:
        """Entries of level-1 page ``page`` in the new shape, dirty or derived from the base."""
        got = self._dirty.get(page)
        if got is not None:
            return got
        start, stop = self.shape.chunk_range(1, page)
        bs = self.base.shape
        out = bytearray()
        if bs.chunk_range(1, page) == (start, stop) and stop <= self._base_limit:
            return bytearray(self.base.page(1, page))
        for c in range(start, stop):
            e = self._base_entry(c)
            if e is None:
                e = pack_entry(self.codec.zero_hash(self.shape.chunk_length(c)), 0, 0, Kind.ZERO)
            out += e
        return out

    def _set_entry(self, chunk: int, entry: bytes) -> None:
        f = self.fanout
        page = chunk // f
        entries = self._dirty.get(page)
        if entries is None:
            entries = self._dirty[page] = self._page_entries(page)
        k = chunk % f
        entries[k * ENTRY_SIZE : (k + 1) * ENTRY_SIZE] = entry

    def entry(self, chunk: int) -> Entry:
        """The chunk's entry as this transaction currently has it."""
        f = self.fanout
        page = chunk // f
        entries = self._dirty.get(page)
        if entries is not None:
            return unpack_entry(entries, chunk % f)
        e = self._base_entry(chunk)
        if e is None:
            return Entry(self.codec.zero_hash(self.shape.chunk_length(chunk)), 0, 0, Kind.ZERO)
        return unpack_entry(e, 0)

    def chunk_hash(self, chunk: int) -> bytes:
        return self.entry(chunk).hash

    def read_chunk(self, chunk: int) -> bytes:
        e = self.entry(chunk)
        length = self.shape.chunk_length(chunk)
        if e.kind == Kind.ZERO:
            return zeros(length)
        return decode_checked(self._store, self.codec, chunk, e, length, self.chunk_size)

    def resize(self, new_size: int) -> None:
        """Change the logical size; chunks that appear read as zeros, a boundary chunk keeps
        its bytes (re-stored at its new length)."""
        if new_size < 0:
            raise UsageError("size must not be negative")
        old = self.shape
        if new_size == old.size:
            return
        keep: dict[int, bytes] = {}
        cs = self.chunk_size
        for c in {old.size // cs, new_size // cs, (new_size - 1) // cs if new_size else 0}:
            # chunks whose length changes but which exist on both sides keep their bytes
            if 0 <= c < old.chunks and c * cs < new_size:
                new_len = min(cs, new_size - c * cs)
                if old.chunk_length(c) != new_len:
                    data = self.read_chunk(c)
                    keep[c] = data[:new_len].ljust(new_len, b"\0")
        self._dirty = {
            p: e for p, e in self._dirty.items() if p * self.fanout * cs < new_size
        }
        self.shape = Shape(new_size, cs, self.fanout)
        self._base_limit = min(self._base_limit, self.shape.chunks)
        for p in list(self._dirty):
            start, stop = self.shape.chunk_range(1, p)
            self._dirty[p] = self._dirty[p][: (stop - start) * ENTRY_SIZE]
            have = len(self._dirty[p]) // ENTRY_SIZE
            for c in range(start + have, stop):
                z = pack_entry(self.codec.zero_hash(self.shape.chunk_length(c)), 0, 0, Kind.ZERO)
                self._dirty[p] += z
        for c in list(self._fresh):
            if c >= self.shape.chunks:
                self._store.release(*self._fresh.pop(c))
        for c, data in keep.items():
            self.write_chunk(c, data)

    def write_chunk(self, chunk: int, data: bytes | bytearray | memoryview) -> bytes:
        """Store a chunk's bytes (compressing in this thread); returns its digest."""
        codec = self.codec
        if is_zero(data):
            h = codec.zero_hash(len(data))
            self.put_chunk(chunk, Kind.ZERO, b"", h, len(data))
            return h
        h = codec.leaf_hash(data, chunk)
        kind, stored = codec.encode(data, ChunkAt(chunk, h))
        self.put_chunk(chunk, kind, stored, h, len(data))
        return h

    def put_chunk(self, chunk: int, kind: Kind, stored: bytes, digest: bytes, length: int) -> None:
        """Store an already encoded chunk whose digest the caller has computed."""
        want = self.shape.chunk_length(chunk)
        if length != want:
            raise UsageError(f"chunk {chunk} must hold {want} bytes, not {length}")
        old = self._fresh.pop(chunk, None)
        if old is not None:
            self._store.release(*old)
        if kind == Kind.ZERO:
            self._set_entry(chunk, pack_entry(digest, 0, 0, Kind.ZERO))
            return
        off, n = self._store.write(stored, f"chunk {chunk}")
        self._fresh[chunk] = (off, n)
        self._set_entry(chunk, pack_entry(digest, off, n, kind))

    # -- committing ----------------------------------------------------------------------

    def _write_tree(self) -> TreeRef:
        """Write dirty level-1 pages and every page above them; returns the new top.

        Bottom-up as a stream: each level's rewritten nodes come in ascending order, so a
        parent is written as soon as its last rewritten child is, and memory holds one
        parent per level, not a pointer per rewritten page (a first push rewrites every
        page: 25 MiB per TiB, issue 16)."""
        shape, base = self.shape, self.base.shape
        if shape.chunks == 0:
            return TreeRef(0)
        if not self._dirty and shape == base:
            return self._base_ref
        nodes: Iterator[tuple[int, bytes]] = self._write_pages()
        for level in range(2, shape.top_level + 1):
            nodes = self._write_parents(level, nodes)
        top = dict(nodes)  # the top, when it was rewritten
        # an unchanged top is still the base's node of that level (which may not be its top)
        e = unpack_entry(top.get(0) or self._base_pointer(shape.top_level, 0), 0)
        return TreeRef(shape.size, e.offset, e.length, e.hash)

    def _reshaped(self, level: int) -> range:
        """Nodes of ``level`` whose covered range differs from the base tree's (its last
        one, and those of grown space): rewritten even with no changed child."""
        shape, base = self.shape, self.base.shape
        lo = max(min(base.count(level), shape.count(level)) - 1, 0)
        for j in range(lo, shape.count(level)):
            if j >= base.count(level) or base.chunk_range(level, j) != shape.chunk_range(
                    level, j):
                return range(j, shape.count(level))
        return range(0)

    def _write_pages(self) -> Iterator[tuple[int, bytes]]:
        """Write the changed level-1 pages in ascending order; yields (index, pointer)."""
        reshaped = self._reshaped(1)
        dirty = sorted(j for j in self._dirty if j not in reshaped)
        for j in heapq.merge(dirty, reshaped):
            entries = self._page_entries(j)
            off, n = self._store.write(encode_page(1, entries), "index page")
            yield j, pack_entry(node_hash_packed(entry_digests(entries)), off, n, Kind.PAGE)

    def _write_parents(self, level: int,
                       children: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        """Write the ``level`` pages above the rewritten ``children`` (ascending) and the
        reshaped ones; yields (index, pointer) in ascending order."""
        shape, f = self.shape, self.fanout
        reshaped = self._reshaped(level)

        def parent_of(child: tuple[int, bytes]) -> int:
            return child[0] // f

        groups = ((j, list(g)) for j, g in itertools.groupby(children, key=parent_of))
        # a reshaped parent without rewritten children is a group of none
        extra: Iterator[tuple[int, list[tuple[int, bytes]]]] = ((j, []) for j in reshaped)
        last = -1
        for j, group in heapq.merge(groups, extra, key=lambda g: g[0]):
            rebuilt = dict(group)
            if j == last:  # a reshaped parent that had rewritten children: written already
                assert not rebuilt
                continue
            last = j
            entries = bytearray()
            for k in shape.children(level, j):
                e = rebuilt.get(k)
                entries += e if e is not None else self._base_pointer(level - 1, k)
            off, n = self._store.write(encode_page(level, entries), "index page")
            yield j, pack_entry(node_hash_packed(entry_digests(entries)), off, n, Kind.PAGE)

    def _base_pointer(self, level: int, index: int) -> bytes:
        """Packed pointer to an unchanged base node, from its parent page or the base top."""
        if level == self.base.shape.top_level:
            r = self._base_ref
            return pack_entry(r.hash, r.offset, r.length, Kind.PAGE)
        f = self.fanout
        page = self.base.page(level + 1, index // f)
        k = index % f
        return bytes(page[k * ENTRY_SIZE : (k + 1) * ENTRY_SIZE])

    def _publish(self, table: GenTable) -> None:
        """Write two copies of the table (own sectors each), fsync, then superblock slot 0
        naming copy A, fsync, then slot 1 naming copy B, fsync. Once this returns, one damaged
        sector anywhere leaves an intact copy of this commit; a crash in between leaves slot 0
        at this commit or both at the previous one."""
        blob = table.encode()
        copies = [self._store.write(blob, "generation table", align=SECTOR)[0] for _ in range(2)]
        counter = self._counter + 1
        try:
            self._store.sync()
            for slot, at in zip(SUPERBLOCK_SLOTS, copies, strict=True):
                sb = Superblock(self.chunk_size, self.fanout, counter, at, len(blob),
                                checksum(blob), FLAG_MIRRORED, table.version)
                self._torn_publish = True
                self._store.write_head(slot, sb.encode())
                self._store.sync()
        except OSError as e:
            raise from_oserror(e, f"committing {self.path}") from None
        self._torn_publish = False
        self._store.settle()  # all of it is referenced now
        self._counter = counter
        self._table = table

    @property
    def table(self) -> GenTable:
        """The generation table this transaction would publish on top of."""
        return self._table

    def publish(self, table: GenTable) -> None:
        """Publish ``table`` as it is, with nothing new written (``Image.repair``)."""
        self._check_open()
        self._publish(table)

    def _record(self, number: int, source: str, meta: dict[str, Any],
                seal: str = "") -> GenRecord:
        ref = self._write_tree()
        root = root_hash(ref.size, self.chunk_size, self.fanout, ref.hash)
        now = time.time()
        if self._table.encryption is not None:
            # an encrypted image keeps the source and metadata only inside the seal (a
            # checkpoint keeps its structural counts)
            if number and not seal:
                codec = self.codec
                if not isinstance(codec, SealedCodec):
                    raise UsageError(f"committing to {self.path} needs its key (it is "
                                     f"encrypted)")
                seal = codec.seal(number, root, {"source": source, "time": now, "meta": meta})
            source, meta = "", meta if not number else {}
        return GenRecord(number, now, ref, root, source, meta, seal)

    def checkpoint(self, source: str = "", meta: dict[str, Any] | None = None) -> None:
        """Make what was written so far durable as a resumable checkpoint (not current)."""
        self._check_open()
        rec = self._record(0, source, dict(meta or {}))
        self._publish(replace(self._table, checkpoint=rec))
        self._base_ref = rec.tree
        self.base = TreeView(self._store, rec.tree, self.chunk_size, self.fanout)
        self._base_limit = self.shape.chunks  # the checkpoint tree has the current shape
        self._dirty.clear()
        self._fresh.clear()

    def commit(
        self,
        source: str = "",
        meta: dict[str, Any] | None = None,
        keep: int | Retention = DEFAULT_KEEP,
        expect_root: bytes | None = None,
        seal: str = "",
        *,
        new_generation: bool = True,
    ) -> GenerationInfo:
        """Make the new generation current, pruning what the retention policy ``keep`` (an
        int: the newest N) does not keep; ``pruned`` then names them.

        With ``expect_root`` nothing is published unless the new tree's root equals it (the
        pages written for the check lie in free space and cost nothing to drop). An
        encrypted image's generation carries ``seal``, made by the client that has the key
        (or made here when this image was opened with it). Without ``new_generation``,
        content equal to the newest generation's commits no generation: that generation's
        metadata records the run instead (``last_checked``, ``checks`` and ``meta``), so an
        unchanged push does not push history out (``unchanged`` is then True). That is still
        a whole commit (two tables, two superblocks, three fsyncs).
        """
        self._check_open()
        policy = retention_of(keep)
        t = self._table
        rec = self._record(t.next_number, source, dict(meta or {}), seal)
        if expect_root is not None and rec.root_hash != expect_root:
            raise DataError(
                f"new root hash {rec.root_hash.hex()[:16]}… differs from the source's "
                f"{expect_root.hex()[:16]}…; nothing committed"
            )
        newest = t.generations[-1] if t.generations else None
        next_number = t.next_number + 1
        if (not new_generation and newest is not None and newest.root_hash == rec.root_hash
                and newest.tree.size == rec.tree.size):
            # nothing new references what this transaction wrote (a resumed checkpoint's
            # chunks, the pages just written for the check): give it back now
            self._store.give_back()
            checks = newest.meta.get("checks")
            rec = replace(newest, meta={
                **newest.meta, **rec.meta, "last_checked": rec.time,
                "checks": (checks if isinstance(checks, int) else 0) + 1})
            gens = (*t.generations[:-1], rec)
            next_number = t.next_number
            self.unchanged = True
        else:
            gens = (*t.generations, rec)
        kept, cut = _retain(gens, policy)
        self._publish(replace(t, generations=kept, zombies=t.zombies + cut, checkpoint=None,
                             next_number=next_number))
        self.pruned = tuple(r.number for r in cut)
        self.close()
        return _info(rec)

    def commit_prune(self, keep: int | Retention) -> list[int]:
        """Publish a table that keeps only what the policy ``keep`` keeps (no new one)."""
        t = self._table
        kept, cut = _retain(t.generations, retention_of(keep))
        if cut:
            self._publish(replace(t, generations=kept, zombies=t.zombies + cut))
        return [r.number for r in cut]

    def abort(self) -> None:
        """Drop everything written since the last checkpoint (nothing references it)."""
        self.close()

    def _give_back(self) -> None:
        """Return what this transaction wrote since its last publish to the filesystem: a
        failed push (a full disk above all) must not keep the space until the next push."""
        if not self._torn_publish:  # else a failed superblock write may name our last table
            self._store.give_back()

    def _check_open(self) -> None:
        if self._closed:
            raise LocalError("transaction already finished")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._give_back()
            self._store.close()  # releases the writer lock

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
