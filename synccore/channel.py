"""Message channels between a source and a target: the thin I/O layer around the protocol.

``FramedChannel`` speaks the wire format over any byte stream (pipes, a socket, an SSH
channel); once the peer's Hello says it understands them, it sends ``Alive`` frames after a
quiet second, so a peer's ``--timeout`` (a stream that raises ``TimeoutError`` when nothing
arrives for that long) catches a frozen peer but never a long scan of unchanged data.
``channel_pair`` connects two ends in one process with bounded queues and no encoding.
``DelayedChannel`` adds one-way latency to every message while keeping the link pipelined.

All channels are safe to ``send`` from several threads and ``recv`` from one other thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import queue
import select
import stat
import threading
import time
from collections.abc import Callable
from typing import Protocol

from diskrsync.base.errors import ConnectionClosed, PeerError
from diskrsync.synccore import protocol as p

_EOF = object()
#: A FramedChannel that has sent nothing for this long sends an Alive frame.
ALIVE_INTERVAL = 1.0


class TokenBucket:
    """``--bwlimit``: at most ``rate`` bytes per second on average, in bursts of at most
    ``burst`` bytes (default: a quarter of a second's worth, at least 4 KiB).

    ``take(n)`` waits until ``n`` more bytes may pass. Bytes beyond the bucket's content
    are owed, and the wait pays the debt, so one large message is paced as well as many
    small ones; callers send large frames in pieces of at most ``burst`` (``pieces``) so
    the link never falls silent for long. ``clock`` and ``sleep`` are injectable: the tests
    count bytes against a fake clock instead of measuring time. Thread-safe.
    """

    def __init__(self, rate: float, burst: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError("a rate must be positive")
        self.rate = float(rate)
        self.burst = burst or max(int(rate / 4), 4096)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)

    def pieces(self, data: bytes) -> list[memoryview]:
        """``data`` cut into pieces of at most ``burst`` bytes."""
        view = memoryview(data)
        return [view[i : i + self.burst] for i in range(0, len(view), self.burst)] or [view]


class Stream(Protocol):
    """A bidirectional byte pipe (an SSH RemoteProcess fits this)."""

    def send(self, data: bytes) -> None: ...

    def recv(self, max_bytes: int) -> bytes: ...

    def close_send(self) -> None: ...


class Channel(Protocol):
    bytes_sent: int
    bytes_received: int

    def send(self, msg: p.Message) -> None: ...

    def recv(self) -> p.Message | None:
        """The next message, or None when the peer closed cleanly between messages."""
        ...

    def close(self) -> None: ...


def _wait(fd: int, event: int, timeout: float) -> bool:
    """Whether ``fd`` became ready for ``event`` (or hung up) within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(timeout * 1000))


#: What ``FdStream`` raises a pipe's buffer to (Linux's default ``pipe-max-size``).
PIPE_SIZE = 1 << 20


def _widen_pipe(fd: int) -> None:
    """Raise a pipe's buffer from 64 KiB to ``PIPE_SIZE`` where the system allows. Under
    ``serve``, sshd writes the client's data into our stdin: with the default buffer it
    wakes this process for every 64 KiB (~16,000 times per GB, both processes switching on
    the same cores); a larger one lets each side move a MiB per turn. Not a pipe, or not
    allowed: left as it is."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not Linux
        if stat.S_ISFIFO(os.fstat(fd).st_mode) \
                and fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class FdStream:
    """A Stream over two file descriptors (our stdin/stdout, or a child's pipes).

    With ``timeout`` (seconds), a peer that sends nothing, or takes nothing we send, for that
    long raises ``TimeoutError`` instead of blocking forever (the write end is made
    non-blocking for that).
    """

    def __init__(self, rfd: int, wfd: int, timeout: float | None = None) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.timeout = timeout or None
        if self.timeout:
            os.set_blocking(wfd, False)
        for fd in (rfd, wfd):
            _widen_pipe(fd)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
            except BrokenPipeError:
                raise ConnectionClosed("the peer closed the connection") from None
            except BlockingIOError:
                assert self.timeout is not None
                if not _wait(self.wfd, select.POLLOUT, self.timeout):
                    raise TimeoutError(f"the peer took no data for {self.timeout:g} s") \
                        from None
                continue
            view = view[n:]

    def recv(self, max_bytes: int) -> bytes:
        while self.timeout:
            if not _wait(self.rfd, select.POLLIN, self.timeout):
                raise TimeoutError(f"no data from the peer for {self.timeout:g} s")
            try:  # rfd may share the non-blocking write end's file (one socket for both)
                return os.read(self.rfd, max_bytes)
            except BlockingIOError:
                continue
        return os.read(self.rfd, max_bytes)

    def close_send(self) -> None:
        if self.wfd >= 0:
            try:
                os.close(self.wfd)
            finally:
                self.wfd = -1


class FramedChannel:
    """Messages over a byte stream, with the preamble sent first and checked on receipt."""

    def __init__(self, stream: Stream, *, recv_size: int = 1 << 20,
                 limit: TokenBucket | None = None) -> None:
        self.stream = stream
        self.limit = limit  # --bwlimit: bytes both ways together, Alive frames excepted
        self._decoder = p.Decoder()
        self._send_lock = threading.Lock()
        self._greeted = False
        self._recv_size = recv_size
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self._alive: threading.Thread | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, msg: p.Message) -> None:
        frame = p.encode(msg)
        with self._send_lock:
            if not self._greeted:
                frame = p.preamble() + frame
                self._greeted = True
            try:
                if self.limit is None or isinstance(msg, p.Alive):
                    self.stream.send(frame)
                else:
                    for piece in self.limit.pieces(frame):
                        self.limit.take(len(piece))
                        self.stream.send(bytes(piece))
            except TimeoutError as e:
                raise PeerError(str(e)) from None
            except (BrokenPipeError, ConnectionError) as e:
                raise ConnectionClosed(
                    f"the peer closed the connection ({e.strerror or e})") from None
            self.bytes_sent += len(frame)
            self._last_send = time.monotonic()

    def _keep_alive(self) -> None:
        while not self._closed.wait(ALIVE_INTERVAL / 4):
            if time.monotonic() - self._last_send >= ALIVE_INTERVAL:
                try:
                    self.send(p.Alive())
                except Exception:  # the link is gone: the conversation will say so
                    return

    def recv(self) -> p.Message | None:
        while True:
            msg = self._decoder.next()
            if isinstance(msg, p.Alive):
                continue
            if isinstance(msg, p.Hello) and "alive" in msg.info.get("caps", ()) \
                    and self._alive is None:
                self._alive = threading.Thread(target=self._keep_alive, daemon=True,
                                               name="channel-alive")
                self._alive.start()
            if msg is not None:
                return msg
            try:
                data = self.stream.recv(self._recv_size)
            except TimeoutError as e:
                raise PeerError(str(e)) from None
            except ConnectionError as e:
                raise ConnectionClosed(
                    f"the peer closed the connection ({e.strerror or e})") from None
            if not data:
                if self._decoder.pending:
                    raise ConnectionClosed(
                        "the peer closed the connection in the middle of a message")
                return None
            self.bytes_received += len(data)
            if self.limit is not None:
                self.limit.take(len(data))  # reading slower slows the sender (flow control)
            self._decoder.feed(data)

    def close(self) -> None:
        self._closed.set()
        with self._send_lock:
            self.stream.close_send()


class QueueChannel:
    """One end of an in-process pair: messages pass as objects through bounded queues."""

    def __init__(self, inbox: queue.Queue[object], outbox: queue.Queue[object], *,
                 limit: TokenBucket | None = None) -> None:
        self._in, self._out = inbox, outbox
        self.limit = limit  # --bwlimit on a local push: what would cross a wire, sent
        self.bytes_sent = 0
        self.bytes_received = 0
        self._closed = False

    def send(self, msg: p.Message) -> None:
        if self._closed:
            raise PeerError("channel closed")
        size = p.wire_size(msg)
        if self.limit is not None:
            self.limit.take(size)
        self._out.put(msg)
        self.bytes_sent += size

    def recv(self) -> p.Message | None:
        item = self._in.get()
        if item is _EOF:
            self._in.put(_EOF)  # later recv calls see EOF too
            return None
        self.bytes_received += p.wire_size(item)
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.put(_EOF)


def channel_pair(maxsize: int = 64, *,
                 limit: TokenBucket | None = None) -> tuple[QueueChannel, QueueChannel]:
    """Two connected in-process ends; each direction holds at most ``maxsize`` messages;
    ``limit`` paces what the first end sends."""
    a: queue.Queue[object] = queue.Queue(maxsize)
    b: queue.Queue[object] = queue.Queue(maxsize)
    return QueueChannel(a, b, limit=limit), QueueChannel(b, a)


class DelayedChannel:
    """Wraps one end so every message it sends arrives ``delay`` seconds later, pipelined like
    a long link (a benchmark's stand-in for a WAN; tc netem is not available here)."""

    def __init__(self, inner: Channel, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self._heap: list[tuple[float, int, object]] = []
        self._seq = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="delay")
        self._thread.start()

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def _put(self, item: object) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + self.delay, self._seq, item))
            self._cv.notify()

    def send(self, msg: p.Message) -> None:
        self._put(msg)

    def _pump(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cv.wait(timeout)
                _, _, item = heapq.heappop(self._heap)
            if item is _EOF:
                self.inner.close()
                return
            self.inner.send(item)

    def recv(self) -> p.Message | None:
        return self.inner.recv()

    def close(self) -> None:
        self._put(_EOF)


def delayed_pair(delay: float, maxsize: int = 64) -> tuple[DelayedChannel, DelayedChannel]:
    """An in-process pair whose every message takes ``delay`` seconds one way."""
    a, b = channel_pair(maxsize)
    return DelayedChannel(a, delay), DelayedChannel(b, delay)
