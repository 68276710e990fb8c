"""The target side of a native push: answer digests, store differing chunks, commit on a
matching root.

The stores themselves (an image, or a raw file or block device) and the rules that pick one
for a path live in ``compression/targets.py``, shared with the Go protocol; :class:`WireStore`
translates between them and this protocol's messages. ``serve_target`` runs the conversation
over any channel.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from diskrsync import __version__
from diskrsync.base.errors import DiskrsyncError, PeerError
from diskrsync.base.parallel import worker_count
from diskrsync.compression.targets import (
    ImageStore,
    RawStore,
    StoreResult,
    TargetOptions,
    open_target,
)
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import Channel
from diskrsync.synccore.conversation import (
    ChunkArrived,
    DoneArrived,
    EstimateArrived,
    LeavesWanted,
    PagesWanted,
    SourceHello,
    TargetConversation,
    error_message,
)

__all__ = ["TargetOptions", "TargetStore", "WireStore", "open_store", "serve_target"]


class TargetStore(Protocol):
    chunk_size: int
    fanout: int
    base_size: int
    info: dict[str, Any]

    def send_page_hashes(self, send: Callable[[p.Message], None]) -> None: ...

    def check_space(self, info: dict[str, Any]) -> None:
        """A first push's estimate: refuse (LocalError) when it will not fit."""
        ...

    def leaf_hashes(self, page: int) -> bytes: ...

    def put(self, index: int, kind: int, digest: bytes, payload: bytes) -> None: ...

    def finish(self, root: bytes, info: dict[str, Any]) -> p.Committed: ...

    def abort(self, save: bool) -> None:
        """Give up the push; with ``save``, keep what arrived as a checkpoint first."""
        ...

    def close(self) -> None:
        """Release files and locks (idempotent; called after finish or abort)."""
        ...


class WireStore:
    """A store of ``compression.targets`` as the native conversation drives it: protocol
    messages in and out. It keeps what the target end reports afterwards (its own stats):
    the source's hello, the root and info of its Done, and the store's result."""

    def __init__(self, store: ImageStore | RawStore, hello: p.Hello) -> None:
        self.store = store
        self.hello = hello
        self.chunk_size = store.chunk_size
        self.fanout = store.fanout
        self.base_size = store.base_size
        self.info: dict[str, Any] = {"hash": p.HASH, "caps": list(p.CAPABILITIES),
                                     **store.info}
        self.leaf_hashes = store.leaf_hashes
        self.check_space = store.check_space
        self.put = store.put
        self.abort = store.abort
        self.close = store.close
        self.done: tuple[bytes, dict[str, Any]] | None = None
        self.result: StoreResult | None = None

    def send_page_hashes(self, send: Callable[[p.Message], None]) -> None:
        self.store.send_page_hashes(lambda first, packed: send(p.PageHashes(first, packed)))

    def finish(self, root: bytes, info: dict[str, Any]) -> p.Committed:
        self.done = (root, info)
        t0 = time.monotonic()
        self.result = r = self.store.finish(root, info)
        # what this end did, for the source's `push -v` and --json (see target_report)
        did = {"chunks_written": r.stored.chunks, "commit_seconds": time.monotonic() - t0}
        return p.Committed(r.generation, r.root, {**r.info, **did})


def open_store(path: str, hello: p.Hello, opts: TargetOptions, *, raw: bool,
               label: str = "", source_host: str = "") -> WireStore:
    """The store for a push into ``path`` (``compression.targets.open_target``'s rules),
    for the source that said ``hello``. The generation records as its source ``label``,
    else what the source says it is (prefixed ``source_host:`` in a pull)."""
    store = open_target(path, hello.size, hello.chunk_size, opts, raw=raw,
                        name=str(hello.info.get("name", "")),
                        source=str(hello.info.get("source", "")),
                        label=label, source_host=source_host,
                        encrypt=hello.info.get("encrypt"),
                        source_encrypts="encryption" in hello.info.get("caps", ()))
    return WireStore(store, hello)


# -- the conversation ------------------------------------------------------------------


#: chunks checked per task of the verifier pool: one thread hand-off for several chunks
VERIFY_BATCH = 8


class _Verifier:
    """Checks received chunks on the worker threads (``check``), storing them in arrival
    order. Chunks go to the pool ``VERIFY_BATCH`` at a time: handing each one over on its
    own cost the receiving thread and the workers a wake-up per chunk (a tenth of serve's
    CPU in a first push over SSH)."""

    def __init__(self, store: TargetStore, check: Callable[[p.Chunk], p.Chunk],
                 enabled: bool) -> None:
        self.store = store
        self.check = check
        n = worker_count()
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="verify") if enabled else None
        self.window = max(2, n + 1)  # batches being checked (each up to VERIFY_BATCH chunks)
        self.batch: list[p.Chunk] = []
        self.pending: deque[Future[tuple[list[p.Chunk], BaseException | None]]] = deque()

    def add(self, msg: p.Chunk) -> None:
        if self.pool is None:
            self._store(msg)
            return
        self.batch.append(msg)
        if len(self.batch) >= VERIFY_BATCH:
            self._submit()
        while self.pending and self.pending[0].done():
            self._store_batch()

    def _submit(self) -> None:
        assert self.pool is not None
        batch, self.batch = self.batch, []
        self.pending.append(self.pool.submit(self._check_batch, batch))
        while len(self.pending) > self.window:
            self._store_batch()

    def _check_batch(self, batch: list[p.Chunk]) -> tuple[list[p.Chunk],
                                                           BaseException | None]:
        """The chunks that passed, up to the first that did not, and its error."""
        for i, msg in enumerate(batch):
            try:
                self.check(msg)
            except BaseException as e:
                return batch[:i], e
        return batch, None

    def _store_batch(self) -> None:
        good, error = self.pending.popleft().result()
        for msg in good:  # those before a bad one are kept (a checkpoint keeps them)
            self._store(msg)
        if error is not None:
            raise error

    def _store(self, msg: p.Chunk) -> None:
        self.store.put(msg.index, msg.kind, msg.digest, msg.payload)

    def drain(self) -> None:
        if self.batch:
            self._submit()
        while self.pending:
            self._store_batch()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    """The page feed was stopped while it waited for the source to ask for more."""


class _PageFeed:
    """The store's page digests for a source that asks for them a window at a time
    (``WantPages``, capability "page-window"): a thread walks the store's index and sends
    what the source asked for, waiting for it to ask for more, while the conversation goes
    on (Leaves, Chunks). So the source holds a window of the target's digests, not one per
    page of the disk (issue 16). A failure is told to the source at once (it then stops
    the push) and kept in ``error`` for ``serve_target`` to raise as this end's own."""

    def __init__(self, store: TargetStore, send: Callable[[p.Message], None],
                 first: int) -> None:
        self._send = send
        self._cv = threading.Condition()
        self._upto = first  # the first window is sent unasked
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(store,), daemon=True,
                                        name="page-digests")
        self._thread.start()

    def grant(self, upto: int) -> None:
        with self._cv:
            self._upto = max(self._upto, upto)
            self._cv.notify_all()

    def _emit(self, msg: p.Message) -> None:
        assert isinstance(msg, p.PageHashes)
        start, hashes = msg.start, msg.hashes
        while hashes:
            with self._cv:
                while not self._stopped and self._upto <= start:
                    self._cv.wait()
                if self._stopped:
                    raise _Stopped()
                n = min(len(hashes) // p.HASH_SIZE, self._upto - start)
            self._send(p.PageHashes(start, hashes[: n * p.HASH_SIZE]))
            start, hashes = start + n, hashes[n * p.HASH_SIZE :]

    def _run(self, store: TargetStore) -> None:
        try:
            store.send_page_hashes(self._emit)
        except _Stopped:
            pass
        except BaseException as e:
            self.error = e
            with contextlib.suppress(Exception):
                self._send(error_message(e))

    def stop(self, *, wait: bool = True) -> None:
        """Send nothing more; ``wait`` for the thread (not when the source may be gone: a
        send to it may never return)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if wait:
            self._thread.join()


def serve_target(channel: Channel, opener: Callable[[p.Hello], TargetStore], *,
                 verify: bool = True, max_size: int = p.DEFAULT_MAX_SIZE) -> p.Committed | None:
    """Run the target's side until the source's Done is committed (returns Committed), the
    source dry-ran (Committed with generation 0), or an error (raised, after telling the
    peer). A link lost mid-way keeps a checkpoint for the next push. A source larger than
    ``max_size`` is refused before the target is opened. The protocol is
    ``TargetConversation``'s; this drives it with the store and the verifier pool."""
    conv = TargetConversation(max_size=max_size)
    store: TargetStore | None = None
    verifier: _Verifier | None = None
    feed: _PageFeed | None = None
    committed = False
    try:
        first = conv.receive(channel.recv())
        assert isinstance(first, SourceHello)
        store = opener(first.hello)
        channel.send(conv.accept(store.base_size, store.chunk_size, store.fanout,
                                 f"diskrsync {__version__}", store.info))
        if conv.windowed:
            feed = _PageFeed(store, channel.send, conv.first_pages)
        else:  # a source of an older release takes them all at once
            store.send_page_hashes(channel.send)
        verifier = _Verifier(store, conv.check_chunk, verify)
        while True:
            event = conv.receive(channel.recv())
            if isinstance(event, ChunkArrived):
                verifier.add(event.chunk)
            elif isinstance(event, EstimateArrived):
                store.check_space(event.info)
            elif isinstance(event, PagesWanted):
                assert feed is not None
                feed.grant(event.upto)
            elif isinstance(event, LeavesWanted):
                channel.send(conv.leaves(event.page, store.leaf_hashes(event.page)))
            elif isinstance(event, DoneArrived):
                if feed is not None:  # no page digest may follow Committed
                    feed.stop()
                verifier.drain()
                result = store.finish(event.root, event.info)
                committed = True
                channel.send(conv.committed(result))
                return result
    except BaseException as exc:
        error: BaseException = exc
        if feed is not None:
            feed.stop(wait=False)
            if feed.error is not None:  # what the source stopped for (and echoed)
                error = feed.error
        # keep what arrived when the link broke or the source gave up, so the next push
        # resumes from it
        peer = isinstance(error, PeerError) or (isinstance(error, DiskrsyncError)
                                                and error.relayed)
        if store is not None and not committed and verifier is not None and peer:
            try:
                verifier.drain()
            except PeerError as bad:  # a chunk before the end was bad: that is the reason
                error = bad
            except Exception:  # the first error stands
                pass
        if conv.greeted:  # a peer that is not a diskrsync source is not answered
            with contextlib.suppress(Exception):  # the peer may be gone: then this just fails
                channel.send(error_message(error))
        if store is not None and not committed:
            store.abort(save=peer)
        if error is not exc:
            raise error from None
        raise
    finally:
        if feed is not None:
            feed.stop(wait=False)
        if verifier is not None:
            verifier.close()
        if store is not None:
            store.close()
        with contextlib.suppress(Exception):
            channel.close()
