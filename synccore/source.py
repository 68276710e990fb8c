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

The scan reads only what may hold data and may have changed. Bytes outside the reader's
``extents`` (a sparse file's holes, free blocks of a file system) are zeros without a read. A
reader whose ``changed_ranges`` map is relative to the target's newest generation (the
target's Hello names that generation's recorded ``change_base``) has its other chunks take
the target's digests: a page of them takes the target's page digest, a page with some asks
for its leaves. Any mismatch (first push, another map, a resumed checkpoint, a raw target)
scans in full and says so. The chunks such a scan reads mostly differ, so they are kept as
encoded (up to ``HELD_BYTES``) and sent without a second read.

A cold disk is read at the device's speed: the scan asks the reader for what it will read
``PREFETCH_BYTES`` ahead of the batch it hands out (``prefetch``: ``POSIX_FADV_WILLNEED`` on
a file or block device), so the device always has reads queued while the workers hash,
whatever the kernel's own read-ahead is. A differing chunk's re-read is answered by the page
cache (it was read moments before); nothing asks the kernel to drop what was read
(docs/benchmarks.md, "Cold source").

A read that fails (or comes back short: a disk returns the bytes before a bad sector and fails
the next read) is split in halves down to the reader's sector, so exactly the unreadable
sectors are found; with ``--ignore-read-errors`` they are sent as zeros and listed, otherwise
the first one stops the push. The scan and the re-read for sending share that logic.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from diskrsync import __version__
from diskrsync.base.errors import (
    CorruptChunkError,
    DataError,
    DiskrsyncError,
    LocalError,
    PeerError,
    ReadError,
    UsageError,
)
from diskrsync.base.merkle import (
    HASH_SIZE,
    Shape,
    zero_hash,
)
from diskrsync.base.parallel import ordered_map, worker_count
from diskrsync.base.ranges import Ranges, merge_ranges
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
from diskrsync.compression.fsmaps import free_blocks, subtract_ranges
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
#: with a map of changed ranges most chunks read differ: up to this many encoded bytes of
#: them are kept from the scan until their page is decided, instead of being read again
HELD_BYTES = 64 << 20
#: extents closer than this are read with one read (what lies between is then zeroed)
READ_GAP = 32 << 10
#: the scan asks the reader for the bytes this far past the newest batch it hands to a worker
#: (at least one batch): the device keeps reading while the workers hash, whatever the
#: kernel's own read-ahead is (128 KiB by default on a block device)
PREFETCH_BYTES = 64 << 20
#: a scan begun before the target is reached (``start_early``) keeps at most this many chunk
#: digests (2 MiB) until the target's Hello says whether they are of use
EARLY_CHUNKS = 1 << 16


# -- options and results ----------------------------------------------------------------


@dataclass(frozen=True)
class SourceOptions:
    chunk_size: int = DEFAULT_CHUNK  # used only when the target has no geometry yet
    dry_run: bool = False
    ignore_read_errors: bool = False
    skip_free_blocks: bool = False  # ext2/3/4 and xfs free blocks are zeros, never read
    info: dict[str, Any] = field(default_factory=dict)  # passed to the target in Hello
    #: where keys come from when the target is encrypted (or ``encrypt`` makes it so)
    keyring: Keyring | None = None
    encrypt: bool = False  # a new image is created encrypted, with a new key
    kdf: KdfParams | None = None  # the new key's passphrase hardening (None: the default)
    #: the target's host ("" here): with the path the target names, the place this client
    #: remembers having pushed encrypted into (a host must not downgrade it to plain)
    host: str = ""
    #: the target path as this client asked for it (the remote end resolves it and names
    #: the image it opened; that name is the host's word, this one the client's own)
    target: str = ""
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
    #: what narrowed the scan ("full": nothing; "sparse", "free-blocks", a changed-ranges map
    #: such as "dirty-bitmap", joined with "+"), recorded in the generation's metadata
    map: str = "full"
    map_fallback: str = ""  # why a map of changed ranges was not used (a full scan instead)
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
    unread: list[int]  # chunks a map of changed ranges says are unchanged: the target's digest
    read: int  # bytes read from the source


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
    conversation under ``_cv``'s lock. A remote push makes the session before it connects
    (``channel`` None), calls ``start_early`` so the scan overlaps the connection, then
    ``run(channel)``; ``stop_early`` (idempotent) must follow in any case.
    """

    def __init__(self, channel: Channel | None, reader: SourceReader, options: SourceOptions,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self._ch = channel
        self.reader = reader
        self.opts = options
        # progress(bytes scanned since the last call, bytes sent so far)
        self.progress = progress or (lambda scanned, sent: None)
        self.stats = PushStats(size=reader.size, dry_run=options.dry_run)
        self.fail = _Failure()
        self._cv = threading.Condition()
        self.codec: ChunkCodec = STANDARD  # until the target says whether it is encrypted
        self._new_key: MasterKey | None = None
        self._sealed_base: Any = None  # an encrypted target's newest change_base (sealed)
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
        self._hide_errors = self._new_key is not None  # see _error_for_peer
        self._have: tuple[int, bytes] | None = None  # the target's newest, authenticated
        self.conv = SourceConversation(
            reader.size, options.chunk_size, DEFAULT_FANOUT, f"diskrsync {__version__}",
            hello_info, dry_run=options.dry_run)
        self._outstanding = 0  # NeedLeaves without Leaves, plus chunk sends in progress
        self._slots = threading.BoundedSemaphore(MAX_PENDING_PAGES)
        self._page_left: dict[int, int] = {}  # page -> chunk sends not yet done
        self._stats_lock = threading.Lock()
        self.data = Ranges([(0, reader.size)], reader.size)  # what is read; the rest: zeros
        self.changed: Ranges | None = None  # a trusted map of changed ranges
        self.change_base: Any = None  # what that map is relative to, as JSON
        self._held: dict[int, tuple[int, bytes]] = {}  # chunk -> encoded at the scan
        self._held_bytes = 0
        # the reads the plan allows (extents less free blocks), once computed: they do not
        # depend on the target, so a scan begun early computes them for the whole push
        self._reads: tuple[Ranges, list[str], list[str]] | None = None
        self._t0: float | None = None  # when the push began (start_early, else run)
        self._early: threading.Thread | None = None
        self._early_stop = threading.Event()
        self._early_shape: Shape | None = None
        self._early_batches: list[_Batch] = []  # in order, from batch 0, hashed only

    @property
    def ch(self) -> Channel:
        assert self._ch is not None, "run(channel) first"
        return self._ch

    def _handshake(self) -> TargetReady:
        self.ch.send(self.conv.hello())
        ready = self.conv.receive(self.ch.recv())
        assert isinstance(ready, TargetReady)
        # the target's tree is known: the scan goes on in its geometry (see _scan)
        self.stop_early()
        self._choose_codec(ready.hello.info)
        return ready

    # .. a head start ..

    def start_early(self) -> None:
        """Begin scanning before the target is reached: a remote push calls this before it
        connects, so the scan overlaps the SSH handshake and the remote end's start-up.

        The target's geometry is not known yet. The head start assumes the chunk size this
        push asks for (what a new image takes) and the default fanout, only hashes (what
        the target lacks is compressed once its Hello says so) and keeps at most
        ``EARLY_CHUNKS`` digests. ``_scan`` takes the batches when the target's Hello agrees,
        and scans again from where they end (or from the start when it does not). It does
        not start where reading ahead would cost more than it can save: an image source
        whose index answers the digests, a source with a map of changed ranges (whether it
        is used depends on the target's newest generation), and a push that creates an
        encrypted image (its digests are keyed)."""
        self._t0 = time.monotonic()
        cs = self.opts.chunk_size
        if self._early is not None or self._new_key is not None \
                or self.reader.change_base() is not None \
                or self.reader.index_for(cs, DEFAULT_FANOUT) is not None:
            return
        self.cs, self.fanout = cs, DEFAULT_FANOUT
        self.src = self._early_shape = Shape(self.reader.size, cs, DEFAULT_FANOUT)
        self.batch = math.gcd(self.fanout, BATCH_CHUNKS)
        self.send_from = self.src.chunks  # nothing is compressed before the target is known
        self._early = threading.Thread(target=self._scan_early, name="push-early",
                                       daemon=True)
        self._early.start()

    def _scan_early(self) -> None:
        """The head start's thread: the plan's reads, then batches until stopped or full.
        It stops at its first error, which the scan meets again where it reads on."""
        try:
            self._reads = plan_reads(self.reader, skip_free_blocks=self.opts.skip_free_blocks,
                                     read_metadata=self._read_metadata)
            self.data = self._reads[0]
            # no batch past the limit is started, nor any once stopped; those started are
            # kept (the stop waits for them rather than read them twice)
            limit = max(1, EARLY_CHUNKS // self.batch) * self.batch
            batches = self._prefetching(itertools.takewhile(
                lambda _: not self._early_stop.is_set(),
                range(0, min(limit, self.src.chunks), self.batch)))
            with contextlib.closing(ordered_map(self._scan_batch, batches,
                                                window=SCAN_WINDOW)) as scanned:
                for batch in scanned:
                    self._early_batches.append(batch)
        except BaseException:  # the scan reads it again and reports it there
            return

    def stop_early(self) -> None:
        """Stop the head start and wait for its threads (idempotent): before the session
        takes the target's geometry, and when the connection failed."""
        self._early_stop.set()
        if self._early is not None:
            self._early.join()

    def _take_early(self) -> list[_Batch]:
        """The head start's batches the scan can use: all of them up to the first batch the
        target has nothing to compare with (those are read again, to be compressed and
        sent), provided the target's geometry, hash and plan are those it assumed."""
        early, self._early_batches = self._early_batches, []
        if self._early_shape != self.src or self.codec is not STANDARD \
                or self.changed is not None:
            return []
        return list(itertools.takewhile(lambda b: b.first < self.send_from, early))

    def _want_pages(self) -> None:
        """Ask for the target's page digests a window ahead of the pages decided."""
        with self._cv:
            want = self.conv.want_pages()
        if want is not None:
            self.ch.send(want)

    def _places(self, info: dict[str, Any]) -> list[str]:
        """Where this push goes, as the client remembers it: the path the target names
        (its image, resolved) and, for a remote target, the path this client asked for
        with the source's name (a directory target names the image after it). The host
        can name any path; the second place is the client's own word, so a host that
        answers with another path neither escapes the rollback memory nor gets plaintext
        where this client pushed encrypted."""
        path = info.get("path")
        places = [f"{self.opts.host}:{path}"] if isinstance(path, str) and path else []
        if self.opts.target:
            own = f"{self.opts.host}:{self.opts.target} <- {self.opts.info.get('name', '')}"
            places.append(own)
        return places

    def _error_for_peer(self, e: BaseException) -> p.Error:
        """What the target hears when this push stops: the error's kind only, when the
        target is (or is to be) an encrypted image, whose host must not learn the source's
        path or this client's state from an error's text (the user reads it here)."""
        msg = error_message(e)
        if self._hide_errors and not (isinstance(e, DiskrsyncError) and e.relayed):
            return p.Error(msg.kind, "the source stopped (the reason is shown on its side)")
        return msg

    def _choose_codec(self, info: dict[str, Any]) -> None:
        """The target's image is encrypted: unlock its key (ours when we just made it),
        check the newest generation the target holds is one this key sealed and not older
        than this client has seen (a rolled-back host), and hash and encrypt with it."""
        enc = info.get("encryption")
        self._hide_errors = self._hide_errors or enc is not None
        self.places = self._places(info)
        seen = SeenGenerations()
        if enc is None:
            if self._new_key is not None:  # --encrypt, or an encrypted image pushed on
                raise PeerError("the target did not create an encrypted image")
            for place in self.places:
                was = seen.encrypted_at(place)
                if was is not None:
                    raise DataError(
                        f"{place.lstrip(':')} was an encrypted image (key {was[:12]}…) when "
                        f"this client last pushed into it, and is not one now: refusing to "
                        f"send it plain data (was it replaced or removed on the host?). Push "
                        f"with --encrypt to start a new encrypted image there")
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
        if type(self.next_generation) is not int or not 1 <= self.next_generation < 1 << 63:
            raise PeerError("the encrypted target did not say its next generation number")
        newest = info.get("newest")
        have: tuple[int, bytes] | None = None
        if isinstance(newest, dict):
            try:
                have = int(newest["number"]), bytes.fromhex(newest["root"])
                seal = str(newest["seal"])
                if not 1 <= have[0] < 1 << 63:
                    raise ValueError("number out of range")
            except (KeyError, ValueError, TypeError):
                raise PeerError("the target described its newest generation badly") from None
            sealed = codec.open_seal(*have, seal)  # DataError: forged or rolled back
            self._have = have
            # what a map of changed ranges is relative to is kept in the seal, not in the
            # host's clear metadata: take it from there
            meta = sealed.get("meta")
            base = meta.get("change_base") if isinstance(meta, dict) else None
            if info.get("generation") == have[0] and base is not None:
                self._sealed_base = base
        for place in self.places or [""]:
            seen.check(key_id, place, have, dict([have]) if have else {}, "the target image")
        if self._new_key is None or self._new_key.key_id != key_id:  # ours: made for it
            for place in self.places:
                seen.check_key_at(place, key_id, "the target image")
        if have is not None and self.next_generation <= have[0]:
            # a second seal for a number the host holds one of would let it serve either
            raise PeerError(f"the target would number the next generation "
                            f"{self.next_generation}, but already holds generation {have[0]}")
        if not self.opts.dry_run:
            # from now on the place is encrypted for this client, even if this push breaks
            # off before its commit (and the host removes what arrived)
            for place in self.places:
                seen.remember_place(place, key_id)
        self.codec = codec

    def run(self, channel: Channel | None = None) -> PushStats:
        """Converse over ``channel`` (or the one the session was made with) until the target
        commits."""
        if channel is not None:
            self._ch = channel
        t0 = self._t0 if self._t0 is not None else time.monotonic()
        self.sender = ThreadPoolExecutor(worker_count(), thread_name_prefix="push-send")
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
            if ready.hello.info.get("space_check") is True and not self.opts.dry_run:
                # a first push: the target checks what it will store before anything is
                # written (samples of the source, compressed as they will be)
                self.ch.send(p.Estimate(space_estimate(self.reader)))
            # an image's digests are comparable only when it hashes as this push does
            index = self.reader.index_for(self.cs, self.fanout) \
                if self.reader.codec.name == self.codec.name else None
            if index is None:
                plan_info = dict(ready.hello.info)
                if isinstance(self.codec, SealedCodec):
                    plan_info["change_base"] = self._sealed_base
                self._plan(plan_info)
            elif self.opts.skip_free_blocks:
                self.stats.warnings.append("--skip-free-blocks: the source is an image, whose "
                                           "stored chunks are compared as they are")
            receiver = threading.Thread(target=self._receive, name="push-recv", daemon=True)
            receiver.start()
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
            done_info: dict[str, Any] = {
                "source": description,
                "dry_run": self.opts.dry_run,
                "source_changed_chunks": len(self.stats.source_changed_chunks),
                "read_errors": self.stats.read_errors[:1000],  # the target stores it: bounded
                # an image keeps these in the generation's metadata: which map the push
                # trusted, and what the next push's map must be relative to
                "map": self.stats.map,
                "map_fallback": self.stats.map_fallback,
                "change_base": self.change_base,
                # how this scan was narrowed, or why not (a pulling target reports them)
                "map_warnings": [w[:500] for w in self.stats.warnings[:20]],
            }
            if isinstance(self.codec, SealedCodec) and not self.opts.dry_run:
                # the host keeps only what it must in the clear; the rest is sealed with
                # the generation's number and root (see compression/crypto.py)
                seal = self.codec.seal(self.next_generation, conv.root(), {
                    "source": description, "time": time.time(),
                    "meta": {k: v for k, v in done_info.items()
                             if v and k not in ("dry_run", "source")}})
                # only the seal travels, and one bit a target that keeps an unchanged run
                # in the newest generation needs: whatever else a push records (now or in
                # a later release) stays inside the seal
                done_info = {"dry_run": False, "seal": seal}
                if self.stats.read_errors or self.stats.source_changed_chunks:
                    done_info["new_generation"] = True
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
                self.ch.send(self._error_for_peer(e))
            raise
        finally:
            self.stop_early()
            self.sender.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(Exception):
                self.ch.close()
        res = conv.result
        assert res is not None
        # 0: a raw target, which has no generations (as a pull reports it too)
        self.stats.generation = res.generation or None if not self.opts.dry_run else None
        if isinstance(self.codec, SealedCodec) and not self.opts.dry_run:
            # the number sealed, or (a target that keeps an unchanged run in the newest
            # generation) the newest one, authenticated above, when the disk equals it
            if res.generation != self.next_generation and (res.generation, res.root) \
                    != self._have:
                raise PeerError(f"the target committed generation {res.generation}, but this "
                                f"push sealed generation {self.next_generation}")
            seen = SeenGenerations()
            for place in self.places or [""]:
                seen.record(self.codec.key.key_id, place, res.generation, res.root)
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

    def _decide_page(self, j: int, *, src_page_hash: bytes | None = None,
                     unread: tuple[int, ...] = ()) -> None:
        """After page j's digests are known: skip it, ask for its leaves, or (when the
        target has none of it) send its non-zero chunks. ``unread`` chunks (unchanged by the
        map of changed ranges) take the target's digests: a page of nothing else takes the
        target's page digest, any other asks for its leaves."""
        conv = self.conv
        self._want_pages()
        self.stats.pages_compared += 1
        a, b = self.src.chunk_range(1, j)
        adopt = len(unread) == b - a and conv.needs_target_page(j)
        if not unread or adopt:
            if conv.needs_target_page(j):
                self._wait_target_page(j)
            with self._cv:
                if adopt:
                    conv.adopt_page(j)
                    return
                if conv.page_equal(j, src_page_hash):
                    self._release_held(j, ())
                    return
        self.stats.pages_differing += 1
        self._slots.acquire()  # held until the page's chunks are sent: bounds the backlog
        with self._cv:
            action = conv.page_differs(j, unread)
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
        self._release_held(j, chunks)
        self._count_differing(chunks)
        if self.opts.dry_run or not chunks:
            with self._cv:
                self.conv.page_sent(j)
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
                self.conv.page_sent(j)
                self._slots.release()
        self._done_one()

    def _hold(self, c: int, encoded: tuple[int, bytes]) -> None:
        """Keep chunk c as encoded at the scan, if the budget allows, for sending."""
        with self._stats_lock:
            if self._held_bytes + len(encoded[1]) <= HELD_BYTES:
                self._held[c] = encoded
                self._held_bytes += len(encoded[1])

    def _release_held(self, j: int, keep: Sequence[int]) -> None:
        """Page j is decided: drop what was held of its chunks but ``keep``."""
        if not self._held:
            return
        a, b = self.src.chunk_range(1, j)
        with self._stats_lock:
            for c in set(range(a, b)).difference(keep):
                enc = self._held.pop(c, None)
                if enc is not None:
                    self._held_bytes -= len(enc[1])

    def _reread_and_send(self, c: int) -> None:
        if self.fail.event.is_set():
            return
        length = self.src.chunk_length(c)
        want = self.conv.leaf(c)
        with self._stats_lock:
            held = self._held.pop(c, None)
            if held is not None:
                self._held_bytes -= len(held[1])
        if held is not None:  # read and encoded at the scan: not read again
            self.ch.send(p.Chunk(c, held[0], want, held[1]))
            return
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
        data, _n = self._read_data(c * self.cs, c * self.cs + length, bad)
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

    def _encode(self, data: bytes | bytearray | memoryview, c: int,
                digest: bytes) -> tuple[int, bytes]:
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

    def _plan(self, target_info: dict[str, Any]) -> None:
        plan = plan_scan(self.reader, target_info, skip_free_blocks=self.opts.skip_free_blocks,
                         read_metadata=self._read_metadata, reads=self._reads)
        self.data, self.changed, self.change_base = plan.data, plan.changed, plan.change_base
        self.stats.map, self.stats.map_fallback = plan.map, plan.map_fallback
        self.stats.warnings += plan.warnings

    def _read_metadata(self, offset: int, length: int) -> bytes:
        """A file system's allocation maps, for --skip-free-blocks (counted as read)."""
        data = self.reader.read(offset, length)
        self.stats.bytes_read += len(data)
        return data

    def _unchanged(self, c: int) -> bool:
        """Chunk c equals the target's: the map of changed ranges says so and the target's
        chunk covers the same bytes."""
        if self.changed is None or not self.conv.comparable(c):
            return False
        off = c * self.cs
        return not self.changed.overlaps(off, off + self.src.chunk_length(c))

    def _read_data(self, start: int, stop: int,
                   bad: list[tuple[int, int]]) -> tuple[bytes | bytearray, int]:
        """Bytes [start, stop) with only the reader's extents read (the rest are zeros), and
        how many bytes were read."""
        pieces = self.data.pieces(start, stop)
        if pieces == [(start, stop)]:
            return self._read_mapped(start, stop - start, bad), stop - start
        buf = bytearray(stop - start)
        read = 0
        i = 0
        while i < len(pieces):  # pieces a small gap apart are read at once, the gap zeroed
            j = i + 1
            while j < len(pieces) and pieces[j][0] - pieces[j - 1][1] < READ_GAP:
                j += 1
            a, b = pieces[i][0], pieces[j - 1][1]
            view = memoryview(self._read_mapped(a, b - a, bad))
            for x, y in pieces[i:j]:
                buf[x - start : y - start] = view[x - a : y - a]
            read += b - a
            i = j
        return buf, read

    def _scan(self) -> None:
        # batches never straddle a page, so a page is either compared or sent while scanned
        self.batch = math.gcd(self.fanout, BATCH_CHUNKS)
        # pages wholly past the target's end have nothing to compare: sent as they are read
        self.send_from = -(-self.dst.chunks // self.fanout) * self.fanout
        early = self._take_early()
        start = early[-1].first + len(early[-1].hashes) if early else 0
        batches = self._prefetching(range(start, self.src.chunks, self.batch))
        page = 0
        page_unread: list[int] = []
        try:
            for batch in itertools.chain(early, self._batches(batches)):
                self.fail.check()
                first, end = batch.first, batch.first + len(batch.hashes)
                with self._cv:
                    self.conv.set_leaves(first, b"".join(batch.hashes))
                length = min(end * self.cs, self.src.size) - first * self.cs
                skipped = sum(self.src.chunk_length(first + k)
                              for k, z in enumerate(batch.zero) if z)
                skipped += sum(self.src.chunk_length(c) for c in batch.unread)
                self.stats.zero_chunks += sum(batch.zero)
                self._record_bad(batch.bad)
                self.stats.bytes_read += batch.read
                self.stats.bytes_hashed += length - skipped
                page_unread += batch.unread
                if batch.encoded is not None:  # past the target's end: send as scanned
                    sent = [first + k for k, enc in enumerate(batch.encoded) if enc is not None]
                    self._count_differing(sent)
                    if not self.opts.dry_run:
                        for c in sent:
                            kind, payload = batch.encoded[c - first]  # type: ignore[misc]
                            self.ch.send(p.Chunk(c, kind, self.conv.leaf(c), payload))
                    if end % self.fanout == 0 or end == self.src.chunks:
                        with self._cv:
                            self.conv.page_sent(first // self.fanout)
                elif end % self.fanout == 0 or end == self.src.chunks:
                    self._decide_page(page, unread=tuple(page_unread))
                    page_unread = []
                page = end // self.fanout
                self.progress(length, self.ch.bytes_sent)
        except _Stopped:
            self.fail.check()
            raise

    def _batches(self, batches: Iterable[int]) -> Iterator[_Batch]:
        """The scan's batches in order: those that a map of changed ranges leaves wholly
        unread are made right here (nothing to read or hash: a dirty-bitmap push of a big
        disk is mostly these), the others on the worker threads."""
        if self.changed is None:
            yield from ordered_map(self._scan_batch, batches, window=SCAN_WINDOW)
            return
        ahead, inorder = itertools.tee(batches)  # the workers' side runs a window ahead
        work = ordered_map(self._scan_batch, (f for f in ahead if not self._all_unread(f)),
                           window=SCAN_WINDOW)
        for first in inorder:
            if self._all_unread(first):
                n = min(first + self.batch, self.src.chunks) - first
                yield _Batch(first, [bytes(HASH_SIZE)] * n, [False] * n, None, [],
                             list(range(first, first + n)), 0)
            else:
                yield next(work)

    def _all_unread(self, first: int) -> bool:
        """Every chunk of the batch at ``first`` is unchanged (see ``_unchanged``)."""
        last = min(first + self.batch, self.src.chunks)
        if self.changed is None or first >= self.send_from or not self.conv.comparable(last - 1):
            return False
        return not self.changed.overlaps(first * self.cs, min(last * self.cs, self.src.size))

    def _prefetching(self, batches: Iterable[int]) -> Iterator[int]:
        """``batches``, asking the reader (``prefetch``) for what the scan will read up to
        ``PREFETCH_BYTES`` past the batch being handed out: each byte once, in ascending
        order, only those the scan reads (its extents, and with a map the changed ranges)."""
        cs, size = self.cs, self.src.size
        ahead = max(PREFETCH_BYTES, self.batch * cs)
        # a hint costs ~50 µs even when the pages are cached (a warm scan): a quarter of the
        # window at a time
        step = max(ahead // 4, self.batch * cs)
        # with a map, the chunks the target has alike (see _unchanged) are read only where it
        # says they changed; those after them are read whole
        alike = min(self.src.chunks, self.dst.chunks) if self.changed is not None else 0
        if alike and not self.conv.comparable(alike - 1):
            alike -= 1
        mapped = min(alike * cs, size)
        hinted = 0  # bytes [0, hinted) were asked for
        for first in batches:
            end = min((first + self.batch) * cs + ahead, size)
            if end - hinted < step and end < size:
                yield first
                continue
            for x, y in self.data.pieces(hinted, end) if hinted < end else []:
                if self.changed is not None and x < mapped:
                    pieces = self.changed.pieces(x, min(y, mapped)) + \
                        ([(mapped, y)] if y > mapped else [])
                else:
                    pieces = [(x, y)]
                for u, v in pieces:
                    self.reader.prefetch(u, v - u)
            hinted = max(hinted, end)
            yield first

    def _scan_batch(self, first: int) -> _Batch:
        if self.fail.event.is_set():
            raise _Stopped()
        last = min(first + self.batch, self.src.chunks)
        cs = self.cs
        send_now = first >= self.send_from
        bad: list[tuple[int, int]] = []
        start, stop = first * cs, min(last * cs, self.src.size)
        if self.changed is not None and not self.changed.overlaps(start, stop) \
                and self.conv.comparable(last - 1):  # (then so are the batch's other chunks)
            n = last - first  # unchanged: every digest is the target's
            return _Batch(first, [bytes(HASH_SIZE)] * n, [False] * n, None, [],
                          list(range(first, last)), 0)
        unread = [c for c in range(first, last) if self._unchanged(c)]
        if not unread and not self.data.overlaps(start, stop):  # a hole: zeros, nothing read
            lengths = [self.src.chunk_length(c) for c in range(first, last)]
            return _Batch(first, [zero_hash(n) for n in lengths], [True] * len(lengths),
                          [None] * len(lengths) if send_now else None, [], [], 0)
        if not unread:
            data, read = self._read_data(start, stop, bad)
        else:  # read the runs of chunks between the unchanged ones
            buf = bytearray(stop - start)
            read = 0
            edges = [first, *[x for c in unread for x in (c, c + 1)], last]
            for a, b in zip(edges[::2], edges[1::2], strict=True):
                if a < b:
                    part, n = self._read_data(a * cs, min(b * cs, self.src.size), bad)
                    buf[(a - first) * cs : (a - first) * cs + len(part)] = part
                    read += n
            data = buf
        skip = set(unread)
        hold = self.changed is not None and not send_now and not self.opts.dry_run
        hashes: list[bytes] = []
        zero: list[bool] = []
        leaf_hash = self.codec.leaf_hash
        encoded: list[tuple[int, bytes] | None] | None = [] if send_now else None
        view = memoryview(data)
        for c in range(first, last):
            at, length = (c - first) * cs, self.src.chunk_length(c)
            if c in skip:  # its digest comes from the target
                hashes.append(bytes(HASH_SIZE))
                zero.append(False)
                continue
            if data.startswith(codec.zeros(length), at):  # memcmp, no copy
                hashes.append(zero_hash(length))
                zero.append(True)
                if encoded is not None:
                    encoded.append(None)
                if hold:
                    self._hold(c, (int(Kind.ZERO), b""))
                continue
            piece = view[at : at + length]
            digest = leaf_hash(piece, c)
            hashes.append(digest)
            zero.append(False)
            if hold:
                self._hold(c, self._encode(piece, c, digest))
            if encoded is not None:
                encoded.append(self._encode(piece, c, digest) if not self.opts.dry_run
                               else (0, b""))
        return _Batch(first, hashes, zero, encoded, bad, unread, read)

    def _compare_by_index(self, index: Any) -> None:
        """Image source with the target's geometry: digests come from its index."""
        for c_page, h in enumerate(index.node_hashes(1)):
            a, b = self.src.chunk_range(1, c_page)
            with self._cv:
                self.conv.set_leaves(a, b"".join(index.leaf_hashes(c_page)))
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


@dataclass(frozen=True)
class ScanPlan:
    """What a push reads of its source (``plan_scan``)."""

    data: Ranges  # what may hold data; the rest reads as zeros
    changed: Ranges | None  # a trusted map of changed ranges; None: compare everything
    change_base: Any  # what the reader's map is relative to (JSON), recorded with the push
    map: str  # what narrowed the reading ("full", "sparse", "dirty-bitmap+free-blocks"...)
    map_fallback: str  # why the map of changed ranges was not used ("" when it was)
    warnings: list[str]


def plan_reads(reader: SourceReader, *, skip_free_blocks: bool = False,
               read_metadata: Callable[[int, int], bytes] | None = None,
               ) -> tuple[Ranges, list[str], list[str]]:
    """What may hold data (the reader's extents, less free blocks with ``skip_free_blocks``,
    their maps read through ``read_metadata``), the names of what narrowed it, and
    warnings: the part of a scan's plan that does not depend on the target."""
    size = reader.size
    data = Ranges(reader.extents(), size)
    names = [reader.extents_map] if data.total < size else []
    warnings: list[str] = []
    if skip_free_blocks:
        free = free_blocks(read_metadata or reader.read, size)
        warnings += [f"--skip-free-blocks: {w}" for w in free.problems]
        if free.free:
            data = Ranges(subtract_ranges(data.ranges(), free.free), size)
            names.append("free-blocks")
    return data, names, warnings


def plan_scan(reader: SourceReader, target_info: dict[str, Any], *,
              skip_free_blocks: bool = False,
              read_metadata: Callable[[int, int], bytes] | None = None,
              reads: tuple[Ranges, list[str], list[str]] | None = None) -> ScanPlan:
    """What a push reads: the reader's extents (bytes outside them are zeros), less free
    blocks with ``skip_free_blocks`` (their maps read through ``read_metadata``), and only
    the chunks its map of changed ranges says may differ from the target's newest
    generation, when ``target_info`` (the target's Hello) shows that generation is the one
    the map is relative to (``reads``: ``plan_reads``'s answer, when already known). The
    sync protocol's scan and a push into an encrypted repository (which reads its source
    directly) plan alike."""
    data, names, warnings = reads or plan_reads(reader, skip_free_blocks=skip_free_blocks,
                                                read_metadata=read_metadata)
    names, warnings = list(names), list(warnings)
    size = reader.size
    raw_base = reader.change_base()
    # compared and recorded as JSON, the form the target's metadata gives back
    base = json.loads(json.dumps(raw_base)) if raw_base is not None else None
    ranges = reader.changed_ranges()
    name = str((base or {}).get("map", "changed ranges"))
    fallback, changed = "", None
    if ranges is None and base is not None:
        fallback = "the source knows no changed ranges"
    elif ranges is not None:
        fallback = _map_refused(target_info, base)
        if not fallback:
            changed = Ranges(ranges, size)
            names.insert(0, name)
    if fallback:
        warnings.append(f"full scan: {name} not used because {fallback}")
    return ScanPlan(data, changed, base, "+".join(names) or "full", fallback, warnings)


def _map_refused(target: dict[str, Any], base: Any) -> str:
    """Why a map of changed ranges relative to ``base`` cannot be trusted against the target
    that said ``target`` in its Hello ("" when it can)."""
    if base is None:
        return "the source does not say which generation its map is relative to"
    if target.get("kind") == "raw":
        return "the target is a raw file, whose content no generation records"
    if "generation" not in target:
        return "the target does not report its newest generation (an older diskrsync)"
    gen = target["generation"]
    if not gen:
        return "the target has no generation yet (first push)"
    if target.get("resumed"):
        return "the target resumes an interrupted push's checkpoint"
    theirs = target.get("change_base")
    if theirs is None:
        return f"the target's newest generation {gen} was not pushed with this map"
    if theirs != base:
        return f"the target's newest generation {gen} was pushed with another map " \
               f"({_short(theirs)}, this one is relative to {_short(base)})"
    return ""


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:119] + "…"
