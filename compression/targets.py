"""Push targets: the stores a sync writes into, and the one rule set that picks a path's store.

Both wire formats write through this module. The native protocol drives :class:`ImageStore`
(digests straight from the image's index, chunks written copy-on-write into a transaction that
checkpoints now and then and commits atomically) and :class:`RawStore` (a raw file or block
device: digests computed by reading it on two threads while the source scans, chunks written
in place); the Go protocol's read-modify-write adapter (``compression/go_target.py``) opens
its files with the same helpers. Values in, values out: the protocols translate their own
messages, so nothing here knows a wire format.

:func:`plan_target` is the rule set for what a target path becomes, shared by both
protocols; :class:`TargetRules` names the two places where the Go protocol, to do what the
Go tool does, differs (an ``SPGZ0001`` file is converted, another non-empty file is updated
raw). A directory means ``DIR/<name>.spgz`` for an image and ``DIR/<name>`` for a raw target
(``--raw-target``).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from diskrsync.base.errors import (
    BusyError,
    DataError,
    DiskrsyncError,
    LocalError,
    PeerError,
    UsageError,
    from_oserror,
    stat_or_none,
)
from diskrsync.base.merkle import (
    HASH_SIZE,
    Shape,
    leaf_hash,
    node_hash_packed,
    root_from_leaves,
    root_hash,
    zero_hash,
)
from diskrsync.base.parallel import ordered_map
from diskrsync.base.retention import Retention
from diskrsync.base.units import human
from diskrsync.compression import codec
from diskrsync.compression.codec import Kind
from diskrsync.compression.container import sniff
from diskrsync.compression.destination import check_push_target, open_dest
from diskrsync.compression.format import (
    DEFAULT_CHUNK,
    DEFAULT_FANOUT,
    MAX_CHUNK,
    MIN_CHUNK,
    page_length,
)
from diskrsync.compression.image import (
    Image,
    Transaction,
    TreeView,
    fsync_dir,
    punch_hole,
    remove_stale_temps,
    take_writer_lock,
)

PAGE_BATCH = 4096  # level-1 digests per batch handed to send_page_hashes' sink
CHECKPOINT_BYTES = 1 << 30
CHECKPOINT_SECONDS = 60.0
# changed index pages held in memory before a checkpoint: what a first push of scattered
# data holds at most besides its fixed costs (issue 16: under 150 MiB at any disk size)
DIRTY_INDEX_BYTES = 64 << 20
DEFAULT_MAX_SIZE = 64 << 40  # `--max-size`: the largest source a target accepts by default

#: ``emit(first page, packed level-1 digests)``: where a store's page digests go.
PageSink = Callable[[int, bytes], None]


def check_chunk_size(cs: int) -> int:
    """``cs`` (0: the default) if it is a chunk size an image can have."""
    cs = cs or DEFAULT_CHUNK
    if not (MIN_CHUNK <= cs <= MAX_CHUNK and cs & (cs - 1) == 0):
        raise UsageError(f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}, "
                         f"not {cs}")
    return cs


#: What a first push stores beyond its chunks (index pages, tables), per chunk and in all.
INDEX_BYTES_PER_CHUNK = 64
SPACE_SLACK = 64 << 10  # superblocks, tables, the last page


@dataclass(frozen=True)
class SpaceEstimate:
    """What a first push of the source will store (``sources.space_estimate``, sent in the
    source's Hello): in an image, in a raw target, and how many bytes the guess read."""

    stored: int
    raw: int
    sampled: int

    @classmethod
    def from_info(cls, value: Any) -> SpaceEstimate | None:
        """The estimate a peer sent, or None when it sent none or nonsense."""
        if not isinstance(value, dict):
            return None
        got = [value.get(k) for k in ("stored", "raw", "sampled")]
        if not all(type(v) is int and 0 <= v < 1 << 63 for v in got):
            return None
        return cls(*got)  # type: ignore[arg-type]


def free_bytes(folder: str) -> int | None:
    """Bytes an unprivileged writer may still use in ``folder``'s filesystem (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_space(path: str, needed: int, est: SpaceEstimate, what: str) -> None:
    """Refuse a first push that will not fit, before anything is written: a full disk
    half-way through costs the time and leaves the space taken until the next writer."""
    folder = os.path.dirname(os.path.abspath(path))
    free = free_bytes(folder)
    if free is None or needed <= free:
        return
    how = (f"from {human(est.sampled)} sampled, compressed as it will be" if est.sampled
           else "the source's size")
    raise LocalError(f"not enough space for {what} {path}: about {human(needed)} needed "
                     f"(estimated {how}), {human(free)} free in {folder}; nothing was "
                     f"written")


@dataclass(frozen=True)
class TargetOptions:
    keep: int | Retention = 2  # the retention policy a commit applies (an int: the newest N)
    # commit a new generation even when the content equals the newest one (else that one
    # records the run in its metadata and no retention slot is used)
    always_new_generation: bool = False
    dry_run: bool = False
    checkpoint_bytes: int = CHECKPOINT_BYTES
    checkpoint_seconds: float = CHECKPOINT_SECONDS
    nofollow: bool = False  # never open the target through a symlink (a restricted serve)
    max_size: int = DEFAULT_MAX_SIZE  # a larger source is refused before anything is opened


class StoredCounts:
    """Which chunks a store wrote, as sorted disjoint runs of indexes: a chunk sent twice
    counts once, and chunks arriving in order (the usual case) cost one run in all."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []  # exclusive

    def add(self, index: int) -> None:
        """Count chunk ``index`` as written."""
        starts, ends = self._starts, self._ends
        if ends and starts[-1] <= index:  # in order: extend or start the last run
            if index < ends[-1]:
                return
            if index == ends[-1]:
                ends[-1] += 1
            else:
                starts.append(index)
                ends.append(index + 1)
            return
        i = bisect.bisect_right(starts, index) - 1
        if i >= 0 and index < ends[i]:
            return
        joins_left = i >= 0 and ends[i] == index
        joins_right = i + 1 < len(starts) and starts[i + 1] == index + 1
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] += 1
        elif joins_right:
            starts[i + 1] = index
        else:
            starts.insert(i + 1, index)
            ends.insert(i + 1, index + 1)

    @property
    def chunks(self) -> int:
        """How many distinct chunks were written."""
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def byte_ranges(self, shape: Shape) -> Iterator[tuple[int, int]]:
        """The written runs as (offset, length) in bytes of a disk of ``shape``."""
        for s, e in zip(self._starts, self._ends, strict=True):
            off = s * shape.chunk_size
            yield off, min(e * shape.chunk_size, shape.size) - off


@dataclass(frozen=True)
class StoreResult:
    """How a store finished: the generation (0: raw or dry run), the root it holds now,
    what to tell the source, and which chunks it wrote."""

    generation: int
    root: bytes
    info: dict[str, Any]
    stored: StoredCounts


class ImageStore:
    """Target is a diskrsync image: digests from the index, writes into a transaction."""

    def __init__(self, path: str, size: int, chunk_size: int, opts: TargetOptions, *,
                 source: str = "", encrypt: dict[str, Any] | None = None,
                 source_encrypts: bool = False, label: str = "",
                 source_host: str = "") -> None:
        """``encrypt``: the source's new key (public parts) for a new image; an existing
        encrypted image keeps its own. ``source_encrypts``: the source can push into an
        encrypted image (its Hello lists the capability); an older one is refused."""
        self.path = path
        self.opts = opts
        self.tx: Transaction | None = None
        self._img: Image | None = None
        self.source = source
        self.label, self.source_host = label, source_host
        st = stat_or_none(path, "cannot open")
        check_push_target(path, st)
        self._size = size
        self._first = False  # a first push: the source's estimate is checked (check_space)
        self._made = ""  # "new": this push created the file; "in_place": it was empty

        if st is not None and st.st_size > 0:
            img = Image.open(path, nofollow=opts.nofollow)  # opaque when encrypted: no key here
            if img.encrypted and not source_encrypts:
                img.close()
                raise UsageError(f"{path} is encrypted, and the source's diskrsync cannot "
                                 f"encrypt: upgrade it")
            if encrypt is not None and not img.encrypted:
                img.close()
                raise UsageError(f"{path} is an unencrypted image: --encrypt cannot apply to "
                                 f"it (`diskrsync convert --encrypt` makes an encrypted copy)")
            self._first = not (img.generations() or img.table.checkpoint)
            if not opts.dry_run:
                remove_stale_temps(path)  # e.g. a new image's, after a power cut
        elif opts.dry_run:
            img = None
        else:
            self._first = True
            self._made = "new" if st is None else "in_place"
            # an empty file holds nothing to lose, but it is someone's: it becomes the image
            # in place, keeping its inode, owner and mode
            img = Image.create(path, chunk_size=check_chunk_size(chunk_size), fanout=DEFAULT_FANOUT,
                               in_place=st is not None, nofollow=opts.nofollow,
                               encryption=encrypt)
        self._img = img
        self.encrypted = img.encrypted if img is not None else encrypt is not None
        self.chunk_size = img.chunk_size if img else check_chunk_size(chunk_size)
        self.fanout = img.fanout if img else DEFAULT_FANOUT
        # the path tells a client that pushed here encrypted before that this is the place
        self.info: dict[str, Any] = {"kind": "image", "path": os.path.abspath(path)}
        if img is not None and img.generations():
            # a source smaller than this is warned about (it shrinks the backup)
            self.info["previous_size"] = img.generations()[-1].size
        if self._first and not opts.dry_run:
            self.info["space_check"] = True  # the source sends an Estimate before any chunk
        if img is None:
            self.base = TreeView.empty(self.chunk_size, self.fanout)
        elif opts.dry_run:
            self._snap = img.snapshot() if img.generations() else None
            self.base = self._snap.tree if self._snap else TreeView.empty(
                self.chunk_size, self.fanout)
        else:
            self.tx = img.begin()
            self.base = self.tx.base
            self.info["resumed"] = self.tx.resumed_from is not None
            try:
                self.tx.resize(size)
            except BaseException:
                self.close()
                raise
        self.base_size = self.base.shape.size
        # the newest generation and the map of changed ranges it was pushed with: a source
        # trusts its own map only when it is relative to that generation
        gens = self.tx.table.generations if self.tx is not None else (
            [self._snap.info] if img is not None and self._snap is not None else [])
        self.info["generation"] = gens[-1].number if gens else 0
        if gens and isinstance(gens[-1].meta.get("change_base"), dict):
            self.info["change_base"] = gens[-1].meta["change_base"]
        shape = self.base.shape
        top = self.base.ref.hash if shape.chunks else b""
        self.info["root"] = root_hash(shape.size, shape.chunk_size, shape.fanout, top).hex()
        if img is not None and img.encrypted:
            # what the source needs to hash, encrypt and seal: the key's public parts, the
            # number this push's generation will get, and the newest generation's seal
            table = self.tx.table if self.tx is not None else img.table
            self.info["encryption"] = table.encryption
            self.info["next_generation"] = table.next_number
            if table.generations:
                rec = table.generations[-1]
                self.info["newest"] = {"number": rec.number, "root": rec.root_hash.hex(),
                                       "seal": rec.seal}
        elif encrypt is not None:  # a dry run into a new image
            self.info["encryption"] = encrypt
            self.info["next_generation"] = 1
        self._since_cp = 0
        self._cp_time = time.monotonic()
        self._written = 0
        self._written_at_cp = 0
        self.stored = StoredCounts()
        self._pages_since_cp: set[int] = set()  # level-1 pages a checkpoint would rewrite

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"checkpoint": True, "chunks_written": self._written}

    def _checkpoint_pays(self) -> bool:
        """A checkpoint writes the index pages that changed, every page of grown space
        included; take one only when the data it saves outweighs them, so that a peer who
        announces a huge size and sends a chunk cannot make the image store an index of
        nothing (1 TiB of grown space is about 390 MiB of index at 128 KiB chunks)."""
        assert self.tx is not None
        grown = max(self.tx.shape.count(1) - self.tx.base.shape.count(1), 0)
        pages = len(self._pages_since_cp) + grown
        return self._since_cp >= pages * page_length(self.fanout)

    def _checkpoint(self) -> None:
        assert self.tx is not None
        self.tx.checkpoint(source=self.source, meta=self._checkpoint_meta())
        self._since_cp = 0
        self._cp_time = time.monotonic()
        self._written_at_cp = self._written
        self._pages_since_cp.clear()

    def send_page_hashes(self, emit: PageSink) -> None:
        # a batch at a time, as the index is walked: never every digest at once
        start, batch = 0, []
        for digest in self.base.iter_node_hashes(1):
            batch.append(digest)
            if len(batch) == PAGE_BATCH:
                emit(start, b"".join(batch))
                start, batch = start + len(batch), []
        if batch:
            emit(start, b"".join(batch))

    def leaf_hashes(self, page: int) -> bytes:
        if page >= self.base.shape.count(1):
            return b""
        return b"".join(self.base.leaf_hashes(page))

    def put(self, index: int, kind: int, digest: bytes, payload: bytes) -> None:
        if self.tx is None:
            raise PeerError("the source sent data in a dry run")
        length = self.tx.shape.chunk_length(index)
        self.tx.put_chunk(index, Kind(kind), payload, digest, length)
        self._since_cp += len(payload)
        self._written += 1
        self.stored.add(index)
        self._pages_since_cp.add(index // self.fanout)
        o = self.opts
        if (self._since_cp >= o.checkpoint_bytes or (
            self._since_cp and time.monotonic() - self._cp_time >= o.checkpoint_seconds
        )) and self._checkpoint_pays():
            self._checkpoint()
        elif len(self._pages_since_cp) * page_length(self.fanout) >= DIRTY_INDEX_BYTES:
            # zero chunks scattered one per page carry no payload but each holds a page in
            # memory until a checkpoint writes it: bound that memory
            self._checkpoint()

    def finish(self, root: bytes, info: dict[str, Any]) -> StoreResult:
        if self.tx is None:
            return StoreResult(0, bytes.fromhex(self.info["root"]), {"dry_run": True},
                               self.stored)
        meta = {k: v for k, v in info.items()
                if v and k not in ("dry_run", "seal", "source", "new_generation")}
        seal = str(info.get("seal", ""))
        # a source names itself in Done (older ones did in their Hello: self.source); the
        # target end of a pull says which host, or --label names it
        said = str(info.get("source") or self.source)
        source = self.label or (f"{self.source_host}:{said}" if self.source_host else said)
        if self.encrypted and not seal:
            raise PeerError("the source sent no sealed record for a generation of an "
                            "encrypted image")
        # a run that read zeros for unreadable sectors, or saw the source change, is a
        # generation of its own even when its content looks the same
        new_generation = self.opts.always_new_generation or bool(
            meta.get("read_errors") or meta.get("source_changed_chunks")
            or info.get("new_generation") is True)  # (an encrypted push keeps those sealed)
        tx = self.tx
        gen = tx.commit(source=source, meta=meta, keep=self.opts.keep, expect_root=root,
                        seal=seal if self.encrypted else "", new_generation=new_generation)
        self.tx = None
        return StoreResult(gen.number, gen.root_hash,
                           {"path": self.path, "unchanged": tx.unchanged,
                            "pruned": list(tx.pruned)}, self.stored)

    def check_space(self, info: dict[str, Any]) -> None:
        """A first push's estimate (the source's ``Estimate``, before any chunk): refused
        when it will not fit, and then the image this push made is undone (removed, or the
        empty file it was made in emptied again), so nothing is left written."""
        est = SpaceEstimate.from_info(info)
        if est is None or not self._first or self.opts.dry_run:
            return
        needed = est.stored + -(-self._size // self.chunk_size) * INDEX_BYTES_PER_CHUNK \
            + SPACE_SLACK
        try:
            check_space(self.path, needed, est, "a first push into")
        except LocalError:
            self._undo_create()
            raise

    def _undo_create(self) -> None:
        made, self._made = self._made, ""
        self.close()
        if made:
            with contextlib.suppress(OSError):
                if made == "new":
                    os.unlink(self.path)
                    fsync_dir(self.path)
                else:
                    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if self.opts.nofollow
                                                         else 0)
                    fd = os.open(self.path, flags)
                    try:
                        os.ftruncate(fd, 0)
                        os.fsync(fd)
                    finally:
                        os.close(fd)

    def abort(self, save: bool) -> None:
        if self.tx is not None:
            if save and self._written > self._written_at_cp and self._checkpoint_pays():
                with contextlib.suppress(DiskrsyncError, OSError):
                    self._checkpoint()
            self.tx.abort()
        self.close()

    def close(self) -> None:
        if self.tx is not None:
            self.tx.abort()
        self.tx = None
        snap = getattr(self, "_snap", None)
        if snap is not None:
            snap.close()
            self._snap = None
        if self._img is not None:
            self._img.close()
            self._img = None


class RawStore:
    """Target is a raw file or block device, updated in place.

    Its digests are computed by reading it on two threads while the source scans; a regular
    file is first cut or extended to the source's size, so the digests compared are those of
    ``min(old size, new size)`` and grown space starts as zeros (holes).
    """

    def __init__(self, path: str, size: int, chunk_size: int, opts: TargetOptions) -> None:
        self.path = path
        self.opts = opts
        self.chunk_size = check_chunk_size(chunk_size)
        self.fanout = DEFAULT_FANOUT
        self.stored = StoredCounts()
        self.fd, self.is_file, self.created = open_raw(path, write=not opts.dry_run,
                                                       nofollow=opts.nofollow)
        try:
            self._setup(size)
        except BaseException:
            os.close(self.fd)
            raise

    def _setup(self, new: int) -> None:
        fd = self.fd
        old = os.lseek(fd, 0, os.SEEK_END)
        if not self.is_file and new > old:
            raise UsageError(f"{self.path} holds {old} bytes, the source has {new}")
        if self.is_file and not self.opts.dry_run and new != old:
            try:
                os.ftruncate(fd, new)
            except OSError as e:
                raise from_oserror(e, f"resizing {self.path}") from None
        self.base_size = min(old, new)
        self.base = Shape(self.base_size, self.chunk_size, self.fanout)
        self.new = Shape(new, self.chunk_size, self.fanout)
        # digests of the content as it will be: computed for the base, zeros beyond it
        self.leaves = bytearray(HASH_SIZE * self.new.chunks)
        for c in range(self.base.chunks, self.new.chunks):
            self._set_leaf(c, zero_hash(self.new.chunk_length(c)))
        self._pages_ready = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self.info: dict[str, Any] = {"kind": "raw", "previous_size": old}
        if self.created and not self.opts.dry_run:
            self.info["space_check"] = True  # the source sends an Estimate before any chunk

    def _set_leaf(self, c: int, digest: bytes) -> None:
        self.leaves[c * HASH_SIZE : (c + 1) * HASH_SIZE] = digest

    def send_page_hashes(self, emit: PageSink) -> None:
        threading.Thread(target=self._hash_all, args=(emit,), daemon=True,
                         name="raw-target-hash").start()

    def _hash_all(self, emit: PageSink) -> None:
        base = self.base
        try:
            def hash_page(j: int) -> list[bytes]:
                a, b = base.chunk_range(1, j)
                cs = self.chunk_size
                data = os.pread(self.fd, min(b * cs, base.size) - a * cs, a * cs)
                out = []
                for c in range(a, b):
                    piece = data[(c - a) * cs : (c - a) * cs + base.chunk_length(c)]
                    out.append(zero_hash(len(piece)) if codec.is_zero(piece)
                               else leaf_hash(piece))
                return out

            pending: list[bytes] = []
            for j, digests in enumerate(ordered_map(hash_page, range(base.count(1)))):
                a = j * self.fanout
                self.leaves[a * HASH_SIZE : (a + len(digests)) * HASH_SIZE] = b"".join(digests)
                pending.append(node_hash_packed(b"".join(digests)))
                with self._cv:
                    self._pages_ready = j + 1
                    self._cv.notify_all()
                if len(pending) >= 64 or j + 1 == base.count(1):
                    emit(j + 1 - len(pending), b"".join(pending))
                    pending = []
        except BaseException as e:
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def leaf_hashes(self, page: int) -> bytes:
        if page >= self.base.count(1):
            return b""
        with self._cv:
            while self._pages_ready <= page:
                if self._error is not None:
                    raise LocalError(f"reading {self.path}: {self._error}")
                self._cv.wait(0.5)
        a, b = self.base.chunk_range(1, page)
        return bytes(self.leaves[a * HASH_SIZE : b * HASH_SIZE])

    def put(self, index: int, kind: int, digest: bytes, payload: bytes) -> None:
        if self.opts.dry_run:
            raise PeerError("the source sent data in a dry run")
        length = self.new.chunk_length(index)
        off = index * self.chunk_size
        try:
            if kind == Kind.ZERO:
                done = self.is_file and punch_hole(self.fd, off, length)
                if not done:
                    os.pwrite(self.fd, codec.zeros(length), off)
                elif length % 4096:  # the last, short chunk's tail is not a whole block
                    tail = length - length % 4096
                    os.pwrite(self.fd, codec.zeros(length - tail), off + tail)
            else:
                os.pwrite(self.fd, codec.decode(kind, payload, length), off)
        except OSError as e:
            raise from_oserror(e, f"writing {self.path}") from None
        except ValueError as e:
            raise PeerError(f"chunk {index} from the source does not decode: {e}") from None
        self._set_leaf(index, digest)
        self.stored.add(index)

    def finish(self, root: bytes, info: dict[str, Any]) -> StoreResult:
        with self._cv:
            while self._pages_ready < self.base.count(1) and self._error is None:
                self._cv.wait(0.5)
        mine = root_from_leaves(self.new, self.leaves)
        if self.opts.dry_run:
            return StoreResult(0, mine, {"dry_run": True}, self.stored)
        if mine != root:
            raise DataError(f"{self.path} does not match the source after the push "
                            f"(root {mine.hex()[:16]}… vs {root.hex()[:16]}…)")
        try:
            os.fsync(self.fd)
            if self.created:
                fsync_dir(self.path)  # else a power cut may lose the new file's name
        except OSError as e:
            raise from_oserror(e, f"flushing {self.path}") from None
        return StoreResult(0, mine, {"path": self.path}, self.stored)

    def check_space(self, info: dict[str, Any]) -> None:
        """A new raw file: refused when the source's estimate will not fit (the file is then
        removed by ``abort``)."""
        est = SpaceEstimate.from_info(info)
        if est is not None and self.created and not self.opts.dry_run:
            check_space(self.path, est.raw + SPACE_SLACK, est, "a new raw file")

    def abort(self, save: bool) -> None:
        """A file this push created is removed after a failure of ours (a full disk: it
        would keep the space); after a broken link (``save``) it stays, so the next push
        resumes from what arrived."""
        if self.created and not save and self.fd >= 0:
            with contextlib.suppress(OSError):
                if os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- opening a target's files (shared with the Go adapter) --------------------------------


def open_raw(path: str, *, write: bool = True, nofollow: bool = False) -> tuple[int, bool, bool]:
    """Open a raw target: (fd, whether it is a regular file, whether this call created it).
    A missing file is created when writing; a writer's lock keeps a second push out."""
    fd, st, created = open_dest(path, write=write, create=write, nofollow=nofollow)
    try:
        is_file = stat.S_ISREG(st.st_mode)
        if not is_file and not stat.S_ISBLK(st.st_mode):
            raise UsageError(f"{path} is neither a regular file nor a block device")
        if write and not take_writer_lock(fd):
            raise BusyError(f"{path} is being written by another push")
    except BaseException:
        os.close(fd)
        raise
    return fd, is_file, created


# -- the rule set ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRules:
    """Where the Go protocol's targets differ from the native ones, to act as the Go tool."""

    convert_spgz: bool = False  # an SPGZ0001 file is converted (else: refused)
    foreign_as_raw: bool = False  # another non-empty file is updated raw (else: refused)


NATIVE_RULES = TargetRules()
GO_RULES = TargetRules(convert_spgz=True, foreign_as_raw=True)

TargetKind = Literal["image", "empty", "new", "spgz", "raw", "foreign"]


@dataclass(frozen=True)
class TargetPlan:
    """What :func:`plan_target` decided: the final ``path``, what is there (``kind``: an
    image, an empty file, nothing, an SPGZ0001 file, a raw target, or another file to update
    raw) and its stat as it was when decided."""

    path: str
    kind: TargetKind
    st: os.stat_result | None

    @property
    def is_block(self) -> bool:
        return self.st is not None and stat.S_ISBLK(self.st.st_mode)


def target_path(path: str, name: str | None, *, raw: bool) -> str:
    """``path``, or for a directory ``DIR/<name>.spgz`` (``DIR/<name>`` when ``raw``);
    ``name`` is the source's (None when the protocol does not say it: then a directory is
    refused)."""
    if not os.path.isdir(path):
        return path
    if name is None:
        raise UsageError(f"{path} is a directory: give the target file's path")
    base = os.path.basename(name.rstrip("/")) or "disk"
    return os.path.join(path, base if raw else base + ".spgz")


def plan_target(path: str, *, raw: bool, rules: TargetRules = NATIVE_RULES,
                name: str | None = None) -> TargetPlan:
    """Decide what a push into ``path`` writes, refusing before anything is opened.

    A block device is updated in place; ``raw`` (``--raw-target``) updates a file in place;
    otherwise the target is an image (existing, an empty file made one in place, or new). An
    existing image or SPGZ0001 file is never overwritten with raw data, a file that is
    neither an image nor meant as a raw target is refused unless ``rules`` say otherwise, and
    so is anything that is not a regular file, a directory or a block device (a character
    device, a FIFO, a socket), which is left untouched.
    """
    path = target_path(path, name, raw=raw)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"target directory {folder} does not exist")
    st = stat_or_none(path, "cannot open")
    check_push_target(path, st)
    if st is not None and stat.S_ISBLK(st.st_mode):
        return TargetPlan(path, "raw", st)
    kind = sniff(path) if st is not None and st.st_size else None
    if kind == "spgz":
        if not rules.convert_spgz:
            raise UsageError(f"{path} is a Go SPGZ0001 file: convert it first with "
                             f"`diskrsync convert {path} NEW.spgz`"
                             + (" (--raw-target would overwrite it with raw data)"
                                if raw else ""))
        if raw:
            raise UsageError(f"{path} is an SPGZ0001 file; drop --raw-target to update it "
                             f"(it is then converted into a diskrsync image)")
        return TargetPlan(path, "spgz", st)
    if kind == "image":
        if raw:
            raise UsageError(f"{path} is a diskrsync image; drop --raw-target to update it")
        return TargetPlan(path, "image", st)
    if raw:
        return TargetPlan(path, "raw", st)
    if st is not None and st.st_size:
        if not rules.foreign_as_raw:
            raise UsageError(f"{path} exists and is not a diskrsync image; refusing to replace "
                             f"it (use --raw-target to update it as a raw file)")
        return TargetPlan(path, "foreign", st)
    return TargetPlan(path, "new" if st is None else "empty", st)


def open_target(path: str, size: int, chunk_size: int, opts: TargetOptions, *, raw: bool,
                name: str | None = None, source: str = "", encrypt: dict[str, Any] | None = None,
                source_encrypts: bool = False, label: str = "",
                source_host: str = "") -> ImageStore | RawStore:
    """The native protocol's store for ``path``, by :func:`plan_target`'s rules: a source
    of ``size`` bytes named ``name``, recorded in the generation as ``source``; ``encrypt``
    and ``source_encrypts`` as :class:`ImageStore` takes them."""
    plan = plan_target(path, raw=raw, name=name)
    if plan.kind == "raw":
        if encrypt is not None:
            raise UsageError(f"{plan.path} would be a raw target: --encrypt needs an image")
        return RawStore(plan.path, size, chunk_size, opts)
    return ImageStore(plan.path, size, chunk_size, opts, source=source, encrypt=encrypt,
                      source_encrypts=source_encrypts, label=label, source_host=source_host)
