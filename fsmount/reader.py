"""Serving byte ranges of pinned generations from chunks, on the trio loop.

Where the line between the loop and worker threads is drawn:

* inline on the loop: zero chunks (``chunk_is_zero`` is metadata, the answer is ``bytes(n)``),
  cache hits (a dict look-up and a slice of at most one request, microseconds), and the
  bookkeeping of in-flight fetches and read-ahead;
* in a worker thread (``trio.to_thread.run_sync``): ``read_chunk`` on a miss, i.e. the pread,
  decompression and hash check, which take milliseconds per chunk and would stall every other
  request if run on the loop.

A miss is fetched once however many requests want the chunk at the same time: later ones wait
on the first one's result. A handle that reads sequentially starts fetching the next chunks in
the background (read-ahead) without delaying its reply.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import trio

from diskrsync.fsmount.cache import ChunkCache
from diskrsync.fsmount.vfs import FileHandle, GenerationView, chunk_ranges

log = logging.getLogger(__name__)

READAHEAD_BYTES = 8 * 1024 * 1024
READAHEAD_MAX_CHUNKS = 64
READAHEAD_BATCH_BYTES = 1024 * 1024


_ZEROS: dict[int, memoryview] = {}


def _zeros(length: int) -> memoryview:
    """A shared, read-only block of ``length`` zeros."""
    z = _ZEROS.get(length)
    if z is None:
        z = _ZEROS[length] = memoryview(bytes(length))
    return z


@dataclass(eq=False)
class _InFlight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    readahead: bool = False


@dataclass
class ReaderStats:
    chunk_reads: int = 0  # read_chunk calls made (misses actually fetched)
    coalesced: int = 0  # requests that waited on another request's fetch
    readahead_started: int = 0
    zero_chunks: int = 0
    requests: int = 0  # read requests served
    request_bytes: int = 0
    waited: int = 0  # requests that had to wait for a chunk (not all cached or zero)
    wait_seconds: float = 0.0  # time those requests spent waiting
    fetch_seconds: float = 0.0  # worker-thread time in read_chunk

    def summary(self) -> str:
        avg = self.request_bytes // self.requests if self.requests else 0
        return (
            f"{self.requests} reads ({self.request_bytes >> 20} MiB, {avg >> 10} KiB average), "
            f"{self.waited} waited {self.wait_seconds:.2f} s; {self.chunk_reads} chunk reads "
            f"({self.readahead_started} by read-ahead, {self.fetch_seconds:.2f} s in threads), "
            f"{self.coalesced} coalesced, {self.zero_chunks} zero chunks"
        )


class ChunkReader:
    """Reads ranges of generations through a ``ChunkCache``; use from the trio loop only."""

    def __init__(
        self,
        cache: ChunkCache,
        *,
        threads: int | None = None,
        readahead_bytes: int = READAHEAD_BYTES,
    ) -> None:
        self.cache = cache
        cpus = os.cpu_count() or 2
        self._limiter = trio.CapacityLimiter(threads or max(4, 2 * cpus))
        self._readahead_limiter = trio.CapacityLimiter(max(1, cpus))
        self._readahead_bytes = readahead_bytes
        self._inflight: dict[tuple[int, int], _InFlight] = {}
        self._nursery: trio.Nursery | None = None
        self.stats = ReaderStats()

    def start_readahead(self, nursery: trio.Nursery) -> None:
        """Enable read-ahead; its fetches run as tasks of ``nursery``."""
        self._nursery = nursery

    async def read(self, handle: FileHandle, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of an open file (clipped to its size)."""
        if offset >= handle.size or size <= 0:
            return b""
        size = min(size, handle.size - offset)
        start = handle.start + offset
        self.stats.requests += 1
        self.stats.request_bytes += size
        # Read-ahead first: its batches run on other cores while this request waits.
        self._note_access(handle, start, size)
        return await self.read_range(handle.view, start, size)

    async def read_range(self, view: GenerationView, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the generation's disk (clipped to its size)."""
        snapshot = view.snapshot
        ranges = chunk_ranges(offset, length, view.chunk_size, view.size)
        # Pieces are views (no copy) of cached chunks and of one shared block of zeros; the one
        # copy is the join below (pyfuse3 takes any buffer, but only one).
        pieces: list[bytes | memoryview | None] = []
        missing: list[int] = []
        for pos, (index, a, b) in enumerate(ranges):
            if snapshot.chunk_is_zero(index):
                self.stats.zero_chunks += 1
                pieces.append(_zeros(view.chunk_size)[: b - a])
                continue
            data = self.cache.get((view.number, index))
            if data is None:
                missing.append(pos)
                pieces.append(None)
            else:
                pieces.append(memoryview(data)[a:b])
        if missing:
            began = time.perf_counter()
            if len(missing) == 1:
                index, a, b = ranges[missing[0]]
                pieces[missing[0]] = memoryview(await self._fetch(view, index))[a:b]
            else:
                async def one(pos: int) -> None:
                    index, a, b = ranges[pos]
                    pieces[pos] = memoryview(await self._fetch(view, index))[a:b]

                async with trio.open_nursery() as nursery:
                    for pos in missing:
                        nursery.start_soon(one, pos)
            self.stats.waited += 1
            self.stats.wait_seconds += time.perf_counter() - began
        if len(pieces) == 1:
            assert pieces[0] is not None
            return bytes(pieces[0])
        return b"".join(p for p in pieces if p is not None)

    async def _fetch(self, view: GenerationView, index: int) -> bytes:
        key = (view.number, index)
        while (flight := self._inflight.get(key)) is not None:
            self.stats.coalesced += 1
            await flight.done.wait()
            if flight.error is None:
                assert flight.data is not None
                return flight.data
            if not flight.readahead:
                raise flight.error
            # Read-ahead failed for it: fetch it ourselves, so the error (if any) is ours.
        cached = self.cache.get(key)  # filled since the caller looked (e.g. by read-ahead)
        if cached is not None:
            return cached
        flight = _InFlight()
        self._inflight[key] = flight
        try:
            self.stats.chunk_reads += 1
            began = time.perf_counter()
            data = await trio.to_thread.run_sync(
                view.snapshot.read_chunk, index, limiter=self._limiter
            )
            self.stats.fetch_seconds += time.perf_counter() - began
            if not view.closed:  # a generation dropped meanwhile must not refill the cache
                self.cache.put(key, data)
            flight.data = data
            return data
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            flight.done.set()

    # --- read-ahead -----------------------------------------------------------------------

    def _note_access(self, handle: FileHandle, start: int, size: int) -> None:
        chunk = handle.view.chunk_size
        first, last = start // chunk, (start + size - 1) // chunk
        # The kernel issues read-ahead requests concurrently, so they may arrive slightly out
        # of order: anything starting within two chunks after the last one counts.
        if handle.last_chunk <= first <= handle.last_chunk + 2:
            handle.streak += 1
        else:
            handle.streak = 0
            handle.readahead_until = 0
        handle.last_chunk = max(last, handle.last_chunk) if handle.streak else last
        if handle.streak >= 1 and self._nursery is not None:
            self._readahead(handle)

    def _readahead(self, handle: FileHandle) -> None:
        view = handle.view
        chunk = view.chunk_size
        full = max(2, min(READAHEAD_MAX_CHUNKS, math.ceil(self._readahead_bytes / chunk)))
        if self.cache.max_bytes < 2 * full * chunk:
            return  # read-ahead would only evict what it fetched
        # The window doubles with each sequential request (4, 8, 16... chunks up to the full
        # window), so that two nearby random reads do not start megabytes of decompression.
        count = min(full, 2 << min(handle.streak, 16))
        end_of_file = (handle.start + handle.size - 1) // chunk + 1
        stop = min(handle.last_chunk + 1 + count, end_of_file, view.snapshot.chunk_count)
        begin = max(handle.last_chunk + 1, handle.readahead_until)
        if begin >= stop:
            return
        handle.readahead_until = stop
        assert self._nursery is not None
        # One worker-thread call per batch of chunks (~256 KiB): fewer thread hand-offs.
        batch_len = max(1, READAHEAD_BATCH_BYTES // chunk)
        batch: dict[int, _InFlight] = {}
        for index in range(begin, stop):
            key = (view.number, index)
            if key in self._inflight or key in self.cache or view.snapshot.chunk_is_zero(index):
                continue
            # Claimed now: readers of these chunks wait for the batch instead of fetching.
            flight = self._inflight[key] = _InFlight(readahead=True)
            batch[index] = flight
            if len(batch) == batch_len:
                self._nursery.start_soon(self._prefetch, view, batch)
                batch = {}
        if batch:
            self._nursery.start_soon(self._prefetch, view, batch)

    async def _prefetch(self, view: GenerationView, batch: dict[int, _InFlight]) -> None:
        self.stats.readahead_started += len(batch)
        self.stats.chunk_reads += len(batch)
        snapshot = view.snapshot

        def work() -> tuple[dict[int, bytes | Exception], float]:
            began = time.perf_counter()
            out: dict[int, bytes | Exception] = {}
            for index in batch:
                try:
                    out[index] = snapshot.read_chunk(index)
                except Exception as exc:  # one bad chunk fails only itself
                    out[index] = exc
            return out, time.perf_counter() - began

        results: dict[int, bytes | Exception] = {}
        try:
            if not view.closed:
                results, seconds = await trio.to_thread.run_sync(
                    work, limiter=self._readahead_limiter
                )
                self.stats.fetch_seconds += seconds
        finally:
            for index, flight in batch.items():
                result = results.get(index)
                if isinstance(result, bytes):
                    if not view.closed:
                        self.cache.put((view.number, index), result)
                    flight.data = result
                else:
                    flight.error = result or RuntimeError("read-ahead did not run")
                    log.debug("read-ahead of chunk %d of generation %d failed: %s", index,
                              view.number, flight.error)
                del self._inflight[(view.number, index)]
                flight.done.set()
