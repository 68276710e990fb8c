"""The native protocol's two conversations wired to each other in memory, through the real codec.

No threads and no files: each end's driver is a few lines over an in-memory disk, the byte
streams between them are cut at random places, and the scheduler interleaves deliveries and
source steps at random, so every ordering the protocol allows is reachable (page digests
arriving after the scan, Leaves after later pages were decided, ...).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskrsync.base.errors import (
    BusyError,
    DataError,
    DiskrsyncError,
    LocalError,
    PeerError,
    UsageError,
)
from diskrsync.base.merkle import (
    HASH_SIZE,
    Shape,
    leaf_hash,
    node_hash_packed,
    root_from_leaves,
    zero_hash,
)
from diskrsync.compression import codec
from diskrsync.compression.codec import Kind
from diskrsync.synccore import protocol as p
from diskrsync.synccore.conversation import (
    ChunkArrived,
    DoneArrived,
    Finished,
    LeavesWanted,
    PagesKnown,
    PagesWanted,
    SendChunks,
    SourceConversation,
    SourceHello,
    TargetConversation,
    TargetReady,
    error_message,
)

pytestmark = pytest.mark.pure

CS = 16 * 1024  # the smallest chunk size a target may use
FANOUT = 4  # small pages, so a few chunks make several pages


def _leaves(data: bytes | bytearray, shape: Shape) -> bytearray:
    out = bytearray()
    for c in range(shape.chunks):
        piece = bytes(data[c * CS : c * CS + shape.chunk_length(c)])
        out += zero_hash(len(piece)) if not any(piece) else leaf_hash(piece)
    return out


class _End:
    """What both in-memory drivers share: an outgoing byte stream, cut at random."""

    def __init__(self) -> None:
        self.out = bytearray(p.preamble())
        self.closed = False  # nothing more will be appended to ``out``
        self.heard_end = False  # the peer's end of stream was fed
        self.corrupt = 0.0  # chance that a piece taken has one bit flipped

    def send(self, msg: p.Message) -> None:
        self.out += p.encode(msg)

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def hear_end(self) -> None:
        self.heard_end = True
        self.feed(b"")

    def take(self, rng: random.Random) -> bytes:
        n = rng.randint(1, max(1, min(len(self.out), 3000)))
        piece = bytearray(self.out[:n])
        del self.out[:n]
        if rng.random() < self.corrupt:
            piece[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(piece)


class MemTarget(_End):
    """A target store in memory with an image's semantics: compares against ``disk`` (its
    last generation, or a checkpoint when ``resumed``), commits only on the source's root."""

    def __init__(self, disk: bytes, *, dry_run: bool = False, resumed: bool = False,
                 max_size: int = p.DEFAULT_MAX_SIZE, fail_finish: Exception | None = None,
                 page_batch: int = 2, caps: tuple[str, ...] = p.CAPABILITIES) -> None:
        super().__init__()
        self.caps = caps
        self.conv = TargetConversation(max_size=max_size)
        self.disk = bytearray(disk)
        self.dry_run, self.resumed = dry_run, resumed
        self.fail_finish = fail_finish
        self.page_batch = page_batch
        self.chunks_stored: list[int] = []
        self.result: p.Committed | None = None

    def feed(self, data: bytes) -> None:
        self.conv.receive_data(data)
        while (event := self.conv.next_event()) is not None:
            self.handle(event)

    def send_pages(self, upto: int) -> None:
        """Page digests up to ``upto``, ``page_batch`` at a time."""
        while self.pages_sent < upto:
            i = self.pages_sent
            n = min(self.page_batch, upto - i)
            self.send(p.PageHashes(i, b"".join(self.pages[i : i + n])))
            self.pages_sent += n

    def handle(self, event: Any) -> None:
        if isinstance(event, SourceHello):
            base = Shape(len(self.disk), CS, FANOUT)
            self.base_leaves = _leaves(self.disk, base)
            if not self.dry_run:
                del self.disk[event.hello.size :]
                self.disk += bytes(event.hello.size - len(self.disk))
            self.send(self.conv.accept(base.size, CS, FANOUT, "test target",
                                       {"hash": p.HASH, "caps": list(self.caps),
                                        "resumed": self.resumed}))
            self.pages = [node_hash_packed(self.base_leaves[a * HASH_SIZE : b * HASH_SIZE])
                          for a, b in (base.chunk_range(1, j) for j in range(base.count(1)))]
            self.pages_sent = 0
            if not self.conv.windowed or "page-window" not in self.caps:
                self.send_pages(len(self.pages))
            else:
                self.send_pages(min(self.conv.first_pages, len(self.pages)))
        elif isinstance(event, PagesWanted):
            assert "page-window" in self.caps
            self.send_pages(event.upto)
        elif isinstance(event, LeavesWanted):
            a, b = Shape(len(self.base_leaves) // HASH_SIZE * CS, CS, FANOUT).chunk_range(
                1, event.page)
            self.send(self.conv.leaves(event.page,
                                       bytes(self.base_leaves[a * HASH_SIZE : b * HASH_SIZE])))
        elif isinstance(event, ChunkArrived):
            chunk = self.conv.check_chunk(event.chunk)
            assert self.conv.shape is not None
            length = self.conv.shape.chunk_length(chunk.index)
            data = codec.decode(chunk.kind, chunk.payload, length) if chunk.kind != Kind.ZERO \
                else bytes(length)
            self.disk[chunk.index * CS : chunk.index * CS + length] = data
            self.chunks_stored.append(chunk.index)
        elif isinstance(event, DoneArrived):
            if self.fail_finish is not None:
                raise self.fail_finish
            shape = Shape(len(self.disk), CS, FANOUT)
            mine = root_from_leaves(shape, _leaves(self.disk, shape))
            if not self.dry_run and mine != event.root:
                raise DataError("the image does not match the source after the push")
            self.result = self.conv.committed(p.Committed(0 if self.dry_run else 7, mine, {}))
            self.send(self.result)
            self.closed = True


class MemSource(_End):
    """A source driver in memory: scans everything at once, then decides pages one by one
    (each only once the target's digest of it has arrived), as the threaded one does."""

    def __init__(self, data: bytes, *, dry_run: bool = False) -> None:
        super().__init__()
        self.data = data
        self.conv = SourceConversation(len(data), 0, FANOUT, "test source", {"name": "disk"},
                                       dry_run=dry_run)
        self.dry_run = dry_run
        self.send(self.conv.hello())
        self.ready: TargetReady | None = None
        self.next_page = 0
        self.sent: list[int] = []
        self.finished: p.Committed | None = None

    def feed(self, data: bytes) -> None:
        self.conv.receive_data(data)
        while (event := self.conv.next_event()) is not None:
            if isinstance(event, TargetReady):
                self.ready = event
                self.conv.set_leaves(0, _leaves(self.data, event.src))
            elif isinstance(event, SendChunks):
                self.send_chunks(event.chunks)
            elif isinstance(event, Finished):
                self.finished = event.committed
            else:
                assert isinstance(event, PagesKnown)

    def want_pages(self) -> None:
        want = self.conv.want_pages()
        if want is not None:
            self.send(want)

    def send_chunks(self, chunks: tuple[int, ...]) -> None:
        assert self.ready is not None
        for c in chunks:
            self.sent.append(c)
            if self.dry_run:
                continue
            piece = self.data[c * CS : c * CS + self.ready.src.chunk_length(c)]
            if not any(piece):
                self.send(p.Chunk(c, int(Kind.ZERO), zero_hash(len(piece)), b""))
            else:
                kind, payload = codec.encode(piece)
                self.send(p.Chunk(c, int(kind), leaf_hash(piece), payload))

    def can_step(self) -> bool:
        """Whether ``step`` would do something (else it waits for the target)."""
        if self.ready is None or self.closed:
            return False
        conv, j = self.conv, self.next_page
        if j < self.ready.src.count(1):
            return not (conv.needs_target_page(j) and conv.pages_known <= j)
        return not conv.waiting

    def step(self) -> bool:
        """Decide the next page, or end; False when waiting for the target."""
        if not self.can_step():
            return False
        assert self.ready is not None
        conv = self.conv
        if self.next_page < self.ready.src.count(1):
            j = self.next_page
            self.next_page += 1
            if not conv.page_equal(j):
                action = conv.page_differs(j)
                if isinstance(action, SendChunks):
                    self.send_chunks(action.chunks)
                else:
                    self.send(action)
            self.want_pages()
            return True
        self.send(conv.done({"dry_run": self.dry_run}))
        self.closed = True
        return True


def converse(src: MemSource, dst: MemTarget, rng: random.Random) -> None:
    """Run both ends to the end, cutting and interleaving at random; raise what an end
    raised (the other end would then hear it as an Error)."""
    for _ in range(100_000):
        moves: list[Callable[[], Any]] = []
        if src.out:
            moves.append(lambda: dst.feed(src.take(rng)))
        elif src.closed and not dst.heard_end:
            moves.append(dst.hear_end)
        if dst.out:
            moves.append(lambda: src.feed(dst.take(rng)))
        elif dst.closed and not src.heard_end:
            moves.append(src.hear_end)
        if src.can_step():
            moves.append(src.step)
        if not moves:
            return
        rng.choice(moves)()
    raise AssertionError("the conversation did not end")


def _disk(rng: random.Random, chunks: int, tail: int) -> bytes:
    """Chunks of random, zero or repeated content, plus a short last chunk."""
    out = bytearray()
    for _ in range(chunks):
        r = rng.random()
        out += bytes(CS) if r < 0.3 else bytes([rng.randrange(256)]) * CS if r < 0.6 \
            else rng.randbytes(CS)
    return bytes(out + rng.randbytes(tail))


def _mutate(rng: random.Random, data: bytes, changes: int) -> bytes:
    out = bytearray(data)
    for _ in range(changes if out else 0):
        at = rng.randrange(len(out))
        out[at] ^= 1 + rng.randrange(255)
    return bytes(out)


def _expected_sent(old: bytes, new: bytes) -> list[int]:
    """Chunks a push must send: those differing from what the target holds (new space
    counts as zeros)."""
    shape = Shape(len(new), CS, FANOUT)
    old_shape = Shape(len(old), CS, FANOUT)
    out = []
    for c in range(shape.chunks):
        length = shape.chunk_length(c)
        mine = new[c * CS : c * CS + length]
        if c < old_shape.chunks and old_shape.chunk_length(c) == length:
            if old[c * CS : c * CS + length] == mine:
                continue
        elif c >= old_shape.chunks and not any(mine):
            continue
        out.append(c)
    return out


SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 2**32),
       old=st.integers(0, 14), grow=st.integers(-6, 6), tail=st.sampled_from([0, 1, 5000]),
       changes=st.integers(0, 6), batch=st.integers(1, 5))
def test_a_push_makes_the_target_equal_and_sends_only_what_differs(
        seed: int, old: int, grow: int, tail: int, changes: int, batch: int) -> None:
    """Equal, different, grown and shrunk disks, any split and interleaving."""
    rng = random.Random(seed)
    before = _disk(rng, old, tail if old else 0)
    after = _mutate(rng, before, changes)
    new_chunks = max(old + grow, 0)
    if new_chunks > old:
        after += _disk(rng, new_chunks - old, 0)
    else:
        after = after[: new_chunks * CS + (tail if new_chunks == old else 0)]
    src, dst = MemSource(after), MemTarget(before, page_batch=batch)
    converse(src, dst, rng)
    assert dst.result is not None and src.finished == dst.result
    assert bytes(dst.disk) == after
    assert sorted(src.sent) == sorted(dst.chunks_stored) == _expected_sent(before, after)
    if before == after:
        assert src.sent == []


@SETTINGS
@given(seed=st.integers(0, 2**32), changes=st.integers(0, 5))
def test_a_dry_run_sends_no_chunk_and_changes_nothing(seed: int, changes: int) -> None:
    rng = random.Random(seed)
    before = _disk(rng, 9, 100)
    after = _mutate(rng, before, changes) + _disk(rng, 2, 0)
    src, dst = MemSource(after, dry_run=True), MemTarget(before, dry_run=True)
    converse(src, dst, rng)
    assert dst.chunks_stored == [] and bytes(dst.disk) == before
    assert src.finished is not None
    shape = Shape(len(before), CS, FANOUT)
    assert src.finished.root == root_from_leaves(shape, _leaves(before, shape))
    assert sorted(src.sent) == _expected_sent(before, after)  # what would have been sent


@SETTINGS
@given(seed=st.integers(0, 2**32))
def test_a_resumed_checkpoint_sends_only_what_it_lacks(seed: int) -> None:
    """The target compares against its checkpoint (the old disk with part of the push in
    it): only the rest travels, and the source learns it resumed."""
    rng = random.Random(seed)
    before = _disk(rng, 12, 0)
    after = _mutate(rng, before, 8)
    todo = _expected_sent(before, after)
    done = todo[: len(todo) // 2]
    checkpoint = bytearray(before)
    for c in done:
        checkpoint[c * CS : (c + 1) * CS] = after[c * CS : (c + 1) * CS]
    src, dst = MemSource(after), MemTarget(bytes(checkpoint), resumed=True)
    converse(src, dst, rng)
    assert src.ready is not None and src.ready.hello.info["resumed"] is True
    assert sorted(src.sent) == [c for c in todo if c not in done]
    assert bytes(dst.disk) == after


@pytest.mark.parametrize("cls, category", [
    (UsageError, UsageError), (BusyError, BusyError), (DataError, DataError),
    (LocalError, PeerError), (PeerError, PeerError),
])
def test_an_error_while_committing_reaches_the_source_in_its_category(
        cls: type[DiskrsyncError], category: type[DiskrsyncError]) -> None:
    """The target's store fails at the end; what its driver tells the source (error_message)
    makes the source fail in the same category: the user's, busy, data, else the peer's."""
    rng = random.Random(1)
    src, dst = MemSource(_disk(rng, 6, 0)), MemTarget(_disk(rng, 6, 0),
                                                     fail_finish=cls("disk full"))
    with pytest.raises(cls) as e:
        converse(src, dst, rng)
    src.out.clear()
    with pytest.raises(category, match=r"^target: disk full$"):
        src.feed(bytes(dst.out) + p.encode(error_message(e.value)))


@pytest.mark.parametrize("kind, category", [
    ("UsageError", UsageError), ("BusyError", BusyError), ("DataError", DataError),
    ("CorruptChunkError", DataError), ("ReadError", PeerError), ("LocalError", PeerError),
    ("KeyboardInterrupt", PeerError),
])
def test_errors_from_either_side_keep_their_category(kind: str,
                                                     category: type[DiskrsyncError]) -> None:
    """An Error frame becomes the error of its category, named as the peer's, at any
    point of the conversation."""
    rng = random.Random(2)
    src, dst = MemSource(_disk(rng, 5, 0)), MemTarget(_disk(rng, 5, 0))
    dst.feed(bytes(src.out))  # the source's hello
    src.out.clear()
    src.feed(bytes(dst.out))  # the target's hello and page digests
    dst.out.clear()
    with pytest.raises(category) as e:
        src.feed(p.encode(p.Error(kind, "it broke")))
    assert str(e.value) == "target: it broke" and e.value.relayed
    with pytest.raises(category) as e:
        dst.feed(p.encode(p.Error(kind, "it broke")))
    assert str(e.value) == "source: it broke" and e.value.relayed


# -- hostile peers: each violation is one PeerError -------------------------------------------


def _started(before: bytes, after: bytes, **kw: Any) -> tuple[MemSource, MemTarget]:
    """Both ends past the hellos and page digests."""
    src, dst = MemSource(after), MemTarget(before, **kw)
    while src.out or dst.out:  # (hellos, then WantPages and the page digests it asks for)
        out = bytes(src.out)
        src.out.clear()
        dst.feed(out)
        out = bytes(dst.out)
        dst.out.clear()
        src.feed(out)
    return src, dst


def _frames(*msgs: p.Message) -> bytes:
    return b"".join(p.encode(m) for m in msgs)


H = bytes(32)


def _source_hello(**kw: Any) -> p.Hello:
    info = {"hash": p.HASH, "caps": list(p.CAPABILITIES), **kw.pop("info", {})}
    return p.Hello("source", kw.pop("size", 4 * CS), 0, FANOUT, "x", info)


@pytest.mark.parametrize("msgs, match", [
    ([p.Leaves(0, H * FANOUT)], "not asked for"),
    ([p.Committed(1, H, {})], "committed before the source finished"),
    ([p.PageHashes(0, H)], "out of order"),
    ([p.PageHashes(2, H)], "more page digests"),
    ([p.NeedLeaves(0)], "unexpected NeedLeaves"),
    ([p.Chunk(0, 0, H, b"")], "unexpected Chunk"),
    ([p.Hello("target", 0, CS, FANOUT, "x", {"hash": p.HASH, "caps": ["zstd"]})],
     "unexpected Hello"),
])
def test_a_hostile_target_is_one_peer_error(msgs: list[p.Message], match: str) -> None:
    rng = random.Random(3)
    before = _disk(rng, 8, 0)
    src, _dst = _started(before, before)
    with pytest.raises(PeerError, match=match):
        src.feed(_frames(*msgs))


def test_a_target_committing_another_root_or_twice_is_refused() -> None:
    rng = random.Random(4)
    data = _disk(rng, 8, 0)
    src, _dst = _started(data, data)
    while src.step():
        pass
    with pytest.raises(PeerError, match="different root"):
        src.feed(p.encode(p.Committed(1, H, {})))
    src, dst = _started(data, data)
    converse(src, dst, rng)
    with pytest.raises(PeerError, match="after it committed"):
        src.conv.receive(p.Committed(1, H, {}))


def test_wrong_leaf_counts_and_a_cut_stream_are_refused() -> None:
    rng = random.Random(5)
    before = _disk(rng, 8, 0)
    src, _dst = _started(before, _mutate(rng, before, 1))
    while src.step():
        pass
    assert src.conv.waiting == 1
    sent = p.Decoder()
    sent.feed(p.preamble() + bytes(src.out))
    while not isinstance(asked := sent.next(), p.NeedLeaves):
        pass
    j = asked.page
    with pytest.raises(PeerError, match="leaf digests for page"):
        src.feed(p.encode(p.Leaves(j, H)))
    src, _dst = _started(before, before)
    with pytest.raises(PeerError, match="before committing"):
        src.feed(b"")
    src, _dst = _started(before, before)
    with pytest.raises(PeerError, match="cut in the middle"):
        src.feed(p.encode(p.Committed(1, H, {}))[:-1])
        src.feed(b"")


@pytest.mark.parametrize("target_hello, match", [
    (p.Hello("source", 0, CS, FANOUT, "x", {}), "expected the target's hello"),
    (p.Hello("target", 0, CS, FANOUT, "x", {"hash": "md5", "caps": list(p.CAPABILITIES)}),
     "uses hash 'md5'"),
    (p.Hello("target", 0, CS, FANOUT, "x", {"hash": p.HASH, "caps": []}), "cannot do zstd"),
    (p.Leaves(0, b""), "expected the target's hello"),
    (None, "before saying hello"),
])
def test_a_bad_target_hello_is_one_peer_error(target_hello: p.Message | None,
                                              match: str) -> None:
    conv = SourceConversation(CS, 0, FANOUT, "x", {}, dry_run=False)
    with pytest.raises(PeerError, match=match):
        conv.receive(target_hello)


@pytest.mark.parametrize("msgs, match", [
    ([p.Chunk(8, 0, zero_hash(CS), b"")], "chunk 8, outside the disk"),
    ([p.NeedLeaves(2)], "leaf digests of page 2"),
    ([p.Chunk(0, int(Kind.RAW), H, b"x" * CS)], "does not match its digest"),
    ([p.Chunk(0, int(Kind.ZSTD), H, b"not zstd")], "does not decode"),
    ([p.Chunk(0, int(Kind.ZERO), H, b"")], "does not match its digest"),
    ([p.PageHashes(0, H)], "unexpected PageHashes"),
    ([p.Committed(1, H, {})], "unexpected Committed"),
    ([_source_hello()], "unexpected Hello"),
])
def test_a_hostile_source_is_one_peer_error(msgs: list[p.Message], match: str) -> None:
    rng = random.Random(6)
    before = _disk(rng, 8, 0)
    _src, dst = _started(before, before)
    with pytest.raises(PeerError, match=match):
        dst.feed(_frames(*msgs))


def test_a_hostile_source_after_done_and_at_eof() -> None:
    rng = random.Random(7)
    before = _disk(rng, 8, 0)
    _src, dst = _started(before, before)
    dst.conv.receive(p.Done(H, {}))  # the driver has not committed yet
    with pytest.raises(PeerError, match="after its Done"):
        dst.conv.receive(p.Chunk(0, 0, zero_hash(CS), b""))
    _src, dst = _started(before, before)
    with pytest.raises(PeerError, match="before finishing"):
        dst.feed(b"")


@pytest.mark.parametrize("hello, match", [
    (_source_hello(size=1 << 40), "more than the"),
    (_source_hello(info={"hash": "sha1"}), "uses hash 'sha1'"),
    (p.Hello("target", 0, CS, FANOUT, "x", {}), "expected the source's hello"),
    (p.Done(H, {}), "expected the source's hello"),
    (None, "before saying hello"),
])
def test_a_bad_source_hello_is_one_peer_error(hello: p.Message | None, match: str) -> None:
    conv = TargetConversation(max_size=1 << 30)
    with pytest.raises(PeerError, match=match):
        conv.receive(hello)
    assert conv.shape is None  # nothing was accepted, so the driver opened nothing


def test_a_chunk_in_a_dry_run_is_refused() -> None:
    conv = TargetConversation()
    assert isinstance(conv.receive(_source_hello(info={"dry_run": True})), SourceHello)
    conv.accept(4 * CS, CS, FANOUT, "x", {})
    with pytest.raises(PeerError, match="dry run"):
        conv.receive(p.Chunk(0, 0, zero_hash(CS), b""))


def test_messages_before_the_target_answers_are_refused() -> None:
    conv = TargetConversation()
    conv.receive_data(p.preamble() + _frames(_source_hello(), p.NeedLeaves(0)))
    assert isinstance(conv.next_event(), SourceHello)
    with pytest.raises(PeerError, match="before the target answered"):
        conv.next_event()


@SETTINGS
@given(seed=st.integers(0, 2**32), ends=st.sampled_from(["source", "target", "both"]))
def test_corrupted_streams_end_in_an_error_or_a_correct_disk(seed: int, ends: str) -> None:
    """Bits flipped anywhere in either stream: the push either ends with the target equal to
    the source or raises a DiskrsyncError, or both ends wait (a peer that lies about sizes can
    stall a push until --timeout); never another exception, never a wrong commit."""
    rng = random.Random(seed)
    before = _disk(rng, 10, 700)
    after = _mutate(rng, before, 4) + _disk(rng, 2, 0)
    src, dst = MemSource(after), MemTarget(before, max_size=1 << 20)
    src.corrupt = 0.05 if ends != "target" else 0.0
    dst.corrupt = 0.05 if ends != "source" else 0.0
    try:
        converse(src, dst, rng)
    except DiskrsyncError:
        return
    if dst.result is not None:
        assert bytes(dst.disk) == after


class MapSource(MemSource):
    """A source with a map of changed ranges: the digests of ``unchanged`` chunks are never
    computed; whole pages of them take the target's page digest (``adopt_page``), the others
    come from the target's Leaves."""

    def __init__(self, data: bytes, unchanged: set[int]) -> None:
        super().__init__(data)
        self.unchanged = unchanged
        self.adopted: list[int] = []

    def feed(self, data: bytes) -> None:
        ready = self.ready
        super().feed(data)
        if ready is None and self.ready is not None:
            for c in self.unchanged:  # never computed: garbage until the Leaves say
                self.conv.set_leaf(c, b"\xee" * HASH_SIZE)

    def step(self) -> bool:
        if not self.can_step():
            return False
        assert self.ready is not None
        j = self.next_page
        if j >= self.ready.src.count(1):
            return super().step()
        a, b = self.ready.src.chunk_range(1, j)
        unread = tuple(c for c in range(a, b) if c in self.unchanged)
        if not unread:
            return super().step()
        self.next_page += 1
        if len(unread) == b - a and self.conv.needs_target_page(j):
            self.conv.adopt_page(j)
            self.adopted.append(j)
        else:
            self.send(self.conv.page_differs(j, unread))  # a NeedLeaves
        return True


@SETTINGS
@given(seed=st.integers(0, 2**32), old=st.integers(1, 14), grow=st.integers(-3, 3),
       changes=st.integers(0, 6), extra=st.floats(0, 1))
def test_a_map_of_changed_ranges_takes_the_rest_from_the_target(
        seed: int, old: int, grow: int, changes: int, extra: float) -> None:
    """Chunks a (truthful) map calls unchanged are never hashed by the source, yet the target
    ends equal to the source, commits the source's root and receives only what differs; the
    map may name unchanged chunks as changed (``extra``)."""
    rng = random.Random(seed)
    before = _disk(rng, old, 0)
    after = _mutate(rng, before, changes)
    new_chunks = max(old + grow, 0)
    after = after + _disk(rng, new_chunks - old, 0) if new_chunks > old \
        else after[: new_chunks * CS]
    differ = set(_expected_sent(before, after))
    shape, base = Shape(len(after), CS, FANOUT), Shape(len(before), CS, FANOUT)
    comparable = {c for c in range(shape.chunks)
                  if c < base.chunks and base.chunk_length(c) == shape.chunk_length(c)}
    unchanged = {c for c in comparable - differ
                 if before[c * CS : (c + 1) * CS] == after[c * CS : (c + 1) * CS]
                 and rng.random() >= extra}
    src, dst = MapSource(after, unchanged), MemTarget(before)
    converse(src, dst, rng)
    assert dst.result is not None and src.finished == dst.result
    assert bytes(dst.disk) == after
    assert sorted(src.sent) == sorted(dst.chunks_stored) == sorted(differ)
    if unchanged == set(range(shape.chunks)) and shape.chunks and len(after) == len(before):
        # (a shrunk disk's last page covers fewer chunks than the target's: asked for)
        assert src.adopted  # nothing asked: every page's digest was the target's


def test_source_holds_leaf_digests_only_of_pages_in_flight():
    """A page's leaf digests are dropped once it is settled (equal, or its chunks sent), so a
    source's memory follows the pages in flight, not the disk (issue 16: the array of every
    leaf was 32 bytes per chunk, 256 MiB for 1 TiB); the root still comes out right."""
    pages = 50
    shape = Shape(pages * FANOUT * CS, CS, FANOUT)
    rnd = random.Random(3)
    mine = [rnd.randbytes(HASH_SIZE) for _ in range(shape.chunks)]
    theirs = list(mine)
    for c in range(0, shape.chunks, 7):  # some pages differ
        theirs[c] = rnd.randbytes(HASH_SIZE)
    conv = SourceConversation(shape.size, CS, FANOUT, "test", {}, dry_run=False)
    conv.hello()
    conv.receive(p.Hello("target", shape.size, CS, FANOUT, "test",
                         {"hash": p.HASH, "caps": list(p.CAPABILITIES)}))
    assert conv.want_pages() is None  # (fewer pages than the first window)
    page_digests = b"".join(node_hash_packed(b"".join(theirs[j * FANOUT : (j + 1) * FANOUT]))
                            for j in range(pages))
    conv.receive(p.PageHashes(0, page_digests))
    most = 0
    for j in range(pages):
        a, b = shape.chunk_range(1, j)
        conv.set_leaves(a, b"".join(mine[a:b]))
        most = max(most, conv.pages_held)
        if not conv.page_equal(j):
            assert isinstance(conv.page_differs(j), p.NeedLeaves)
            event = conv.receive(p.Leaves(j, b"".join(theirs[a:b])))
            assert isinstance(event, SendChunks) and event.chunks
            conv.page_sent(j)
        assert conv.pages_held == 0
    assert most == 1
    done = conv.done({})
    assert done.root == root_from_leaves(shape, b"".join(mine))


def test_source_drops_the_targets_digests_of_decided_pages(monkeypatch):
    """The target's digest of a page is dropped once the page is decided, and a settled
    page's own digest is folded into its parent node when its siblings are in: the source
    holds neither per page of the disk (issue 16: 64 bytes per page, 8 MiB per TiB)."""
    monkeypatch.setattr(SourceConversation, "FORGET_PAGES", 3)
    pages = 200
    shape = Shape(pages * FANOUT * CS, CS, FANOUT)
    rnd = random.Random(4)
    leaves = [rnd.randbytes(HASH_SIZE) for _ in range(shape.chunks)]
    digests = [node_hash_packed(b"".join(leaves[j * FANOUT : (j + 1) * FANOUT]))
               for j in range(pages)]
    conv = SourceConversation(shape.size, CS, FANOUT, "test", {}, dry_run=False)
    conv.hello()
    conv.receive(p.Hello("target", shape.size, CS, FANOUT, "test",
                         {"hash": p.HASH, "caps": list(p.CAPABILITIES)}))
    assert conv.want_pages() is None  # (fewer pages than the first window)
    window = 10  # the target's digests arrive a few pages ahead of the decisions
    conv.receive(p.PageHashes(0, b"".join(digests[:window])))
    most_theirs = most_mine = 0
    for j in range(pages):
        if j + window < pages:
            conv.receive(p.PageHashes(j + window, digests[j + window]))
        a, b = shape.chunk_range(1, j)
        conv.set_leaves(a, b"".join(leaves[a:b]))
        assert conv.page_equal(j)
        most_theirs = max(most_theirs, conv.target_pages_held)
        most_mine = max(most_mine, conv._mine.held)
    assert most_theirs <= window + 3
    assert most_mine <= shape.top_level
    assert conv.done({}).root == root_from_leaves(shape, b"".join(leaves))


@SETTINGS
@given(seed=st.integers(0, 2**32), old=st.integers(0, 30), grow=st.integers(-8, 8),
       changes=st.integers(0, 6), batch=st.integers(1, 5))
def test_a_push_that_drops_decided_digests_at_once_is_the_same_push(
        seed: int, old: int, grow: int, changes: int, batch: int) -> None:
    """With the target's digests dropped after every decided page, any split and
    interleaving still makes the target equal, sending only what differs."""
    saved, SourceConversation.FORGET_PAGES = SourceConversation.FORGET_PAGES, 1
    try:
        rng = random.Random(seed)
        before = _disk(rng, old, 700 if old else 0)
        after = _mutate(rng, before, changes)
        new_chunks = max(old + grow, 0)
        after = after + _disk(rng, new_chunks - old, 0) if new_chunks > old \
            else after[: new_chunks * CS]
        src, dst = MemSource(after), MemTarget(before, page_batch=batch)
        converse(src, dst, rng)
        assert dst.result is not None and src.finished == dst.result
        assert bytes(dst.disk) == after
        assert sorted(src.sent) == _expected_sent(before, after)
    finally:
        SourceConversation.FORGET_PAGES = saved


@SETTINGS
@given(seed=st.integers(0, 2**32), old=st.integers(0, 40), changes=st.integers(0, 6),
       batch=st.integers(1, 5), window=st.integers(1, 6),
       target_caps=st.sampled_from(["all", "older"]))
def test_page_digests_come_a_window_at_a_time(
        seed: int, old: int, changes: int, batch: int, window: int, target_caps: str) -> None:
    """A target that lists "page-window" sends its page digests only as the source asks
    (WantPages, ``PAGE_WINDOW`` ahead of the pages decided), so the source never holds more
    than a window of them; an older target sends them all at once, as before. Either way
    the push is the same."""
    saved, SourceConversation.PAGE_WINDOW = SourceConversation.PAGE_WINDOW, window
    saved_forget, SourceConversation.FORGET_PAGES = SourceConversation.FORGET_PAGES, 1
    try:
        rng = random.Random(seed)
        before = _disk(rng, old, 0)
        after = _mutate(rng, before, changes)
        caps = p.CAPABILITIES if target_caps == "all" else tuple(
            c for c in p.CAPABILITIES if c != "page-window")
        src, dst = MemSource(after), MemTarget(before, page_batch=batch, caps=caps)
        most = 0
        real = src.conv.receive

        def receive(msg: Any) -> Any:
            nonlocal most
            event = real(msg)
            most = max(most, src.conv.target_pages_held)
            return event

        src.conv.receive = receive
        converse(src, dst, rng)
        assert dst.result is not None and src.finished == dst.result
        assert bytes(dst.disk) == after
        assert sorted(src.sent) == _expected_sent(before, after)
        if target_caps == "all":
            assert most <= window + 1
    finally:
        SourceConversation.PAGE_WINDOW = saved
        SourceConversation.FORGET_PAGES = saved_forget


def test_a_target_sending_page_digests_not_asked_for_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(SourceConversation, "PAGE_WINDOW", 2)
    rng = random.Random(5)
    before = _disk(rng, 8 * FANOUT, 0)
    src, _dst = _started(before, before)
    assert src.conv.pages_known == 2
    with pytest.raises(PeerError, match="not asked for"):
        src.feed(_frames(p.PageHashes(2, H)))


def test_a_source_asking_for_page_digests_it_gets_unasked_is_refused() -> None:
    dst = TargetConversation()
    info = {"hash": p.HASH, "caps": [c for c in p.CAPABILITIES if c != "page-window"]}
    assert isinstance(dst.receive(p.Hello("source", 4 * CS, 0, FANOUT, "x", info)),
                      SourceHello)
    dst.accept(4 * CS, CS, FANOUT, "t", {})
    with pytest.raises(PeerError, match="gets unasked"):
        dst.receive(p.WantPages(1))
    windowed = TargetConversation()
    windowed.receive(_source_hello(info={"page_window": SourceConversation.PAGE_WINDOW}))
    windowed.accept(4 * CS, CS, FANOUT, "t", {})
    assert windowed.first_pages == SourceConversation.PAGE_WINDOW
    assert windowed.receive(p.WantPages(10)) == PagesWanted(1)  # as many as it has
    for bad in (0, "5", 1 << 40, True):
        with pytest.raises(PeerError, match="page window"):
            TargetConversation().receive(_source_hello(info={"page_window": bad}))
