"""The native protocol's conversation, without I/O: one state machine per end.

Design note
-----------
``protocol.py`` frames messages; this module says which message may come when and what it
means, in the style of h11 and of ``legacy.py``. Each end is fed what the peer sent (a message
with ``receive``, or bytes with ``receive_data`` and then ``next_event``) and answers with a
typed event for its driver, or raises: every check of peer input (order, counts, ranges,
sizes, digests) lives here, so a hostile or broken peer always ends in one ``PeerError``, and
an ``Error`` from the peer in the error of its category (``error_from_wire``). What an end
sends is returned by the method that decides it (a message; ``encode`` makes it bytes).

The conversations own no threads, files or clocks: reading the disk, hashing, compressing,
storing and waiting are the drivers' (``SourceSession`` in source.py, ``serve_target`` in
target.py), which run them on worker threads and call in here under one lock. Hence the
orderings of a push can be tested by wiring two conversations through the real codec
(tests/test_conversation.py), with no thread in between.

A push, as the source sees it::

    hello() -> Hello           receive(Hello)       -> TargetReady (shapes of both ends)
                               receive(PageHashes)  -> PagesKnown  (page digests so far)
    page_equal(j, digest)?  else  page_differs(j) -> NeedLeaves | SendChunks
    want_pages() -> WantPages (a window of the target's page digests at a time)
    (adopt_page(j): unchanged by a map of changed ranges, the target's digest is ours)
                               receive(Leaves)      -> SendChunks  (chunks that differ)
    done(info) -> Done         receive(Committed)   -> Finished

and the target::

    receive(Hello)      -> SourceHello   then accept(...) -> Hello, then its page digests
    receive(WantPages)  -> PagesWanted   then its page digests up to that page
    receive(NeedLeaves) -> LeavesWanted  then leaves(page, digests) -> Leaves
    receive(Chunk)      -> ChunkArrived  (check_chunk verifies it; thread-safe)
    receive(Done)       -> DoneArrived   then committed(result) -> Committed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diskrsync.base.errors import ConnectionClosed, DiskrsyncError, PeerError, error_from_wire
from diskrsync.base.merkle import (
    HASH_SIZE,
    PageFolder,
    Shape,
    leaf_hash,
    node_hash_packed,
    zero_hash,
)
from diskrsync.compression import codec
from diskrsync.compression.codec import Kind
from diskrsync.compression.crypto import OpaqueCodec
from diskrsync.synccore import protocol as p

# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetReady:
    """The target's Hello, checked: the geometry both ends now use."""

    hello: p.Hello
    src: Shape  # the source's disk in the target's chunk size and fanout
    dst: Shape  # what the target compares against


@dataclass(frozen=True)
class PagesKnown:
    """The target's digests of pages ``0 .. count-1`` have arrived."""

    count: int


@dataclass(frozen=True)
class SendChunks:
    """Send these chunks of ``page`` (ascending); the page is settled when they are sent."""

    page: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The target committed what we sent (or, in a dry run, told its root)."""

    committed: p.Committed


@dataclass(frozen=True)
class SourceHello:
    """A source's Hello, checked: open the store for it, then call ``accept``."""

    hello: p.Hello


@dataclass(frozen=True)
class LeavesWanted:
    """Answer with ``leaves(page, the store's leaf digests of page)``."""

    page: int


@dataclass(frozen=True)
class ChunkArrived:
    """Store this chunk (after ``check_chunk`` when the source is not trusted)."""

    chunk: p.Chunk


@dataclass(frozen=True)
class DoneArrived:
    """All chunks are in: commit if the store's root equals ``root``, then ``committed``."""

    root: bytes
    info: dict[str, Any]


@dataclass(frozen=True)
class PagesWanted:
    """Send page digests up to page ``upto`` (exclusive; the store's count at most)."""

    upto: int


@dataclass(frozen=True)
class EstimateArrived:
    """A first push's estimate: check it fits (``store.check_space``) before any chunk."""

    info: dict[str, Any]


SourceEvent = TargetReady | PagesKnown | SendChunks | Finished
TargetEvent = (SourceHello | LeavesWanted | ChunkArrived | DoneArrived | EstimateArrived
               | PagesWanted)


def peer_error(msg: p.Error, who: str) -> DiskrsyncError:
    """The error the peer reported, in its category (exit code), named as the peer's."""
    return error_from_wire(msg.kind, f"{who}: {msg.message}")


def error_message(exc: BaseException) -> p.Error:
    """What an end tells its peer when it stops because of ``exc``."""
    return p.Error(type(exc).__name__, str(exc))


class _Conversation:
    """Byte input shared by both ends: a Decoder in front of ``receive``."""

    def __init__(self) -> None:
        self._decoder = p.Decoder()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer, in any split; ``b""`` means it closed its side."""
        if data:
            self._decoder.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Any:
        """The event for the next complete message, None when more bytes are needed (or an
        Alive arrived). At the end of the stream the conversation judges whether it may end."""
        while True:
            msg = self._decoder.next()
            if msg is None:
                if not self._eof:
                    return None
                if self._decoder.pending:
                    raise ConnectionClosed("the connection was cut in the middle of a message")
                return self.receive(None)
            if not isinstance(msg, p.Alive):
                return self.receive(msg)

    def receive(self, msg: p.Message | None) -> Any:
        raise NotImplementedError


# -- the source ---------------------------------------------------------------------------


class SourceConversation(_Conversation):
    """The source's side: compares page and chunk digests, decides what travels.

    The driver gives its chunk digests to ``set_leaves`` as it scans; a page is decided with
    ``page_equal``/``page_differs`` once the target's digest of it is known
    (``needs_target_page``, ``pages_known``). Leaf digests are kept only for the pages not
    settled yet (equal, adopted, or their chunks sent: ``page_sent``); a settled page's
    digest goes into a ``PageFolder``, which keeps only the tree's incomplete nodes, and the
    target's digest of a page is dropped once the page is decided (pages are decided in
    order), so memory follows the pages in flight and not the disk (issue 16: 32 bytes per
    chunk were 256 MiB for 1 TiB, then 64 bytes per page were 8 MiB per TiB).
    """

    FORGET_PAGES = 4096  # the target's digests of decided pages are dropped this many at once
    PAGE_WINDOW = 16384  # page digests asked for ahead of the decided ones ("page-window")

    def __init__(self, size: int, chunk_size: int, fanout: int, software: str,
                 info: dict[str, Any], *, dry_run: bool) -> None:
        super().__init__()
        self.size = size
        self.dry_run = dry_run
        self._hello = p.Hello("source", size, chunk_size, fanout, software,
                              {"dry_run": dry_run, "hash": p.HASH,
                               "caps": list(p.CAPABILITIES),
                               "page_window": self.PAGE_WINDOW, **info})
        self.target: p.Hello | None = None
        self.src = self.dst = Shape(0, p.MAX_CHUNK, 2)
        self._leaves: dict[int, bytearray] = {}  # page -> leaf digests, until settled
        self._mine = PageFolder(self.src)  # digests of the settled pages, folded
        self._theirs = bytearray()  # the target's page digests from page _theirs_from on
        self._theirs_from = 0
        self._pages_known = 0
        self._decided_to = 0  # pages before this are decided: their target digest is unused
        self._decided: set[int] = set()  # pages decided out of order, past _decided_to
        self._windowed = False  # the target sends page digests only as asked (WantPages)
        self._granted = 0  # pages asked for so far
        self._asked: set[int] = set()  # pages whose Leaves we wait for
        self._unread: dict[int, tuple[int, ...]] = {}  # page -> chunks whose digest is theirs
        self._done: p.Done | None = None  # a Committed before our Done is the target's lie
        self.result: p.Committed | None = None

    def hello(self) -> p.Hello:
        return self._hello

    @property
    def pages_known(self) -> int:
        return self._pages_known

    @property
    def target_pages_held(self) -> int:
        """The target's page digests held (what the memory is)."""
        return len(self._theirs) // HASH_SIZE

    def _their_page(self, j: int) -> bytes:
        assert self._theirs_from <= j < self._pages_known, f"target digest of page {j} dropped"
        at = (j - self._theirs_from) * HASH_SIZE
        return bytes(self._theirs[at : at + HASH_SIZE])

    def _decide(self, j: int) -> None:
        """Page j is decided: the target's digest of it is not needed any more."""
        if j < self._decided_to:
            return
        self._decided.add(j)
        while self._decided_to in self._decided:
            self._decided.discard(self._decided_to)
            self._decided_to += 1
        drop = min(self._decided_to, self._pages_known) - self._theirs_from
        if drop >= self.FORGET_PAGES:
            del self._theirs[: drop * HASH_SIZE]
            self._theirs_from += drop

    @property
    def waiting(self) -> int:
        """Pages asked about whose leaf digests have not arrived."""
        return len(self._asked)

    def receive(self, msg: p.Message | None) -> SourceEvent | None:
        if isinstance(msg, p.Alive):  # a channel's business, should one pass it on
            return None
        if isinstance(msg, p.Error):
            raise peer_error(msg, "target")
        if self.target is None:
            if msg is None:
                raise ConnectionClosed("the target closed the connection before saying hello")
            if not isinstance(msg, p.Hello) or msg.role != "target":
                raise PeerError(f"expected the target's hello, got {type(msg).__name__}")
            return self._on_hello(msg)
        if msg is None:
            if self.result is None:
                raise ConnectionClosed("the target closed the connection before committing")
            return None
        if self.result is not None:
            raise PeerError(f"unexpected {type(msg).__name__} from the target after it "
                            f"committed")
        if isinstance(msg, p.PageHashes):
            if msg.start != self.pages_known:
                raise PeerError("target sent page digests out of order")
            if msg.start + len(msg.hashes) // HASH_SIZE > self.dst.count(1):
                raise PeerError(f"target sent more page digests than its "
                                f"{self.dst.count(1)} pages")
            if self._windowed and msg.start + len(msg.hashes) // HASH_SIZE > self._granted:
                raise PeerError("target sent page digests it was not asked for")
            # the digests of pages the source does not have, or has decided, are not kept
            n = len(msg.hashes) // HASH_SIZE
            keep_from = max(self._decided_to, msg.start) - msg.start
            keep_to = max(min(self.src.count(1), msg.start + n) - msg.start, keep_from)
            if keep_from or not self._theirs:  # (then every page held is decided)
                self._theirs = bytearray()
                self._theirs_from = msg.start + keep_from
            self._theirs += msg.hashes[keep_from * HASH_SIZE : keep_to * HASH_SIZE]
            self._pages_known += n
            return PagesKnown(self.pages_known)
        if isinstance(msg, p.Leaves):
            return self._on_leaves(msg)
        if isinstance(msg, p.Committed):
            return self._on_committed(msg)
        raise PeerError(f"unexpected {type(msg).__name__} from the target")

    def _on_hello(self, hello: p.Hello) -> TargetReady:
        p.check_peer(hello, ("zstd", "dry-run") if self.dry_run else ("zstd",))
        self.target = hello
        self.src = Shape(self.size, hello.chunk_size, hello.fanout)
        self.dst = Shape(hello.size, hello.chunk_size, hello.fanout)
        self._mine = PageFolder(self.src)
        self._windowed = "page-window" in hello.info.get("caps", ())
        self._granted = self._hello.info["page_window"]  # what the target sends unasked
        return TargetReady(hello, self.src, self.dst)

    def want_pages(self) -> p.WantPages | None:
        """What to send the target now so its page digests keep coming ``PAGE_WINDOW``
        ahead of the pages decided (None: nothing, or it sends them all unasked). The first
        window comes unasked (our Hello's ``page_window``). Call it after deciding pages."""
        if not self._windowed:
            return None
        upto = min(self._decided_to + self.PAGE_WINDOW, self.dst.count(1))
        if upto <= self._granted or (upto - self._granted < self.PAGE_WINDOW // 2
                                     and upto < self.dst.count(1)):
            return None
        self._granted = upto
        return p.WantPages(upto)

    # .. deciding ..

    def _page_leaves(self, j: int) -> bytearray:
        got = self._leaves.get(j)
        if got is None:
            a, b = self.src.chunk_range(1, j)
            got = self._leaves[j] = bytearray(HASH_SIZE * (b - a))
        return got

    @property
    def pages_held(self) -> int:
        """Pages whose leaf digests are held (scanned or being scanned, not settled)."""
        return len(self._leaves)

    def set_leaves(self, first: int, digests: bytes | bytearray) -> None:
        """The digests of chunks ``first ..`` (32 bytes each), of pages not settled."""
        f = self.src.fanout
        c, at = first, 0
        while at < len(digests):
            j = c // f
            page = self._page_leaves(j)
            k = c - j * f
            n = min(len(page) // HASH_SIZE - k, (len(digests) - at) // HASH_SIZE)
            page[k * HASH_SIZE : (k + n) * HASH_SIZE] = digests[at : at + n * HASH_SIZE]
            c, at = c + n, at + n * HASH_SIZE

    def leaf(self, c: int) -> bytes:
        j, k = divmod(c, self.src.fanout)
        return bytes(self._leaves[j][k * HASH_SIZE : (k + 1) * HASH_SIZE])

    def set_leaf(self, c: int, digest: bytes) -> None:
        """Chunk c's digest changed since the scan (what is sent is what counts)."""
        j, k = divmod(c, self.src.fanout)
        self._leaves[j][k * HASH_SIZE : (k + 1) * HASH_SIZE] = digest

    def _settle(self, j: int, digest: bytes | None = None) -> None:
        leaves = self._leaves.pop(j, None)
        if digest is None:
            digest = node_hash_packed(leaves if leaves is not None else self._page_leaves(j))
            self._leaves.pop(j, None)
        self._mine.add(j, digest)  # (asserts it was not settled before)

    def page_sent(self, j: int) -> None:
        """Page j's differing chunks are sent (their digests final): only its digest stays."""
        self._settle(j)

    def comparable(self, c: int) -> bool:
        return c < self.dst.chunks and self.dst.chunk_length(c) == self.src.chunk_length(c)

    def needs_target_page(self, j: int) -> bool:
        """Whether page j can be compared, so the target's digest of it is worth waiting for."""
        a, b = self.src.chunk_range(1, j)
        return j < self.dst.count(1) and self.dst.chunk_range(1, j) == (a, b) \
            and self.comparable(b - 1)

    def page_equal(self, j: int, mine: bytes | None = None) -> bool:
        """Whether page j (whose leaves are set; ``mine`` its digest when known) equals the
        target's, which must have arrived if the page is comparable."""
        if not self.needs_target_page(j):
            return False
        if mine is None:
            mine = node_hash_packed(self._page_leaves(j))
        assert j < self.pages_known, "page decided before the target's digest of it"
        equal = mine == self._their_page(j)
        self._decide(j)
        if equal:
            self._settle(j, mine)
        return equal

    def adopt_page(self, j: int) -> None:
        """Page j is known not to have changed since the target's generation (a map of
        changed ranges says so): its digest is the target's, and its leaves are never known."""
        assert self.needs_target_page(j) and j < self.pages_known
        self._settle(j, self._their_page(j))
        self._decide(j)

    def page_differs(self, j: int, unread: tuple[int, ...] = ()) -> p.NeedLeaves | SendChunks:
        """Page j differs: ask for its leaf digests, or, where the target has none of it,
        send its chunks that are not zeros (new space starts out as zeros). ``unread``
        chunks (comparable ones a map of changed ranges says are unchanged) take the
        target's digests when they arrive."""
        self._decide(j)
        a, b = self.src.chunk_range(1, j)
        if unread:
            assert all(a <= c < b and self.comparable(c) for c in unread)
            self._unread[j] = unread
        elif a >= self.dst.chunks:
            return SendChunks(j, tuple(c for c in range(a, b)
                                       if self.leaf(c) != zero_hash(self.src.chunk_length(c))))
        self._asked.add(j)
        return p.NeedLeaves(j)

    def _on_leaves(self, msg: p.Leaves) -> SendChunks:
        j = msg.page
        if j not in self._asked:
            raise PeerError(f"target sent leaf digests of page {j}, which was not asked for")
        self._asked.discard(j)
        a, b = self.src.chunk_range(1, j)
        ta, tb = self.dst.chunk_range(1, j) if j < self.dst.count(1) else (a, a)
        if len(msg.hashes) != (tb - ta) * HASH_SIZE:
            raise PeerError(f"target sent {len(msg.hashes) // HASH_SIZE} leaf digests for page "
                            f"{j}, expected {tb - ta}")
        for c in self._unread.pop(j, ()):
            self.set_leaf(c, msg.hashes[(c - ta) * HASH_SIZE : (c - ta + 1) * HASH_SIZE])
        send = []
        for c in range(a, b):
            if self.comparable(c):
                theirs = msg.hashes[(c - ta) * HASH_SIZE : (c - ta + 1) * HASH_SIZE]
                if theirs == self.leaf(c):
                    continue
            elif c >= self.dst.chunks and self.leaf(c) == zero_hash(self.src.chunk_length(c)):
                continue  # new chunks start out as zeros on the target
            send.append(c)
        return SendChunks(j, tuple(send))

    # .. ending ..

    def root(self) -> bytes:
        """The root of the source's disk from its page digests (the target's for each adopted
        page, whose leaves are never known); pages not settled yet are settled now."""
        for j in sorted(self._leaves):
            self._settle(j)
        if self.src.chunks and not self._mine.known(0, self.src.top_level):
            for j in range(self.src.count(1)):  # (pages never scanned: not in a push)
                if not self._mine.known(j):
                    self._settle(j)
        return self._mine.root()

    def done(self, info: dict[str, Any]) -> p.Done:
        """Everything is decided and sent: the root of what the target should now hold."""
        assert self.target is not None and not self._asked
        self._done = p.Done(self.root(), info)
        return self._done

    def _on_committed(self, msg: p.Committed) -> Finished:
        if self._done is None:
            raise PeerError("the target committed before the source finished")
        if not self.dry_run and msg.root != self._done.root:
            raise PeerError("the target committed a different root hash than ours")
        self.result = msg
        return Finished(msg)


# -- the target ---------------------------------------------------------------------------


class TargetConversation(_Conversation):
    """The target's side: checks what the source sends against the disk both agreed on."""

    def __init__(self, *, max_size: int = p.DEFAULT_MAX_SIZE) -> None:
        super().__init__()
        self.max_size = max_size
        self.source: p.Hello | None = None
        self.greeted = False  # the peer said hello as a source (so it may hear our Error)
        self.shape: Shape | None = None  # the disk as it will be (source's size)
        self._pages = 0  # pages the target compares against
        self._state = "hello"  # -> "opening" -> "transfer" -> "finishing" -> "committed"
        self.encrypted = False
        self._estimated = self._chunks = False  # an Estimate comes once, before any Chunk
        self.windowed = False  # the source asks for page digests (WantPages) as it goes
        self.first_pages = 0  # page digests a windowed source takes unasked

    def receive(self, msg: p.Message | None) -> TargetEvent | None:
        if isinstance(msg, p.Alive):
            return None
        if isinstance(msg, p.Error):
            raise peer_error(msg, "source")  # keeps its category
        state = self._state
        if msg is None:
            if state == "hello":
                raise ConnectionClosed("the source closed the connection before saying hello")
            if state != "committed":
                raise ConnectionClosed("the source closed the connection before finishing")
            return None
        if state == "hello":
            if not isinstance(msg, p.Hello) or msg.role != "source":
                raise PeerError(f"expected the source's hello, got {type(msg).__name__}")
            self.greeted = True
            return self._on_hello(msg)
        if state == "opening":
            raise PeerError(f"unexpected {type(msg).__name__} from the source before the "
                            f"target answered its hello")
        if state != "transfer":
            raise PeerError(f"unexpected {type(msg).__name__} from the source after its Done")
        if isinstance(msg, p.Estimate):
            if self._estimated or self._chunks:
                raise PeerError("the source sent an estimate after its data, or twice")
            self._estimated = True
            return EstimateArrived(msg.info)
        if isinstance(msg, p.Chunk):
            self._chunks = True
            assert self.shape is not None
            if msg.index >= self.shape.chunks:
                raise PeerError(f"the source sent chunk {msg.index}, outside the disk")
            if self.source is not None and self.source.info.get("dry_run") is True:
                raise PeerError("the source sent data in a dry run")
            return ChunkArrived(msg)
        if isinstance(msg, p.WantPages):
            if not self.windowed:
                raise PeerError("the source asked for page digests, which it gets unasked")
            return PagesWanted(min(msg.upto, self._pages))
        if isinstance(msg, p.NeedLeaves):
            if msg.page >= self._pages:
                raise PeerError(f"the source asked for the leaf digests of page {msg.page}; "
                                f"the target has {self._pages} pages")
            return LeavesWanted(msg.page)
        if isinstance(msg, p.Done):
            self._state = "finishing"
            return DoneArrived(msg.root, msg.info)
        raise PeerError(f"unexpected {type(msg).__name__} from the source")

    def _on_hello(self, hello: p.Hello) -> SourceHello:
        p.check_peer(hello, ())
        if hello.size > self.max_size:
            raise PeerError(f"the source has {hello.size} bytes, more than the "
                            f"{self.max_size} this end accepts (--max-size)")
        self.source = hello
        first = hello.info.get("page_window")  # absent: all page digests at once
        self.windowed = "page-window" in hello.info.get("caps", ()) and first is not None
        if self.windowed:
            if type(first) is not int or not 1 <= first <= 1 << 32:
                raise PeerError(f"the source's page window {first!r} is not a number of "
                                f"pages from 1 to {1 << 32}")
            self.first_pages = first
        self._state = "opening"
        return SourceHello(hello)

    def accept(self, base_size: int, chunk_size: int, fanout: int, software: str,
               info: dict[str, Any]) -> p.Hello:
        """The store is open: our Hello (its page digests follow, ``PageHashes`` in order)."""
        assert self._state == "opening" and self.source is not None
        self.shape = Shape(self.source.size, chunk_size, fanout)
        self._pages = Shape(base_size, chunk_size, fanout).count(1)
        # an encrypted image's chunks can be checked only for shape here (no key)
        self.encrypted = info.get("encryption") is not None
        self._state = "transfer"
        return p.Hello("target", base_size, chunk_size, fanout, software, info)

    def leaves(self, page: int, hashes: bytes) -> p.Leaves:
        return p.Leaves(page, hashes)

    def check_chunk(self, msg: p.Chunk) -> p.Chunk:
        """The chunk decodes to its length and digest (pure; safe on any thread)."""
        assert self.shape is not None
        length = self.shape.chunk_length(msg.index)
        if msg.kind == Kind.ZERO:
            ok = msg.digest == zero_hash(length) and not msg.payload
        elif self.encrypted:
            try:
                OpaqueCodec.check_shape(msg.kind, len(msg.payload), length)
            except ValueError as e:
                raise PeerError(f"chunk {msg.index} from the source: {e}") from None
            ok = True
        else:
            try:
                ok = leaf_hash(codec.decode(msg.kind, msg.payload, length)) == msg.digest
            except ValueError as e:
                raise PeerError(f"chunk {msg.index} from the source does not decode: {e}") \
                    from None
        if not ok:
            raise PeerError(f"chunk {msg.index} from the source does not match its digest")
        return msg

    def committed(self, result: p.Committed) -> p.Committed:
        assert self._state == "finishing"
        self._state = "committed"
        return result
