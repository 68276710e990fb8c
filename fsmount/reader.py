"""Serving byte ranges of pinned generations from chunks, on the trio loop.

Where the line between the loop and worker threads is drawn:

* inline on the loop: zero chunks (``chunk_is_zero`` is metadata, the answer is a view of
  shared zeros),
  cache hits (a dict look-up and a slice of at most one request, microseconds), and the
  bookkeeping of in-flight fetches and read-ahead;
* in a worker thread (``trio.to_thread.run_sync``): ``read_chunk`` on a miss, i.e. the pread,
  decompression and hash check, which take milliseconds per chunk and would stall every other
  request if run on the loop.

A miss is fetched once however many requests want the chunk at the same time: later ones wait
on the first one's result. A handle that reads sequentially starts fetching the next chunks in
the background (read-ahead) without delaying its reply.

Read-ahead works in aligned spans of ``SPAN_BYTES`` (1 MiB, the largest request the kernel
sends), or ``LONG_SPAN_BYTES`` once a reader keeps streaming: a worker thread decodes a span's
chunks into one ``SpanBuffer``, and the cache holds views of it. A request that falls inside
one span (every request of a sequential reader, with ``read_ahead_kb`` at 1 MiB) is then
answered with a view of that buffer: no copy on the loop, where a join of eight chunks cost a
1 MiB copy per request. Requests of zeros are answered with a view of one shared block of
zeros. Only requests that straddle spans or chunks decoded apart are joined. Every byte served
was still hash-checked by ``read_chunk``.
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
SPAN_BYTES = 1024 * 1024
LONG_SPAN_BYTES = 4 * SPAN_BYTES

#: what a read answers: a view where no copy was needed
Buffer = bytes | memoryview

_zero_block = memoryview(bytes(SPAN_BYTES))


def _zeros(length: int) -> memoryview:
    """``length`` zeros: a view of one shared, read-only block (grown for larger requests)."""
    global _zero_block
    if length > len(_zero_block):
        _zero_block = memoryview(bytes(length))
    return _zero_block[:length]


class SpanBuffer(bytearray):
    """The decoded chunks [``first``, ``stop``) of one read-ahead span, back to back.

    Written only by the worker thread that fills it, before anyone else sees it; read-only
    from then on (the cache and the kernel's replies hold views of it). ``complete``: every
    chunk of the span was decoded into it and matched its hash (else chunks cached or being
    fetched when the span was claimed, or that failed, are left as zeros and never served
    from it)."""

    first: int
    stop: int
    complete: bool = False


@dataclass(eq=False)
class _InFlight:
    """One fetch in progress: a single chunk, or the chunks of a read-ahead span."""

    done: trio.Event = field(default_factory=trio.Event)
    data: dict[int, memoryview] = field(default_factory=dict)  # chunk index -> its bytes
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

    async def read(self, handle: FileHandle, offset: int, size: int) -> Buffer:
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

    async def read_range(self, view: GenerationView, offset: int, length: int) -> Buffer:
        """Bytes [offset, offset+length) of the generation's disk (clipped to its size)."""
        chunk = view.chunk_size
        number = view.number
        ranges = chunk_ranges(offset, length, chunk, view.size)
        if not ranges:
            return b""
        total = sum(b - a for _, a, b in ranges)
        first = self.cache.get((number, ranges[0][0]))
        if first is not None:
            if len(ranges) == 1:
                return first[ranges[0][1] : ranges[0][2]]
            base = first.obj
            if isinstance(base, SpanBuffer) and base.complete and ranges[-1][0] < base.stop:
                # the whole request in one span that holds all its chunks: a view, no copy
                start = (ranges[0][0] - base.first) * chunk + ranges[0][1]
                return memoryview(base)[start : start + total]
        # Whole chunks: views of cached chunks, None for zeros and for misses.
        snapshot = view.snapshot
        chunks: list[memoryview | None] = [first]
        missing: list[int] = []
        zeros = 0
        for pos, (index, _, _) in enumerate(ranges):
            data = first if pos == 0 else self.cache.get((number, index))
            if pos:
                chunks.append(data)
            if data is None:
                if (number, index) not in self._inflight and snapshot.chunk_is_zero(index):
                    zeros += 1
                else:
                    missing.append(pos)
        self.stats.zero_chunks += zeros
        if missing:
            began = time.perf_counter()
            await self._wait_for(view, ranges, chunks, missing)
            self.stats.waited += 1
            self.stats.wait_seconds += time.perf_counter() - began
        if zeros == len(ranges):
            return _zeros(total)
        if len(ranges) > 1 and not zeros:
            bases = {id(c.obj) for c in chunks if c is not None}
            base = chunks[0].obj if chunks[0] is not None else None
            if len(bases) == 1 and isinstance(base, SpanBuffer):
                start = (ranges[0][0] - base.first) * chunk + ranges[0][1]
                return memoryview(base)[start : start + total]
        pieces = [
            _zeros(b - a) if c is None else c[a:b]
            for c, (_, a, b) in zip(chunks, ranges, strict=True)
        ]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _wait_for(
        self, view: GenerationView, ranges: list[tuple[int, int, int]],
        chunks: list[memoryview | None], missing: list[int],
    ) -> None:
        """Fill ``chunks[pos]`` for each ``pos`` in ``missing``: chunks being decoded by
        read-ahead (zero chunks among them) from their span, the others fetched."""
        number = view.number
        # Chunks that a read-ahead span is decoding: wait once per span, not once per chunk.
        flights = {
            pos: flight for pos in missing
            if (flight := self._inflight.get((number, ranges[pos][0]))) is not None
            and flight.readahead
        }
        for flight in {id(f): f for f in flights.values()}.values():
            self.stats.coalesced += 1
            await flight.done.wait()
        rest = []
        for pos in missing:
            flight = flights.get(pos)
            data = None if flight is None else flight.data.get(ranges[pos][0])
            if data is None:
                rest.append(pos)
            else:
                chunks[pos] = data
        if len(rest) == 1:
            chunks[rest[0]] = await self._fetch(view, ranges[rest[0]][0])
        elif rest:
            async def one(pos: int) -> None:
                chunks[pos] = await self._fetch(view, ranges[pos][0])

            async with trio.open_nursery() as nursery:
                for pos in rest:
                    nursery.start_soon(one, pos)

    async def _fetch(self, view: GenerationView, index: int) -> memoryview:
        """Chunk ``index`` (not a zero chunk), decoded once however many ask at a time."""
        key = (view.number, index)
        while (flight := self._inflight.get(key)) is not None:
            self.stats.coalesced += 1
            await flight.done.wait()
            data = flight.data.get(index)
            if data is not None:
                return data
            if not flight.readahead:
                assert flight.error is not None
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
            data = memoryview(await trio.to_thread.run_sync(
                view.snapshot.read_chunk, index, limiter=self._limiter
            ))
            self.stats.fetch_seconds += time.perf_counter() - began
            if not view.closed:  # a generation dropped meanwhile must not refill the cache
                self.cache.put(key, data)
            flight.data[index] = data
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
        chunks = view.snapshot.chunk_count
        end_of_file = (handle.start + handle.size - 1) // chunk + 1
        stop = min(handle.last_chunk + 1 + count, end_of_file, chunks)
        begin = max(handle.last_chunk + 1, handle.readahead_until)
        if begin >= stop:
            return
        # Whole spans, aligned to their size, so that the kernel's requests fall inside one
        # span buffer each. A reader that keeps streaming gets longer spans: one thread hand-off
        # and one task on the loop per 4 MiB instead of per 1 MiB.
        span = max(1, SPAN_BYTES // chunk)
        long_span = span * (LONG_SPAN_BYTES // SPAN_BYTES) if handle.streak >= 8 else span
        assert self._nursery is not None
        number = view.number
        lo = begin - begin % span
        while lo < stop:
            hi = min(lo + (long_span if lo % long_span == 0 else span), end_of_file, chunks)
            handle.readahead_until = hi
            start, lo = lo, hi
            # Chunks cached or being fetched are left out (their own views serve them).
            wanted = [
                index for index in range(start, hi)
                if (number, index) not in self._inflight and (number, index) not in self.cache
            ]
            if not wanted:
                continue
            flight = _InFlight(readahead=True)
            for index in wanted:
                # Claimed now: readers of these chunks wait for the span instead of fetching.
                self._inflight[(number, index)] = flight
            self._nursery.start_soon(self._prefetch, view, start, hi, wanted, flight)

    async def _prefetch(
        self, view: GenerationView, lo: int, hi: int, wanted: list[int], flight: _InFlight
    ) -> None:
        """Decode chunks ``wanted`` of span [lo, hi) into one buffer (in a worker thread)."""
        snapshot = view.snapshot
        chunk = view.chunk_size
        end = min(hi * chunk, view.size)

        def work() -> tuple[SpanBuffer, dict[int, Exception], int, float]:
            began = time.perf_counter()
            buf = SpanBuffer(end - lo * chunk)  # zeros
            buf.first, buf.stop = lo, hi
            into = memoryview(buf)  # a wrong length raises instead of resizing buf
            errors: dict[int, Exception] = {}
            decoded = 0
            for index in wanted:
                try:
                    if snapshot.chunk_is_zero(index):
                        continue
                    at = (index - lo) * chunk
                    into[at : min(at + chunk, len(buf))] = snapshot.read_chunk(index)
                    decoded += 1
                except Exception as exc:  # one bad chunk fails only itself
                    errors[index] = exc
            into.release()
            buf.complete = len(wanted) == hi - lo and not errors
            return buf, errors, decoded, time.perf_counter() - began

        try:
            if not view.closed:
                buf, errors, decoded, seconds = await trio.to_thread.run_sync(
                    work, limiter=self._readahead_limiter
                )
                self.stats.chunk_reads += decoded
                self.stats.readahead_started += decoded
                self.stats.fetch_seconds += seconds
                whole = memoryview(buf)
                number = view.number
                for index in wanted:
                    error = errors.get(index)
                    if error is not None:
                        log.debug("read-ahead of chunk %d of generation %d failed: %s", index,
                                  number, error)
                        continue
                    at = (index - lo) * chunk
                    data = whole[at : at + chunk]
                    flight.data[index] = data
                    # A span of zeros is not cached (zeros are answered without it); in a span
                    # with data, its zero chunks are cached too, so requests stay in one view.
                    if decoded and not view.closed:
                        self.cache.put((number, index), data)
        finally:
            if not flight.data:
                flight.error = RuntimeError("read-ahead did not run")
            for index in wanted:
                del self._inflight[(view.number, index)]
            flight.done.set()
