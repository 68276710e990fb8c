"""Conformance tests for the Go diskrsync protocol BSNC0002 (diskrsync.synccore.legacy).

The byte-exact tests replay transcripts recorded between two Go processes; the property tests
connect our own source and target; the rest pin the tree shape, the progress lines, the remote
command words and the handling of misbehaving peers.
"""

from __future__ import annotations

import hashlib
import random
import shlex
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.legacy_vectors import (
    CASES,
    Case,
    MemoryStore,
    have_vectors,
    loopback,
    random_pieces,
    remote_cmd,
    sha256,
    transcript,
    vector_input,
)

from diskrsync.base.errors import LocalError, PeerError, UsageError
from diskrsync.synccore.legacy import (
    HASH_SIZE,
    MAGIC,
    GoRemoteRequest,
    HeaderExchanged,
    LeafHashProvider,
    LegacySource,
    LegacyTarget,
    ProgressLineWriter,
    RangeSynced,
    SyncFinished,
    TreeShape,
    compute_leaf_hashes,
    format_progress_start,
    format_progress_update,
    go_tree_shape,
    leaf_hash,
    node_hash,
    parse_go_remote_args,
    tree_digests,
)

K = 1024
M = 1024 * K

needs_vectors = pytest.mark.skipif(not have_vectors(), reason="Go vectors not found")


def header(size: int) -> bytes:
    return MAGIC + struct.pack("<Q", size)


def before_state(case: Case) -> bytes:
    return b"" if case.target_before is None else vector_input(case.target_before)


def run_target(
    store: MemoryStore, stream: bytes, seed: int, leaf_hashes: LeafHashProvider | None = None
) -> bytes:
    """Feed ``stream`` to a fresh target in random pieces, then EOF; return all it wrote."""
    target = LegacyTarget(store, leaf_hashes=leaf_hashes)
    out = bytearray(target.data_to_send())
    for piece in random_pieces(stream, random.Random(seed)):
        target.receive_data(piece)
        out += target.data_to_send()
    target.receive_data(b"")
    out += target.data_to_send()
    assert target.done
    return bytes(out)


def run_source(data: bytes, stream: bytes, seed: int) -> bytes:
    """Run a source over ``data`` against a recorded target stream; return all it wrote."""
    source = LegacySource(MemoryStore(data), max_send=200 * K)
    out = bytearray(source.data_to_send())
    for piece in random_pieces(stream, random.Random(seed)):
        source.receive_data(piece)
        out += source.data_to_send()
    for _ in range(10_000):
        if source.done:
            break
        out += source.data_to_send()
    assert source.done
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Byte-exact conformance against the Go transcripts
# ---------------------------------------------------------------------------------------------


@needs_vectors
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.pure
def test_inputs_match_readme(case: Case) -> None:
    assert sha256(vector_input(case.source_input)) == case.source_sha256


@needs_vectors
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.inproc
def test_target_reproduces_go_target(case: Case, seed: int) -> None:
    src2dst, dst2src = transcript(case.name)
    store = MemoryStore(before_state(case))
    assert run_target(store, src2dst, seed) == dst2src
    assert sha256(store.buf) == case.source_sha256


@needs_vectors
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.inproc
def test_source_reproduces_go_source(case: Case, seed: int) -> None:
    src2dst, dst2src = transcript(case.name)
    assert run_source(vector_input(case.source_input), dst2src, seed) == src2dst


@needs_vectors
@pytest.mark.inproc
def test_target_whole_stream_at_once_and_round_trips() -> None:
    src2dst, dst2src = transcript("b3_changed")
    target = LegacyTarget(MemoryStore(vector_input("v1")))
    out = target.data_to_send()
    target.receive_data(src2dst)
    out += target.data_to_send()
    assert out == dst2src
    assert (len(out) - 16) // HASH_SIZE == 19  # the README's "19 nodes visited"
    assert target.done  # the walk's end is known without waiting for EOF


@needs_vectors
@pytest.mark.inproc
def test_target_events_b3_and_b6() -> None:
    src2dst, _ = transcript("b3_changed")
    target = LegacyTarget(MemoryStore(vector_input("v1")))
    target.receive_data(src2dst)
    events = target.next_events()
    assert events[0] == HeaderExchanged(2 * M, 2 * M, go_tree_shape(2 * M))
    assert events[-1] == SyncFinished(2 * M)
    data = [e for e in events if isinstance(e, RangeSynced) and e.kind == "data"]
    assert [(e.offset, e.length) for e in data] == [
        (3 * 128 * K, 128 * K),
        (8 * 128 * K, 128 * K),
        (15 * 128 * K, 128 * K),
    ]
    assert target.next_events() == []
    assert target.position == 2 * M

    src2dst, _ = transcript("b6_zeroed")
    store = MemoryStore(vector_input("v1"))
    target = LegacyTarget(store)
    target.receive_data(src2dst)
    holes = [e for e in target.next_events() if isinstance(e, RangeSynced) and e.kind == "hole"]
    assert [(e.offset, e.length) for e in holes] == [(2 * 128 * K, 128 * K), (3 * 128 * K, 128 * K)]
    assert ("zeros", 2 * 128 * K, 128 * K) in store.writes
    assert not [w for w in store.writes if w[0] == "write"]  # holes carry no data


@needs_vectors
@pytest.mark.inproc
def test_b4_tail_framing_and_b5_truncation() -> None:
    src2dst, _ = transcript("b4_grow")
    store = MemoryStore(vector_input("v1"))
    target = LegacyTarget(store)
    target.receive_data(src2dst)
    tail = [e for e in target.next_events() if isinstance(e, RangeSynced) and e.offset >= 2 * M]
    assert [(e.offset - 2 * M, e.length, e.kind) for e in tail] == [
        (0, 128 * K, "data"),
        (128 * K, 128 * K, "data"),
        (256 * K, 128 * K, "hole"),
        (384 * K, 128 * K, "data"),
        (512 * K, 623457 - 512 * K, "data"),
    ]
    src2dst, _ = transcript("b5_shrink")
    store = MemoryStore(vector_input("v1"))
    target = LegacyTarget(store)
    target.receive_data(src2dst)
    assert store.writes == [("truncate", len(vector_input("v1_shrink")), 0)]


@needs_vectors
@pytest.mark.inproc
def test_parallel_leaf_hash_provider_gives_same_bytes() -> None:
    src2dst, dst2src = transcript("b3_changed")
    store = MemoryStore(vector_input("v1"))
    shapes: list[TreeShape] = []

    def threaded(shape: TreeShape) -> list[bytes]:
        shapes.append(shape)
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda r: leaf_hash(store.read(*r)), shape.iter_leaf_ranges()))

    assert run_target(store, src2dst, 5, leaf_hashes=threaded) == dst2src
    assert shapes == [go_tree_shape(2 * M)]


@needs_vectors
@pytest.mark.inproc
def test_wrong_leaf_hashes_change_the_walk() -> None:
    src2dst, dst2src = transcript("b2_identical")
    target = LegacyTarget(
        MemoryStore(vector_input("v1")),
        leaf_hashes=lambda shape: [bytes(HASH_SIZE)] * shape.leaf_count,
    )
    assert target.data_to_send() == dst2src[:16]
    target.receive_data(src2dst[:16])
    assert target.data_to_send() != dst2src[16:]


# ---------------------------------------------------------------------------------------------
# Our source against our target
# ---------------------------------------------------------------------------------------------


def build(segments: list[tuple[str, int, int]]) -> bytes:
    out = bytearray()
    for kind, length, seed in segments:
        if kind == "rand":
            out += random.Random(seed).randbytes(length)
        elif kind == "zero":
            out += bytes(length)
        else:
            out += bytes([seed % 255 + 1]) * length
    return bytes(out)


segment = st.tuples(
    st.sampled_from(["rand", "zero", "fill"]),
    st.one_of(st.integers(0, 5000), st.integers(100 * K, 300 * K)),
    st.integers(0, 1000),
)
contents = st.lists(segment, max_size=4).map(build)


@st.composite
def before_after(draw: st.DrawFn) -> tuple[bytes, bytes]:
    after = draw(contents)
    how = draw(st.sampled_from(["independent", "patched", "grown", "shrunk", "empty"]))
    if how == "independent":
        return draw(contents), after
    if how == "empty":
        return b"", after
    before = bytearray(after)
    for _ in range(draw(st.integers(0, 4))):
        if not before:
            break
        off = draw(st.integers(0, len(before) - 1))
        n = draw(st.integers(1, 3 * K))
        fill = draw(st.sampled_from([b"\0", b"\xaa"]))
        before[off : off + n] = fill * len(before[off : off + n])
    if how == "grown":
        before += build([("rand", draw(st.integers(1, 200 * K)), 7)])
    elif how == "shrunk" and before:
        del before[draw(st.integers(0, len(before) - 1)) :]
    return bytes(before), after


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=before_after(), seed=st.integers(0, 2**32))
@pytest.mark.pure
def test_loopback_makes_target_equal_source(pair: tuple[bytes, bytes], seed: int) -> None:
    before, after = pair
    store = MemoryStore(before)
    source = LegacySource(MemoryStore(after), max_send=150 * K)
    target = LegacyTarget(store)
    s2d, _ = loopback(source, target, random.Random(seed))
    assert store.buf == after
    assert target.next_events()[-1] == SyncFinished(len(after))
    # data that was already there is not sent again: at most the header, the commands and the
    # blocks that differ (a changed leaf or tail chunk can be as large as 2 x 128 KiB here)
    if before == after:
        assert s2d == 16 + (1 if after else 0)


_R = random.Random(42).randbytes(3 * M)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"", b""),
        (b"", _R[:5]),
        (_R[: 700 * K], b""),
        (_R[: 2 * M], _R[: 2 * M - 1]),  # shrink by one byte
        (_R[: 2 * M], _R[: 2 * M] + bytes(300 * K) + b"x"),  # grow with a zero run
        (_R[: 2 * M], _R[: 2 * M] + bytes(128 * K)),  # grow, ends in zeros
        (_R[:M] + bytes(M), _R[:M] + b"\1" + bytes(M - 1)),  # one byte in a zero run
        (_R[:1060921], _R[: 400 * K] + bytes(128 * K) + _R[528 * K : 1060921]),  # zeroed leaf
        (bytes(1500 * K), _R[: 1500 * K]),
    ],
    ids=[
        "empty",
        "new",
        "to-empty",
        "shrink1",
        "grow-zeros",
        "grow-ending-zeros",
        "byte-in-zeros",
        "zeroed-leaf",
        "zeros-to-data",
    ],
)
@pytest.mark.pure
def test_loopback_scenarios(before: bytes, after: bytes) -> None:
    store = MemoryStore(before)
    source = LegacySource(MemoryStore(after))
    target = LegacyTarget(store)
    s2d, d2s = loopback(source, target, random.Random(len(before) ^ len(after)))
    assert store.buf == after
    assert d2s >= 16 and s2d >= 16


@needs_vectors
@pytest.mark.pure
def test_loopback_12mib_uses_the_wide_tree() -> None:
    v1, v2 = vector_input("big12_v1"), vector_input("big12_v2")
    store = MemoryStore(v1)
    source = LegacySource(MemoryStore(v2))
    target = LegacyTarget(store)
    s2d, d2s = loopback(source, target, random.Random(12))
    assert store.buf == v2
    events = target.next_events()
    assert events[0] == HeaderExchanged(12 * M, 12 * M, go_tree_shape(12 * M))
    data = [e for e in events if isinstance(e, RangeSynced) and e.kind == "data"]
    changed = [5 * M + 7, 9 * M + 300000, 12 * M - 10]
    assert len(data) == 3
    for e, off in zip(data, changed, strict=True):
        assert e.offset <= off < e.offset + e.length and e.length in (98304, 98305)
    digests = (d2s - 16) // HASH_SIZE
    assert d2s == 16 + digests * HASH_SIZE
    assert s2d == 16 + digests + sum(e.length for e in data)


# ---------------------------------------------------------------------------------------------
# Tree shape
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "levels", "order", "block", "leaf"),
    [
        (1, 1, 1, 128 * K, 1),  # below one block: a single leaf
        (128 * K - 1, 1, 1, 128 * K, 128 * K - 1),
        (128 * K, 1, 2, 128 * K, 128 * K),  # one block: log2(1)+1 = 1 level
        (256 * K, 2, 2, 128 * K, 128 * K),
        (2 * M, 5, 2, 128 * K, 128 * K),  # the README's b3: 5 levels, order 2
        (1060921, 4, 2, 128 * K, 132615),  # 8 blocks
        (8 * M - 1, 6, 2, 128 * K, 262143),  # just below the 8 MiB branch
        (8 * M, 8, 2, 128 * K, 64 * K),  # size/2**7 reaches block/2: levels = 8
        (12 * M, 8, 2, 128 * K, 96 * K),
        (2 * 1024 * M, 8, 4, 128 * K, 128 * K),  # 4**7 leaves of exactly 128 KiB
        (256 * 1024 * M, 8, 7, 256 * K, 274877906944 // 7**7),  # block doubled once
    ],
)
@pytest.mark.pure
def test_go_tree_shape(size: int, levels: int, order: int, block: int, leaf: int) -> None:
    shape = go_tree_shape(size)
    assert (shape.levels, shape.order, shape.target_block_size, shape.leaf_size) == (
        levels,
        order,
        block,
        leaf,
    )
    assert shape.size == size


@pytest.mark.pure
def test_go_tree_shape_rejects_empty() -> None:
    with pytest.raises(ValueError):
        go_tree_shape(0)


@given(size=st.one_of(st.integers(1, 20 * M), st.integers(1, 1 << 44)))
@pytest.mark.pure
def test_leaf_ranges_tile_the_tree(size: int) -> None:
    shape = go_tree_shape(size)
    if shape.leaf_count > 5000:
        ranges = [shape.leaf_range(i) for i in (0, 1, shape.leaf_count - 1)]
        assert ranges[0][0] == 0 and ranges[-1][0] + ranges[-1][1] == size
        return
    ranges = list(shape.iter_leaf_ranges())
    assert len(ranges) == shape.leaf_count
    pos = 0
    for i, (off, length) in enumerate(ranges):
        assert off == pos and length > 0
        assert shape.leaf_range(i) == (off, length)
        pos += length
    assert pos == size
    assert shape.node_range(0, 0) == (0, size)


@pytest.mark.pure
def test_tree_digests_by_hand() -> None:
    data = bytes(range(256)) * 1024 + b"x" * 5  # 256 KiB + 5: two leaves
    shape = go_tree_shape(len(data))
    assert (shape.levels, shape.order) == (2, 2)
    half = len(data) // 2
    leaves = [
        hashlib.blake2b(data[:half], digest_size=64).digest(),
        hashlib.blake2b(data[half:], digest_size=64).digest(),
    ]
    assert compute_leaf_hashes(shape, lambda o, n: data[o : o + n]) == leaves
    root = hashlib.blake2b(leaves[0] + leaves[1], digest_size=64).digest()
    assert tree_digests(shape, leaves) == [[root], leaves]
    assert node_hash(leaves) == root
    with pytest.raises(ValueError):
        tree_digests(shape, leaves[:1])


@pytest.mark.pure
def test_short_read_is_a_local_error() -> None:
    class Short(MemoryStore):
        def read(self, offset: int, length: int) -> bytes:
            return super().read(offset, length)[:-1]

    source = LegacySource(Short(b"a" * 1000))
    with pytest.raises(LocalError):
        source.receive_data(header(1000))
    with pytest.raises(LocalError):  # and it is not mistaken for a finished exchange later
        source.data_to_send()
    assert not source.done


# ---------------------------------------------------------------------------------------------
# Misbehaving peers
# ---------------------------------------------------------------------------------------------


def fresh_target(before: bytes = b"v" * (256 * K)) -> LegacyTarget:
    target = LegacyTarget(MemoryStore(before))
    target.data_to_send()
    return target


@pytest.mark.parametrize(
    "stream",
    [
        b"BSNC0001" + struct.pack("<Q", 5),
        b"SPGZ0001" + bytes(8),
        b"\0" * 16,
    ],
)
@pytest.mark.pure
def test_target_rejects_wrong_magic(stream: bytes) -> None:
    target = fresh_target()
    with pytest.raises(PeerError, match="expected b'BSNC0002', received"):
        target.receive_data(stream)
    with pytest.raises(PeerError):  # the machine stays failed
        target.data_to_send()


@pytest.mark.pure
def test_target_rejects_negative_size() -> None:
    with pytest.raises(PeerError, match="negative"):
        fresh_target().receive_data(MAGIC + b"\xff" * 8)


@pytest.mark.parametrize(
    ("stream", "what"),
    [
        (b"", "header"),
        (MAGIC[:5], "header"),
        (header(256 * K), "command"),
        (header(256 * K) + b"\x03\x03" + b"z" * 1000, "block"),
        (header(256 * K) + b"\x03\x02", "command"),
    ],
)
@pytest.mark.pure
def test_target_early_close(stream: bytes, what: str) -> None:
    target = fresh_target()
    if stream:
        target.receive_data(stream)
    with pytest.raises(PeerError, match=f"closed the connection early.*{what}"):
        target.receive_data(b"")


@needs_vectors
@pytest.mark.parametrize("cut", [17, 100, 200_000, 262_161])
@pytest.mark.inproc
def test_target_early_close_in_tail(cut: int) -> None:
    src2dst, _ = transcript("b1_new_target")
    target = fresh_target(b"")
    target.receive_data(src2dst[:cut])
    assert not target.done
    with pytest.raises(PeerError, match="early"):
        target.receive_data(b"")


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (header(256 * K) + b"\x07", "received 7"),
        (header(256 * K) + b"\x01", "received 1"),
        (header(256 * K) + b"\x00", "inner node"),  # hole only for a leaf
        (header(256 * K) + b"\x02" + b"more", "after"),
        (header(256 * K + 10) + b"\x02\x05", "tail command"),
        (header(256 * K + 10) + b"\x02\x00" + struct.pack("<q", 11), "zero run"),
        (header(256 * K + 10) + b"\x02\x00" + struct.pack("<q", -1), "zero run"),
        (header(256 * K + 10) + b"\x02\x01" + b"0123456789!", "after"),
    ],
)
@pytest.mark.pure
def test_target_rejects_garbage(stream: bytes, match: str) -> None:
    with pytest.raises(PeerError, match=match):
        fresh_target().receive_data(stream)


@pytest.mark.pure
def test_target_tail_hole_then_block() -> None:
    store = MemoryStore(b"")
    target = LegacyTarget(store)
    target.receive_data(header(10) + b"\x00" + struct.pack("<q", 4) + b"\x01" + b"abcdef")
    assert not target.done  # its header has not been taken yet
    assert target.data_to_send() == header(0)
    assert target.done and store.buf == b"\0\0\0\0abcdef"


@pytest.mark.pure
def test_source_rejects_garbage_and_early_close() -> None:
    source = LegacySource(MemoryStore(b"s" * 300 * K))
    source.data_to_send()
    with pytest.raises(PeerError, match="expected b'BSNC0002'"):
        source.receive_data(b"BSNC0003" + bytes(8))

    source = LegacySource(MemoryStore(b"s" * 300 * K))
    source.receive_data(header(300 * K) + b"d" * 30)
    with pytest.raises(PeerError, match=r"early.*digest"):
        source.receive_data(b"")

    source = LegacySource(MemoryStore(b"s" * 10))
    source.receive_data(header(0))  # target empty: only the tail remains to send
    with pytest.raises(PeerError, match="unexpected"):
        source.receive_data(b"x")


@pytest.mark.pure
def test_source_sends_tail_on_demand_and_ends() -> None:
    data = random.Random(3).randbytes(700 * K) + bytes(300 * K) + b"end"
    source = LegacySource(MemoryStore(data), max_send=300 * K)
    assert source.data_to_send() == header(len(data))
    source.receive_data(header(0))
    chunks = []
    while not source.done:
        chunks.append(source.data_to_send())
        assert len(chunks[-1]) <= 300 * K
    stream = b"".join(chunks)
    assert len(chunks) > 2
    # chunk 5 (640..768 KiB) still holds random bytes, chunk 6 is all zeros, chunk 7 is short
    last = 7 * 128 * K
    assert stream.endswith(
        b"\x00" + struct.pack("<q", 128 * K) + b"\x01" + bytes(1000 * K - last) + b"end"
    )
    store = MemoryStore(b"")
    target = LegacyTarget(store)
    assert target.data_to_send() == header(0)
    target.receive_data(header(len(data)) + stream)
    assert target.done and store.buf == data


# ---------------------------------------------------------------------------------------------
# Progress lines and remote command words
# ---------------------------------------------------------------------------------------------


@pytest.mark.pure
def test_progress_line_format() -> None:
    assert format_progress_start("calc", 2097152) == "[Start calc]\nSize: 2097152\n"
    assert format_progress_start("sync", 0) == "[Start sync]\nSize: 0\n"
    assert format_progress_update(131072) == "Update: 131072\n"


@pytest.mark.pure
def test_progress_writer_throttles_like_go() -> None:
    w = ProgressLineWriter("calc")
    assert w.start(1000, now=10.0) == "[Start calc]\nSize: 1000\n"
    assert w.update(100, now=10.1) == ""
    assert w.update(200, now=10.25) == "Update: 200\n"
    assert w.update(300, now=10.3) == ""
    assert w.update(1000, now=10.31) == "Update: 1000\n"  # the end is never throttled
    empty = ProgressLineWriter("sync")
    empty.start(0, now=0.0)
    assert empty.update(0, now=5.0) == ""


@needs_vectors
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.inproc
def test_parse_recorded_remote_commands(case: Case) -> None:
    req = parse_go_remote_args(shlex.split(remote_cmd(case.name)))
    assert req == GoRemoteRequest(
        mode="target",
        path=f"/backup/{case.name}.target",
        calc_progress=True,
        program="diskrsync",
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--source", "/dev/sda"], GoRemoteRequest("source", "/dev/sda")),
        (
            ["/usr/bin/diskrsync", "--source", "--calc-progress", "x"],
            GoRemoteRequest("source", "x", calc_progress=True, program="/usr/bin/diskrsync"),
        ),
        (
            ["--target", " --no-compress", "--calc-progress", "--sync-progress", "p"],
            GoRemoteRequest(
                "target", "p", no_compress=True, calc_progress=True, sync_progress=True
            ),
        ),
        (["--target", "--no-compress", "p"], GoRemoteRequest("target", "p", no_compress=True)),
        (["--target", " --verbose", "p"], GoRemoteRequest("target", "p", verbose=True)),
        (
            ["--target", "--calc-progress", "--verbose", "p"],
            GoRemoteRequest("target", "p", calc_progress=True, verbose=True),
        ),
    ],
)
@pytest.mark.pure
def test_parse_go_remote_args(argv: list[str], expected: GoRemoteRequest) -> None:
    assert parse_go_remote_args(argv) == expected


@pytest.mark.pure
def test_parse_go_remote_args_after_shell_resplit() -> None:
    # what ssh does: join the words with spaces, then the remote shell splits them again
    words = ["diskrsync", "--target", " --no-compress", "--calc-progress", "/b/t"]
    req = parse_go_remote_args(shlex.split(" ".join(words)))
    assert req.no_compress and req.calc_progress and req.path == "/b/t"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["diskrsync"],
        ["--target"],
        ["--both", "p"],
        ["--target", "--bogus", "p"],
        ["--target", "--no-compress", "--no-compress", "p"],
        ["--source", "--no-compress", "p"],
        ["--target", "--sync-progress", "p"],
        ["--target", "p", "extra"],
        ["--target", "--calc-progress"],
        ["--target", ""],
        ["--target", "  --no-compress", "p"],
        ["--target", "--no-compress=true", "p"],
    ],
)
@pytest.mark.pure
def test_parse_go_remote_args_rejects(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_go_remote_args(argv)
