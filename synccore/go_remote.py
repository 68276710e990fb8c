"""The Go protocol's engines: serving a Go client, and ``push --legacy`` toward a Go remote.

:func:`serve_go` is what a Go client starts over SSH (``CMD --target|--source [FLAGS]
PATH``, parsed into a ``GoRemoteRequest`` by the CLI); :func:`legacy_push` is ``push
--legacy`` toward a host that runs the Go tool, over the same remote-process wrapper as a
native push (``synccore/remote.py``). Both drive a pure machine (``synccore/legacy.py``) with
:func:`~diskrsync.synccore.go_io.run_machine`; a target writes through the read-modify-write
adapter of ``compression/go_target.py``, opened by the same rules as a native target.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from diskrsync.base.errors import PeerError, UsageError
from diskrsync.base.merkle import HASH_SIZE, Shape, leaf_hash, root_from_leaves
from diskrsync.base.progress import Progress
from diskrsync.compression.format import DEFAULT_FANOUT
from diskrsync.compression.go_target import ImageTargetStore, open_legacy_target
from diskrsync.compression.sources import SourceReader, open_source
from diskrsync.synccore.go_io import GoProgressLines, parallel_leaf_hashes, run_machine
from diskrsync.synccore.legacy import (
    TAIL_BLOCK_SIZE,
    GoRemoteRequest,
    HeaderExchanged,
    LegacySource,
    LegacyTarget,
    RangeSynced,
)
from diskrsync.synccore.location import LocalPath, Location, RemotePath
from diskrsync.synccore.push import PushRequest
from diskrsync.synccore.remote import RemoteOptions, start_remote
from diskrsync.synccore.source import PushStats

__all__ = ["GO_CLIENT_SOURCE", "legacy_push", "serve_go"]

#: ``source`` recorded in a generation written by a Go client.
GO_CLIENT_SOURCE = "Go diskrsync client"
#: How long a Go remote may take to exit once the sync is over (a target commits then).
GO_EXIT_WAIT = 120.0

#: (recv, send) of the byte pipe to the peer.
Pipe = tuple[Callable[[int], bytes], Callable[[bytes], None]]


def serve_go(req: GoRemoteRequest, pipe: Pipe, *, log: Callable[[str], None],
             write: Callable[[str], None]) -> None:
    """Act as the Go tool's remote end over ``pipe``: ``log`` takes our own lines,
    ``write`` the progress text the Go client parses (both go to stderr)."""
    if req.mode == "target":
        _serve_go_target(req.path, raw=req.no_compress, calc=req.calc_progress,
                         sync=req.sync_progress, verbose=req.verbose, pipe=pipe, log=log,
                         write=write)
    else:
        _serve_go_source(req.path, calc=req.calc_progress, sync=req.sync_progress,
                         verbose=req.verbose, pipe=pipe, log=log, write=write)


def _serve_go_target(path: str, *, raw: bool, calc: bool, sync: bool, verbose: bool,
                     pipe: Pipe, log: Callable[[str], None],
                     write: Callable[[str], None]) -> None:
    end = open_legacy_target(path, raw=raw, log=log)
    try:
        target_box: list[LegacyTarget] = []
        progress = GoProgressLines(write, calc=calc, sync=sync,
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
                        log(f"local size: {ev.local_size}, remote size: {ev.peer_size}")
                        if ev.shape:
                            s = ev.shape
                            log(f"levels: {s.levels}, order: {s.order}, target block size: "
                                 f"{s.target_block_size}, block size: {s.leaf_size}")
            progress.events(target, events)

        run_machine(target, recv=pipe[0], send=pipe[1], on_events=on_events)
        gen = end.commit(GO_CLIENT_SOURCE, {"protocol": "BSNC0002"})
        if verbose:
            what = f"generation {gen.number}" if gen else "raw file updated"
            log(f"{path}: {what}, {target.peer_size} bytes")
    finally:
        end.close()


def _serve_go_source(path: str, *, calc: bool, sync: bool, verbose: bool, pipe: Pipe,
                     log: Callable[[str], None], write: Callable[[str], None]) -> None:
    reader = open_source(path)
    try:
        progress = GoProgressLines(write, calc=calc, sync=sync, sync_total=lambda: reader.size)
        source = LegacySource(
            reader,
            leaf_hashes=parallel_leaf_hashes(reader.read, on_start=progress.calc_start,
                                             on_progress=progress.calc_update,
                                             on_done=progress.calc_done),
        )
        if verbose:
            log(f"serving {reader.description} ({reader.size} bytes) as a Go diskrsync source")
        run_machine(source, recv=pipe[0], send=pipe[1],
                    on_events=lambda evs: progress.events(source, evs))
    finally:
        reader.close()


# -- push --legacy: this machine is the client, the remote runs the Go tool ----------------


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


class _RootOfReads:
    """The native root of the source (what a native push of it reports and ``diskrsync info``
    shows for an image holding the same bytes), from the bytes the Go exchange reads anyway.

    The exchange reads every source byte exactly once for the Go tree or the tail, and
    re-reads the leaves it sends: each native chunk is hashed once its bytes are all in,
    pieces of a chunk overlapping what it already has (the re-reads) are ignored.
    """

    def __init__(self, reader: SourceReader, chunk_size: int) -> None:
        self.reader = reader
        self.shape = Shape(reader.size, chunk_size, DEFAULT_FANOUT)
        self._leaves = bytearray(self.shape.chunks * HASH_SIZE)
        self._done = bytearray(self.shape.chunks)
        self._parts: dict[int, dict[int, bytes]] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.reader.size

    def read(self, offset: int, length: int) -> bytes:
        data = self.reader.read(offset, length)
        self._feed(offset, memoryview(data))
        return data

    def _feed(self, offset: int, data: memoryview) -> None:
        cs, pos = self.shape.chunk_size, 0
        while pos < len(data):
            at = offset + pos
            index = at // cs
            start, end = index * cs, min(index * cs + cs, self.shape.size)
            n = min(end - at, len(data) - pos)
            if at == start and n == end - start:
                self._leaf(index, data[pos : pos + n])
            else:
                self._piece(index, at, bytes(data[pos : pos + n]), end - start)
            pos += n

    def _leaf(self, index: int, data: memoryview | bytes) -> None:
        with self._lock:
            if self._done[index]:
                return
            self._done[index] = 1
            self._parts.pop(index, None)
        self._leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE] = leaf_hash(data)

    def _piece(self, index: int, at: int, data: bytes, chunk_length: int) -> None:
        with self._lock:
            if self._done[index]:
                return
            parts = self._parts.setdefault(index, {})
            if any(o < at + len(data) and at < o + len(d) for o, d in parts.items()):
                return  # a re-read of bytes this chunk already has
            parts[at] = data
            if sum(len(d) for d in parts.values()) < chunk_length:
                return
            whole = b"".join(parts[o] for o in sorted(parts))
        self._leaf(index, whole)

    def root(self) -> str:
        """The root as hex; "" if some byte was never read (cannot happen after a sync)."""
        if self._done.count(0):
            return ""
        return root_from_leaves(self.shape, self._leaves).hex()


def _converse(
    remote: RemotePath, opts: RemoteOptions, argv: list[str],
    machine: LegacySource | LegacyTarget, on_events: Callable[[list[Any]], None],
) -> tuple[int, int]:
    """Run ``argv`` remotely and drive ``machine`` against it to the end; then check that
    the remote sent nothing more and exited 0. Returns (bytes sent, bytes received)."""
    r = start_remote(remote, opts, argv, go=True)
    proc = r.proc

    def body() -> tuple[int, int]:
        sent, received = run_machine(machine, recv=proc.recv, send=proc.send,
                                     on_events=on_events)
        proc.close_send()  # a Go target finds the end of the tail by EOF
        extra = proc.recv(65536)
        if extra:
            raise PeerError(f"{r.cmd} on {r.host} sent {len(extra)} bytes after the end of "
                            f"the sync")
        return sent, received

    return r.converse(body, wait=GO_EXIT_WAIT)


def legacy_push(src_loc: Location, dst_loc: Location, req: PushRequest,
                opts: RemoteOptions) -> PushStats:
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
    if req.source.skip_free_blocks:
        raise UsageError("--skip-free-blocks is not possible with --legacy")
    if isinstance(src_loc, RemotePath) and isinstance(dst_loc, RemotePath):
        raise UsageError("--legacy: one end must be on this machine")
    if isinstance(src_loc, LocalPath) and isinstance(dst_loc, LocalPath):
        raise UsageError("--legacy needs a remote end ([user@]host:path) running the Go "
                         "diskrsync; between local paths use plain push")
    if isinstance(dst_loc, RemotePath):
        assert isinstance(src_loc, LocalPath)
        return _push_to_go(src_loc.path, dst_loc, req, opts)
    assert isinstance(src_loc, RemotePath) and isinstance(dst_loc, LocalPath)
    return _pull_from_go(src_loc, dst_loc.path, req, opts)


def _push_to_go(src: str, dst: RemotePath, req: PushRequest, opts: RemoteOptions) -> PushStats:
    started = time.monotonic()
    reader = open_source(src, req.generation)
    if getattr(reader, "encryption", None) is not None:
        reader.close()
        raise UsageError(f"{src} is encrypted, and a Go diskrsync would receive it in plain: "
                         f"push it to a diskrsync server, or restore it first if plain data "
                         f"is what you want there")
    try:
        stats = PushStats(size=reader.size)
        tally = _Tally(stats, reads_ranges=True)
        hashed = _RootOfReads(reader, req.source.chunk_size)
        argv = ["--target"]
        if req.raw_target:
            argv.append("--no-compress")  # we quote word by word: no leading space (cf. Go)
        progress = opts.remote_progress
        if progress:
            argv += ["--calc-progress", "--sync-progress"]
        argv.append(dst.path)
        source = LegacySource(hashed, leaf_hashes=parallel_leaf_hashes(hashed.read))
        bar = Progress(reader.size, "push", progress)
        done = [0]

        def on_events(events: list[Any]) -> None:
            tally.events(events)
            for ev in events:
                if isinstance(ev, HeaderExchanged):
                    stats.created = ev.peer_size == 0  # Go creates a missing PATH
            bar.update(source.position - done[0])
            done[0] = source.position

        try:
            sent, received = _converse(dst, opts, argv, source, on_events)
        finally:
            bar.close()
    finally:
        reader.close()
    stats.bytes_sent, stats.bytes_received = sent, received
    stats.root_hash = hashed.root()
    stats.duration = time.monotonic() - started
    return stats


def _pull_from_go(src: RemotePath, dst: str, req: PushRequest,
                  opts: RemoteOptions) -> PushStats:
    started = time.monotonic()
    stats = PushStats()
    tally = _Tally(stats, reads_ranges=False)
    progress = opts.remote_progress
    argv = ["--source", *(["--calc-progress"] if progress else []), src.path]

    def log(message: str) -> None:
        print(f"diskrsync: {message}", file=sys.stderr)

    end = open_legacy_target(dst, raw=req.raw_target, keep=req.target.keep, log=log,
                             chunk_size=req.source.chunk_size, name=src.path)
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

        sent, received = _converse(src, opts, argv, target, on_events)
        # only a complete exchange with a remote that exited 0 becomes a generation
        label = req.source.label or f"Go diskrsync on {src}"
        gen = end.commit(label, {"protocol": "BSNC0002"})
    finally:
        bars[0].close()
        end.close()
    # as in a native pull, bytes_sent is source to target: what arrived here
    stats.bytes_sent, stats.bytes_received = received, sent
    stats.created = end.kind == "new" or (end.kind == "raw" and end.created)
    stats.generation = gen.number if gen else None
    stats.root_hash = gen.root_hash.hex() if gen else ""
    stats.duration = time.monotonic() - started
    return stats
