"""The target side of a push: answer digests, store differing chunks, commit on a matching root.

Two stores: an image (digests straight from its index, chunks written copy-on-write into a
transaction that checkpoints now and then and commits atomically) and a raw file or block
device (digests computed by reading it on two threads while the source scans, chunks written
in place). ``serve_target`` runs the conversation for either over any channel.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from diskrsync import __version__
from diskrsync.base.errors import (
    BusyError,
    ConnectionClosed,
    DataError,
    DiskrsyncError,
    LocalError,
    PeerError,
    UsageError,
    error_from_wire,
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
from diskrsync.compression import codec
from diskrsync.compression.codec import Kind
from diskrsync.compression.container import sniff
from diskrsync.compression.destination import check_push_target, open_dest
from diskrsync.compression.format import (
    DEFAULT_CHUNK,
    DEFAULT_FANOUT,
    MAX_CHUNK,
    MIN_CHUNK,
    TreeRef,
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
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import Channel

PAGE_BATCH = 4096  # level-1 digests per PageHashes message
CHECKPOINT_BYTES = 1 << 30
CHECKPOINT_SECONDS = 60.0
DIRTY_INDEX_BYTES = 256 << 20  # changed index pages held in memory before a checkpoint


class TargetStore(Protocol):
    chunk_size: int
    fanout: int
    base_size: int
    info: dict[str, Any]

    def send_page_hashes(self, send: Callable[[p.Message], None]) -> None: ...

    def leaf_hashes(self, page: int) -> bytes: ...

    def put(self, index: int, kind: int, digest: bytes, payload: bytes) -> None: ...

    def finish(self, root: bytes, info: dict[str, Any]) -> p.Committed: ...

    def abort(self, save: bool) -> None:
        """Give up the push; with ``save``, keep what arrived as a checkpoint first."""
        ...

    def close(self) -> None:
        """Release files and locks (idempotent; called after finish or abort)."""
        ...


def _check_geometry(hello: p.Hello) -> int:
    cs = hello.chunk_size or DEFAULT_CHUNK
    if not (MIN_CHUNK <= cs <= MAX_CHUNK and cs & (cs - 1) == 0):
        raise UsageError(f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}, "
                         f"not {cs}")
    return cs


def _send_packed(send: Callable[[p.Message], None], digests: list[bytes]) -> None:
    for i in range(0, len(digests), PAGE_BATCH):
        send(p.PageHashes(i, b"".join(digests[i : i + PAGE_BATCH])))


@dataclass(frozen=True)
class TargetOptions:
    keep: int = 2
    dry_run: bool = False
    checkpoint_bytes: int = CHECKPOINT_BYTES
    checkpoint_seconds: float = CHECKPOINT_SECONDS
    nofollow: bool = False  # never open the target through a symlink (a restricted serve)
    max_size: int = p.DEFAULT_MAX_SIZE  # a larger source is refused before anything is opened


class ImageStore:
    """Target is a diskrsync image: digests from the index, writes into a transaction."""

    def __init__(self, path: str, hello: p.Hello, opts: TargetOptions) -> None:
        self.path = path
        self.opts = opts
        self.tx: Transaction | None = None
        self._img: Image | None = None
        self.source = str(hello.info.get("source", ""))
        st = stat_or_none(path, "cannot open")
        check_push_target(path, st)
        if st is not None and st.st_size > 0:
            img = Image.open(path, nofollow=opts.nofollow)
            if not opts.dry_run:
                remove_stale_temps(path)  # e.g. a new image's, after a power cut
        elif opts.dry_run:
            img = None
        else:
            # an empty file holds nothing to lose, but it is someone's: it becomes the image
            # in place, keeping its inode, owner and mode
            img = Image.create(path, chunk_size=_check_geometry(hello), fanout=DEFAULT_FANOUT,
                               in_place=st is not None, nofollow=opts.nofollow)
        self._img = img
        self.chunk_size = img.chunk_size if img else _check_geometry(hello)
        self.fanout = img.fanout if img else DEFAULT_FANOUT
        self.info: dict[str, Any] = {"hash": p.HASH, "caps": list(p.CAPABILITIES),
                                     "kind": "image"}
        if img is None:
            self.base = TreeView(-1, TreeRef(0), self.chunk_size, self.fanout)
        elif opts.dry_run:
            self._snap = img.snapshot() if img.generations() else None
            self.base = self._snap.tree if self._snap else TreeView(
                -1, TreeRef(0), self.chunk_size, self.fanout)
        else:
            self.tx = img.begin()
            self.base = self.tx.base
            self.info["resumed"] = self.tx.resumed_from is not None
            try:
                self.tx.resize(hello.size)
            except BaseException:
                self.close()
                raise
        self.base_size = self.base.shape.size
        shape = self.base.shape
        top = self.base.ref.hash if shape.chunks else b""
        self.info["root"] = root_hash(shape.size, shape.chunk_size, shape.fanout, top).hex()
        self._since_cp = 0
        self._cp_time = time.monotonic()
        self._written = 0
        self._written_at_cp = 0
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

    def send_page_hashes(self, send: Callable[[p.Message], None]) -> None:
        _send_packed(send, self.base.node_hashes(1))

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

    def finish(self, root: bytes, info: dict[str, Any]) -> p.Committed:
        if self.tx is None:
            return p.Committed(0, bytes.fromhex(self.info["root"]), {"dry_run": True})
        meta = {k: v for k, v in info.items() if v and k != "dry_run"}
        gen = self.tx.commit(source=self.source, meta=meta, keep=self.opts.keep,
                             expect_root=root)
        self.tx = None
        return p.Committed(gen.number, gen.root_hash, {"path": self.path})

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

    def __init__(self, path: str, hello: p.Hello, opts: TargetOptions) -> None:
        self.path = path
        self.opts = opts
        self.chunk_size = _check_geometry(hello)
        self.fanout = DEFAULT_FANOUT
        self.fd, _st, self.created = open_dest(path, write=not opts.dry_run,
                                           create=not opts.dry_run, nofollow=opts.nofollow)
        try:
            self._setup(hello)
        except BaseException:
            os.close(self.fd)
            raise

    def _setup(self, hello: p.Hello) -> None:
        fd = self.fd
        st = os.fstat(fd)
        self.is_file = stat.S_ISREG(st.st_mode)
        if not self.is_file and not stat.S_ISBLK(st.st_mode):
            raise UsageError(f"{self.path} is neither a regular file nor a block device")
        if not self.opts.dry_run and not take_writer_lock(fd):
            raise BusyError(f"{self.path} is being written by another push")
        old = os.lseek(fd, 0, os.SEEK_END)
        new = hello.size
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
        self.info: dict[str, Any] = {"hash": p.HASH, "caps": list(p.CAPABILITIES),
                                     "kind": "raw"}

    def _set_leaf(self, c: int, digest: bytes) -> None:
        self.leaves[c * HASH_SIZE : (c + 1) * HASH_SIZE] = digest

    def send_page_hashes(self, send: Callable[[p.Message], None]) -> None:
        threading.Thread(target=self._hash_all, args=(send,), daemon=True,
                         name="raw-target-hash").start()

    def _hash_all(self, send: Callable[[p.Message], None]) -> None:
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
                    send(p.PageHashes(j + 1 - len(pending), b"".join(pending)))
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

    def finish(self, root: bytes, info: dict[str, Any]) -> p.Committed:
        with self._cv:
            while self._pages_ready < self.base.count(1) and self._error is None:
                self._cv.wait(0.5)
        mine = root_from_leaves(self.new, self.leaves)
        if self.opts.dry_run:
            return p.Committed(0, mine, {"dry_run": True})
        if mine != root:
            raise DataError(f"{self.path} does not match the source after the push "
                            f"(root {mine.hex()[:16]}… vs {root.hex()[:16]}…)")
        try:
            os.fsync(self.fd)
            if self.created:
                fsync_dir(self.path)  # else a power cut may lose the new file's name
        except OSError as e:
            raise from_oserror(e, f"flushing {self.path}") from None
        return p.Committed(0, mine, {"path": self.path})

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


def open_store(path: str, hello: p.Hello, opts: TargetOptions, *, raw: bool) -> TargetStore:
    """Pick the store for ``path``: an image unless asked for raw or it is a block device.

    An existing file that is neither an image nor meant as a raw target is refused, never
    turned into something else; so is anything that is not a regular file, a directory or a
    block device (a character device, a FIFO, a socket), which is left untouched.
    """
    if os.path.isdir(path):
        name = os.path.basename(str(hello.info.get("name", "")).rstrip("/")) or "disk"
        path = os.path.join(path, name + ".spgz")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"target directory {folder} does not exist")
    st = stat_or_none(path, "cannot open")
    check_push_target(path, st)
    if st is not None and stat.S_ISBLK(st.st_mode):
        return RawStore(path, hello, opts)
    kind = sniff(path) if st is not None and st.st_size else None
    if kind == "spgz":
        raise UsageError(f"{path} is a Go SPGZ0001 file: convert it first with "
                         f"`diskrsync convert {path} NEW.spgz`"
                         + (" (--no-compress would overwrite it with raw data)" if raw else ""))
    if raw:
        if kind == "image":
            raise UsageError(f"{path} is a diskrsync image; drop --no-compress to update it")
        return RawStore(path, hello, opts)
    if st is not None and st.st_size and kind != "image":
        raise UsageError(f"{path} exists and is not a diskrsync image; refusing to replace "
                             f"it (use --no-compress to update it as a raw file)")
    return ImageStore(path, hello, opts)


# -- the conversation ------------------------------------------------------------------


class _Verifier:
    """Decodes and hashes received chunks on two threads, storing them in arrival order."""

    def __init__(self, store: TargetStore, chunk_length: Callable[[int], int],
                 enabled: bool) -> None:
        self.store = store
        self.chunk_length = chunk_length
        self.enabled = enabled
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="verify") if enabled else None
        self.pending: deque[Future[p.Chunk]] = deque()

    def _check(self, msg: p.Chunk) -> p.Chunk:
        try:
            length = self.chunk_length(msg.index)
        except IndexError:
            raise PeerError(f"the source sent chunk {msg.index}, outside the disk") from None
        if msg.kind == Kind.ZERO:
            ok = msg.digest == zero_hash(length) and not msg.payload
        else:
            try:
                ok = leaf_hash(codec.decode(msg.kind, msg.payload, length)) == msg.digest
            except ValueError as e:
                raise PeerError(f"chunk {msg.index} from the source does not decode: {e}") \
                    from None
        if not ok:
            raise PeerError(f"chunk {msg.index} from the source does not match its digest")
        return msg

    def add(self, msg: p.Chunk) -> None:
        if self.pool is None:
            self._store(msg)
            return
        self.pending.append(self.pool.submit(self._check, msg))
        while len(self.pending) > 16 or (self.pending and self.pending[0].done()):
            self._store(self.pending.popleft().result())

    def _store(self, msg: p.Chunk) -> None:
        self.store.put(msg.index, msg.kind, msg.digest, msg.payload)

    def drain(self) -> None:
        while self.pending:
            self._store(self.pending.popleft().result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def serve_target(channel: Channel, opener: Callable[[p.Hello], TargetStore], *,
                 verify: bool = True, max_size: int = p.DEFAULT_MAX_SIZE) -> p.Committed | None:
    """Run the target's side until the source's Done is committed (returns Committed), the
    source dry-ran (Committed with generation 0), or an error (raised, after telling the
    peer). A link lost mid-way keeps a checkpoint for the next push. A source larger than
    ``max_size`` is refused before the target is opened."""
    msg = channel.recv()
    if msg is None:
        raise ConnectionClosed("the source closed the connection before saying hello")
    if not isinstance(msg, p.Hello) or msg.role != "source":
        raise PeerError(f"expected the source's hello, got {type(msg).__name__}")
    store: TargetStore | None = None
    verifier: _Verifier | None = None
    committed = False
    try:
        p.check_peer(msg, ())
        if msg.size > max_size:
            raise PeerError(f"the source has {msg.size} bytes, more than the {max_size} this "
                            f"end accepts (--max-size)")
        store = opener(msg)
        channel.send(p.Hello("target", store.base_size, store.chunk_size, store.fanout,
                             f"diskrsync {__version__}", store.info))
        store.send_page_hashes(channel.send)
        shape = Shape(msg.size, store.chunk_size, store.fanout)
        verifier = _Verifier(store, shape.chunk_length, verify)
        while True:
            m = channel.recv()
            if m is None:
                raise ConnectionClosed("the source closed the connection before finishing")
            if isinstance(m, p.Chunk):
                if m.index >= shape.chunks:
                    raise PeerError(f"the source sent chunk {m.index}, outside the disk")
                verifier.add(m)
            elif isinstance(m, p.NeedLeaves):
                channel.send(p.Leaves(m.page, store.leaf_hashes(m.page)))
            elif isinstance(m, p.Done):
                verifier.drain()
                result = store.finish(m.root, m.info)
                committed = True
                channel.send(result)
                return result
            elif isinstance(m, p.Error):
                raise error_from_wire(m.kind, f"source: {m.message}")  # keeps its category
            else:
                raise PeerError(f"unexpected {type(m).__name__} from the source")
    except BaseException as e:
        with contextlib.suppress(Exception):  # the peer may be gone: then this just fails
            channel.send(p.Error(type(e).__name__, str(e)))
        if store is not None and not committed:
            # keep what arrived when the link broke or the source gave up, so the next push
            # resumes from it
            peer = isinstance(e, PeerError) or (isinstance(e, DiskrsyncError) and e.relayed)
            if verifier is not None and peer:
                with contextlib.suppress(Exception):
                    verifier.drain()
            store.abort(save=peer)
        raise
    finally:
        if verifier is not None:
            verifier.close()
        if store is not None:
            store.close()
        with contextlib.suppress(Exception):
            channel.close()
