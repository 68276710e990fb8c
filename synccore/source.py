"""The source side of a push: scan, compare against the target's tree, send what differs.

Design note
-----------
The source reads its disk once, sequentially, in batches of chunks hashed (and, where the target
has nothing to compare, compressed) on two worker threads. As each level-1 node ("page", fanout
chunks) completes, its digest is compared with the one the target streamed at the start. Equal
pages cost nothing more. A differing page sends ``NeedLeaves`` and the scan goes on; when the
target's leaf digests arrive, a small pool re-reads just the differing chunks, checks each
against the digest taken during the scan (a mismatch means the source is changing under us),
compresses and sends it. Nothing waits for a reply except the very end, so a push costs the
scan plus a constant number of round trips however many chunks differ, and every queue is
bounded, so memory does not grow with the link's speed or the disk's size (bar 32 bytes of
digest per chunk).

When the source is an image with the target's geometry, its index already holds every digest:
pages are compared without reading data at all, and differing chunks travel as stored, each
decoded and checked against its digest first (on the sender pool), so a damaged image stops the
push instead of passing its bad bytes on.

A read that fails (or comes back short: a disk returns the bytes before a bad sector and fails
the next read) is split in halves down to the reader's sector, so exactly the unreadable
sectors are found; with ``--ignore-read-errors`` they are sent as zeros and listed, otherwise
the first one stops the push. The scan and the re-read for sending share that logic.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from diskrsync import __version__
from diskrsync.base.errors import (
    CorruptChunkError,
    DataError,
    LocalError,
    PeerError,
    ReadError,
    UsageError,
)
from diskrsync.base.merkle import (
    HASH_SIZE,
    root_from_leaves,
    zero_hash,
)
from diskrsync.base.parallel import ordered_map
from diskrsync.compression import codec
from diskrsync.compression.codec import STANDARD, ChunkAt, ChunkCodec, Kind
from diskrsync.compression.crypto import (
    Envelope,
    KdfParams,
    Keyring,
    MasterKey,
    SealedCodec,
    SeenGenerations,
    encryption_entry,
)
from diskrsync.compression.format import DEFAULT_CHUNK, DEFAULT_FANOUT
from diskrsync.compression.sources import SourceReader, space_estimate
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import Channel
from diskrsync.synccore.conversation import (
    PagesKnown,
    SendChunks,
    SourceConversation,
    TargetReady,
    error_message,
)

BATCH_CHUNKS = 32  # at most this many chunks read and hashed per worker task
SCAN_WINDOW = 6  # batches in flight
MAX_PENDING_PAGES = 256  # pages asked about or being sent; bounds the source's backlog


# -- options and results ----------------------------------------------------------------


@dataclass(frozen=True)
class SourceOptions:
    chunk_size: int = DEFAULT_CHUNK  # used only when the target has no geometry yet
    dry_run: bool = False
    ignore_read_errors: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # passed to the target in Hello
    #: where keys come from when the target is encrypted (or ``encrypt`` makes it so)
    keyring: Keyring | None = None
    encrypt: bool = False  # a new image is created encrypted, with a new key
    kdf: KdfParams | None = None  # the new key's passphrase hardening (None: the default)
    #: the target's host ("" here): with the path the target names, the place this client
    #: remembers having pushed encrypted into (a host must not downgrade it to plain)
    host: str = ""
    #: what the new generation records as its source (``--label``; default: SRC's path)
    label: str = ""


@dataclass
class PushStats:
    """What `push --json` reports."""

    size: int = 0
    chunk_size: int = 0
    bytes_read: int = 0
    bytes_hashed: int = 0
    bytes_sent: int = 0  # on the wire, source to target
    bytes_received: int = 0  # on the wire, target to source
    chunks: int = 0
    chunks_differing: int = 0
    chunk_bytes_differing: int = 0
    zero_chunks: int = 0
    pages_compared: int = 0
    pages_differing: int = 0
    duration: float = 0.0
    root_hash: str = ""
    target_root_hash: str = ""
    generation: int | None = None
    #: The push created DST: a new image (generation 1), or with --legacy a new file (a Go
    #: target that was missing or empty, which then reports no generation).
    created: bool = False
    # the content equalled the newest generation: no new one, that one recorded the run
    unchanged: bool = False
    pruned: list[int] = field(default_factory=list)  # generations the commit pruned
    resumed: bool = False
    dry_run: bool = False
    # the target held a larger disk before (its newest generation, or a raw target's size):
    # the backup shrank to ``size``; None when it did not
    shrunk_from: int | None = None
    chunk_size_ignored: bool = False  # --chunk-size differs from the existing target's
    differing_ranges: list[tuple[int, int]] = field(default_factory=list)
    source_changed_chunks: list[int] = field(default_factory=list)
    read_errors: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), merged
    warnings: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: connect, compare, ...
    target: dict[str, Any] = field(default_factory=dict)  # what it reported: target_report


def target_report(info: dict[str, Any]) -> dict[str, Any]:
    """What a target's Committed ``info`` says it did, only the members this release knows
    and of the right types (a peer's word: an older one sends fewer, a hostile one junk)."""
    kinds: dict[str, type | tuple[type, ...]] = {
        "path": str, "chunks_written": int, "commit_seconds": (int, float)}
    return {k: info[k] for k, t in kinds.items()
            if isinstance(info.get(k), t) and not isinstance(info[k], bool)
            and (k == "path" or 0 <= info[k] < 1 << 63)}  # no NaN, no Infinity


@dataclass
class _Batch:
    first: int
    hashes: list[bytes]
    zero: list[bool]
    encoded: list[tuple[int, bytes] | None] | None  # (kind, payload) when sent straight away
    bad: list[tuple[int, int]]  # unreadable ranges filled with zeros


class _Failure:
    """First error raised by any thread of the push; the others stop when it is set."""

    def __init__(self) -> None:
        self.exc: BaseException | None = None
        self.event = threading.Event()

    def set(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc
        self.event.set()

    def check(self) -> None:
        if self.exc is not None:
            raise self.exc


# -- the engine --------------------------------------------------------------------------


class SourceSession:
    """Runs the source side over a connected channel until the target commits.

    The protocol is ``SourceConversation``'s; this driver scans (worker threads), receives
    (one thread), re-reads and sends differing chunks (a small pool), and calls the
    conversation under ``_cv``'s lock.
    """

    def __init__(self, channel: Channel, reader: SourceReader, options: SourceOptions,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.ch = channel
        self.reader = reader
        self.opts = options
        # progress(bytes scanned since the last call, bytes sent so far)
        self.progress = progress or (lambda scanned, sent: None)
        self.stats = PushStats(size=reader.size, dry_run=options.dry_run)
        self.fail = _Failure()
        self._cv = threading.Condition()
        self.codec: ChunkCodec = STANDARD  # until the target says whether it is encrypted
        self._new_key: MasterKey | None = None
        # the source's description travels in Done (sealed when the target is encrypted,
        # which is not known yet): the Hello says only what the target needs to open
        hello_info = dict(options.info)
        entry = getattr(reader, "encryption", None)
        if isinstance(reader.codec, SealedCodec) and entry is not None and not options.encrypt:
            # an encrypted image pushed on (an offsite copy) stays encrypted, with its own
            # key, and its chunks travel as they are stored
            self._new_key = reader.codec.key
            hello_info["encrypt"] = entry
        elif options.encrypt:
            if options.keyring is None:
                raise UsageError("--encrypt needs a passphrase source")
            self._new_key = key = MasterKey.generate()
            envelope = Envelope.wrap(key, options.keyring.passphrase(
                "a new encryption key", new=True), options.kdf)
            hello_info["encrypt"] = encryption_entry(key, envelope)
        if not options.dry_run:  # a target refuses a first push that will not fit
            hello_info["estimate"] = space_estimate(reader)
        self.conv = SourceConversation(
            reader.size, options.chunk_size, DEFAULT_FANOUT, f"diskrsync {__version__}",
            hello_info, dry_run=options.dry_run)
        self._outstanding = 0  # NeedLeaves without Leaves, plus chunk sends in progress
        self._slots = threading.BoundedSemaphore(MAX_PENDING_PAGES)
        self._page_left: dict[int, int] = {}  # page -> chunk sends not yet done
        self._stats_lock = threading.Lock()

    def _handshake(self) -> TargetReady:
        self.ch.send(self.conv.hello())
        ready = self.conv.receive(self.ch.recv())
        assert isinstance(ready, TargetReady)
        self._choose_codec(ready.hello.info)
        return ready

    def _choose_codec(self, info: dict[str, Any]) -> None:
        """The target's image is encrypted: unlock its key (ours when we just made it),
        check the newest generation the target holds is one this key sealed and not older
        than this client has seen (a rolled-back host), and hash and encrypt with it."""
        enc = info.get("encryption")
        path = info.get("path")
        self.place = f"{self.opts.host}:{path}" if isinstance(path, str) and path else ""
        if enc is None:
            if self.opts.encrypt:
                raise PeerError("the target did not create an encrypted image")
            was = SeenGenerations().encrypted_at(self.place) if self.place else None
            if was is not None:
                raise DataError(
                    f"{self.place.lstrip(':')} was an encrypted image (key {was[:12]}…) when "
                    f"this client last pushed into it, and is not one now: refusing to send "
                    f"it plain data (was it replaced or removed on the host?). Push with "
                    f"--encrypt to start a new encrypted image there")
            return
        key_id = bytes.fromhex(enc["key_id"])
        if self._new_key is not None and self._new_key.key_id == key_id:
            key = self._new_key
        else:
            if self.opts.keyring is None:
                raise UsageError("the target image is encrypted: give its passphrase")
            envelope = Envelope.from_json(enc["envelope"]) if enc.get("envelope") else None
            key = self.opts.keyring.unlock(key_id, envelope, "the target image")
        codec = SealedCodec(key)
        self.next_generation = info.get("next_generation")
        if type(self.next_generation) is not int or self.next_generation < 1:
            raise PeerError("the encrypted target did not say its next generation number")
        newest = info.get("newest")
        seen = SeenGenerations()
        if isinstance(newest, dict):
            try:
                number, root = int(newest["number"]), bytes.fromhex(newest["root"])
                seal = str(newest["seal"])
            except (KeyError, ValueError, TypeError):
                raise PeerError("the target described its newest generation badly") from None
            codec.open_seal(number, root, seal)  # DataError: forged or rolled back
            seen.check(key_id, self.place, (number, root), {number: root}, "the target image")
        else:
            seen.check(key_id, self.place, None, {}, "the target image")
        self.codec = codec

    def run(self) -> PushStats:
        t0 = time.monotonic()
        self.sender = ThreadPoolExecutor(2, thread_name_prefix="push-send")
        conv = self.conv
        try:
            ready = self._handshake()
            t_ready = time.monotonic()
            self.cs, self.fanout = ready.hello.chunk_size, ready.hello.fanout
            self.src, self.dst = ready.src, ready.dst
            self.stats.chunk_size = self.cs
            self.stats.chunks = self.src.chunks
            self.stats.target_root_hash = str(ready.hello.info.get("root", ""))
            self.stats.resumed = bool(ready.hello.info.get("resumed"))
            note_shrink(self.stats, ready.hello.info)
            receiver = threading.Thread(target=self._receive, name="push-recv", daemon=True)
            receiver.start()
            # an image's digests are comparable only when it hashes as this push does
            index = self.reader.index_for(self.cs, self.fanout) \
                if self.reader.codec.name == self.codec.name else None
            if index is not None:
                self._compare_by_index(index)
            else:
                self._scan()
            t_scanned = time.monotonic()
            with self._cv:
                while self._outstanding and not self.fail.event.is_set():
                    self._cv.wait(0.5)
            self.fail.check()
            t_drained = time.monotonic()
            self.stats.read_errors = merge_ranges(self.stats.read_errors)
            description = self.opts.label or self.reader.description
            done_info = {
                "source": description,
                "dry_run": self.opts.dry_run,
                "source_changed_chunks": len(self.stats.source_changed_chunks),
                "read_errors": self.stats.read_errors[:1000],  # the target stores it: bounded
            }
            if isinstance(self.codec, SealedCodec) and not self.opts.dry_run:
                # the host keeps only what it must in the clear; the rest is sealed with
                # the generation's number and root (see compression/crypto.py)
                root = root_from_leaves(self.src, conv.leaves)
                done_info["seal"] = self.codec.seal(self.next_generation, root, {
                    "source": description, "time": time.time(),
                    "meta": {k: v for k, v in done_info.items()
                             if v and k not in ("dry_run", "source")}})
                done_info["read_errors"] = []
                del done_info["source"]
            if self.opts.dry_run:
                # no chunks travel in a dry run: tell a pulling target what would have
                # (a dry run commits nothing, so this never reaches an image's metadata)
                done_info.update(chunks_differing=self.stats.chunks_differing,
                                 chunk_bytes_differing=self.stats.chunk_bytes_differing,
                                 differing_ranges=self.stats.differing_ranges[:1000])
            with self._cv:
                done = conv.done(done_info)
            self.stats.root_hash = done.root.hex()
            self.ch.send(done)
            receiver.join()
            self.fail.check()
        except BaseException as e:
            self.fail.set(e)
            with contextlib.suppress(Exception):  # the peer may be gone: then this just fails
                self.ch.send(error_message(e))
            raise
        finally:
            self.sender.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(Exception):
                self.ch.close()
        res = conv.result
        assert res is not None
        # 0: a raw target, which has no generations (as a pull reports it too)
        self.stats.generation = res.generation or None if not self.opts.dry_run else None
        if isinstance(self.codec, SealedCodec) and not self.opts.dry_run:
            seen = SeenGenerations()
            seen.record(self.codec.key.key_id, self.place, res.generation, res.root)
            if self.place:
                seen.remember_place(self.place, self.codec.key.key_id)
        self.stats.created = self.stats.generation == 1
        self.stats.unchanged, self.stats.pruned = commit_outcome(res.info)
        if self.opts.dry_run:
            self.stats.target_root_hash = res.root.hex()
        self.stats.bytes_sent = self.ch.bytes_sent
        self.stats.bytes_received = self.ch.bytes_received
        t_end = time.monotonic()
        self.stats.duration = t_end - t0
        self.stats.phases = {"connect": t_ready - t0, "compare": t_scanned - t_ready,
                             "drain": t_drained - t_scanned, "commit": t_end - t_drained}
        self.stats.target = target_report(res.info)
        return self.stats

    # .. receiving ..

    def _receive(self) -> None:
        try:
            while True:
                msg = self.ch.recv()
                with self._cv:
                    event = self.conv.receive(msg)
                    if isinstance(event, PagesKnown):
                        self._cv.notify_all()
                if isinstance(event, SendChunks):
                    self._send_page(event.page, event.chunks)
                    self._done_one()
                elif msg is None:
                    return
        except BaseException as e:
            self.fail.set(e)
            with self._cv:
                self._cv.notify_all()

    def _wait_target_page(self, j: int) -> None:
        with self._cv:
            while self.conv.pages_known <= j:
                if self.fail.event.is_set():
                    self.fail.check()
                self._cv.wait(0.5)

    # .. deciding ..

    def _decide_page(self, j: int, *, src_page_hash: bytes | None = None) -> None:
        """After page j's digests are known: skip it, ask for its leaves, or (when the
        target has none of it) send its non-zero chunks."""
        conv = self.conv
        self.stats.pages_compared += 1
        if conv.needs_target_page(j):
            self._wait_target_page(j)
        with self._cv:
            if conv.page_equal(j, src_page_hash):
                return
        self.stats.pages_differing += 1
        self._slots.acquire()  # held until the page's chunks are sent: bounds the backlog
        with self._cv:
            action = conv.page_differs(j)
            if isinstance(action, p.NeedLeaves):
                self._outstanding += 1
        if isinstance(action, SendChunks):
            self._send_page(j, action.chunks)
        else:
            self.ch.send(action)

    def _done_one(self) -> None:
        with self._cv:
            self._outstanding -= 1
            self._cv.notify_all()

    # .. sending ..

    def _count_differing(self, chunks: Sequence[int]) -> None:
        """Add chunks (in ascending order) to the differing counts and ranges."""
        cs, shape = self.cs, self.src
        with self._stats_lock:
            r = self.stats.differing_ranges
            for c in chunks:
                length = shape.chunk_length(c)
                self.stats.chunk_bytes_differing += length
                off = c * cs
                if r and r[-1][0] + r[-1][1] == off:
                    r[-1] = (r[-1][0], r[-1][1] + length)
                else:
                    r.append((off, length))
            self.stats.chunks_differing += len(chunks)

    def _send_page(self, j: int, chunks: Sequence[int]) -> None:
        """Re-read and send ``chunks`` of page j on the sender pool; the page's slot is freed
        when the last one is sent. Never blocks: it runs on the receiver thread too."""
        self._count_differing(chunks)
        if self.opts.dry_run or not chunks:
            self._slots.release()
            return
        with self._cv:
            self._page_left[j] = len(chunks)
            self._outstanding += len(chunks)
        for c in chunks:
            fut: Future[None] = self.sender.submit(self._reread_and_send, c)
            fut.add_done_callback(functools.partial(self._sent, j))

    def _sent(self, j: int, fut: Future[None]) -> None:
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            self.fail.set(exc)
        with self._cv:
            self._page_left[j] -= 1
            if not self._page_left[j]:
                del self._page_left[j]
                self._slots.release()
        self._done_one()

    def _reread_and_send(self, c: int) -> None:
        if self.fail.event.is_set():
            return
        length = self.src.chunk_length(c)
        want = self.conv.leaf(c)
        try:
            # decoded and checked on this thread; sent as stored only in the push's own form
            stored = self.reader.read_stored(c, self.cs) \
                if self.reader.codec.name == self.codec.name else None
        except CorruptChunkError:
            if not self.opts.ignore_read_errors:
                raise
            self._record_bad([(c * self.cs, length)])  # a damaged chunk of an image: zeros
            want = zero_hash(length)
            self.conv.set_leaf(c, want)
            stored = int(Kind.ZERO), b""
        if stored is not None:
            kind, payload = stored
            self.ch.send(p.Chunk(c, kind, want, payload))
            return
        bad: list[tuple[int, int]] = []
        data = self._read_mapped(c * self.cs, length, bad)
        self._record_bad(bad)
        if codec.is_zero(data):
            digest, kind, payload = zero_hash(length), int(Kind.ZERO), b""
        else:
            digest = self.codec.leaf_hash(data, c)
            kind, payload = self._encode(data, c, digest)
        if digest != want:
            # the disk changed since we scanned it: send what we read now, and say so
            with self._stats_lock:
                self.stats.source_changed_chunks.append(c)
            self.conv.set_leaf(c, digest)
        self.ch.send(p.Chunk(c, kind, digest, payload))

    def _encode(self, data: bytes | memoryview, c: int, digest: bytes) -> tuple[int, bytes]:
        kind, payload = self.codec.encode(data, ChunkAt(c, digest))
        return int(kind), payload

    def _record_bad(self, bad: list[tuple[int, int]]) -> None:
        if bad:
            with self._stats_lock:
                self.stats.read_errors.extend(bad)

    def _read_mapped(self, offset: int, length: int, bad: list[tuple[int, int]]) -> bytes:
        """Bytes [offset, offset+length) of the source. A read that fails is split in two at
        a sector boundary, down to single sectors, so exactly the unreadable ones are found:
        with --ignore-read-errors they read as zeros and are added to ``bad`` (ascending,
        adjacent ones merged); otherwise the first one stops the push, named by its offset."""
        try:
            return self.reader.read(offset, length)
        except CorruptChunkError:
            if not self.opts.ignore_read_errors:
                raise  # names the damaged chunk of the image (exit 6)
            error = errno.EIO
        except (ReadError, OSError) as e:
            error = e.errno or errno.EIO
        unit = self.reader.sector
        end = offset + length
        mid = (offset + length // 2) // unit * unit
        if mid <= offset:
            mid = (offset // unit + 1) * unit
        if mid >= end:  # within one sector: this is what cannot be read
            if not self.opts.ignore_read_errors:
                raise LocalError(
                    f"read error in {self.reader.description} at offset {offset}: "
                    f"{os.strerror(error)} (--ignore-read-errors reads unreadable sectors as "
                    f"zeros and lists them)")
            if bad and bad[-1][0] + bad[-1][1] == offset:
                bad[-1] = (bad[-1][0], bad[-1][1] + length)
            else:
                bad.append((offset, length))
            return codec.zeros(length)
        head = self._read_mapped(offset, mid - offset, bad)
        return head + self._read_mapped(mid, end - mid, bad)

    # .. scanning ..

    def _scan(self) -> None:
        # batches never straddle a page, so a page is either compared or sent while scanned
        self.batch = math.gcd(self.fanout, BATCH_CHUNKS)
        # pages wholly past the target's end have nothing to compare: sent as they are read
        self.send_from = -(-self.dst.chunks // self.fanout) * self.fanout
        batches = range(0, self.src.chunks, self.batch)
        page = 0
        try:
            for batch in ordered_map(self._scan_batch, batches, window=SCAN_WINDOW):
                self.fail.check()
                first, end = batch.first, batch.first + len(batch.hashes)
                self.conv.leaves[first * HASH_SIZE : end * HASH_SIZE] = b"".join(batch.hashes)
                length = min(end * self.cs, self.src.size) - first * self.cs
                zero_bytes = sum(self.src.chunk_length(first + k)
                                 for k, z in enumerate(batch.zero) if z)
                self.stats.zero_chunks += sum(batch.zero)
                self._record_bad(batch.bad)
                self.stats.bytes_read += length
                self.stats.bytes_hashed += length - zero_bytes
                if batch.encoded is not None:  # past the target's end: send as scanned
                    sent = [first + k for k, enc in enumerate(batch.encoded) if enc is not None]
                    self._count_differing(sent)
                    if not self.opts.dry_run:
                        for c in sent:
                            kind, payload = batch.encoded[c - first]  # type: ignore[misc]
                            self.ch.send(p.Chunk(c, kind, self.conv.leaf(c), payload))
                elif end % self.fanout == 0 or end == self.src.chunks:
                    self._decide_page(page)
                page = end // self.fanout
                self.progress(length, self.ch.bytes_sent)
        except _Stopped:
            self.fail.check()
            raise

    def _scan_batch(self, first: int) -> _Batch:
        if self.fail.event.is_set():
            raise _Stopped()
        last = min(first + self.batch, self.src.chunks)
        cs = self.cs
        send_now = first >= self.send_from
        bad: list[tuple[int, int]] = []
        start, stop = first * cs, min(last * cs, self.src.size)
        data = self._read_mapped(start, stop - start, bad)
        hashes: list[bytes] = []
        zero: list[bool] = []
        leaf_hash = self.codec.leaf_hash
        encoded: list[tuple[int, bytes] | None] | None = [] if send_now else None
        view = memoryview(data)
        for c in range(first, last):
            at, length = (c - first) * cs, self.src.chunk_length(c)
            if data.startswith(codec.zeros(length), at):  # memcmp, no copy
                hashes.append(zero_hash(length))
                zero.append(True)
                if encoded is not None:
                    encoded.append(None)
                continue
            piece = view[at : at + length]
            digest = leaf_hash(piece, c)
            hashes.append(digest)
            zero.append(False)
            if encoded is not None:
                encoded.append(self._encode(piece, c, digest) if not self.opts.dry_run
                               else (0, b""))
        return _Batch(first, hashes, zero, encoded, bad)

    def _compare_by_index(self, index: Any) -> None:
        """Image source with the target's geometry: digests come from its index."""
        for c_page, h in enumerate(index.node_hashes(1)):
            a, b = self.src.chunk_range(1, c_page)
            for k, leaf in enumerate(index.leaf_hashes(c_page)):
                self.conv.leaves[(a + k) * HASH_SIZE : (a + k + 1) * HASH_SIZE] = leaf
            for c in range(a, b):
                if self.conv.leaf(c) == zero_hash(self.src.chunk_length(c)):
                    self.stats.zero_chunks += 1
            self._decide_page(c_page, src_page_hash=h)
            self.progress(sum(self.src.chunk_length(c) for c in range(a, b)),
                          self.ch.bytes_sent)
            self.fail.check()


class _Stopped(Exception):
    """A worker noticed another thread failed; the real error is in _Failure."""


def note_shrink(stats: PushStats, target_info: dict[str, Any]) -> None:
    """Warn when the target's previous disk (its ``previous_size``, as the target said it)
    was larger than this source: the backup shrinks with it, silently otherwise."""
    previous = target_info.get("previous_size")
    if type(previous) is int and stats.size < previous < 1 << 63:
        stats.shrunk_from = previous
        image = target_info.get("kind") == "image"
        stats.warnings.append(
            f"the source ({stats.size} bytes) is smaller than the target's previous disk "
            f"({previous} bytes): the {'new generation' if image else 'target'} "
            f"{'would shrink' if stats.dry_run else 'shrank'} to the source's size"
            + (" (older generations keep theirs)" if image else ""))


def commit_outcome(info: dict[str, Any]) -> tuple[bool, list[int]]:
    """(unchanged, pruned generation numbers) from a target's Committed info; a peer's
    nonsense there (or an older target's silence) reads as (False, [])."""
    pruned = info.get("pruned")
    numbers: list[int] = []
    if isinstance(pruned, list):
        numbers = [n for n in pruned[:100_000] if type(n) is int and 0 < n < 1 << 63]
    return info.get("unchanged") is True, numbers


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with overlapping and adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], off + n) - last[0])
        else:
            out.append((off, n))
    return out
