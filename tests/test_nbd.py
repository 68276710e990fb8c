"""The NBD client (compression/nbd.py): URIs, and a hostile server that lies about sizes,
lengths and extents. The client must fail cleanly, never allocate what the server names, and
never loop without bound. The real QEMU is met in tests/test_dirty_bitmap.py."""

from __future__ import annotations

import itertools
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskrsync.base.errors import DiskrsyncError, ReadError, UsageError
from diskrsync.compression import nbd
from diskrsync.compression.nbd import (
    BASE_ALLOCATION,
    NbdAddress,
    NbdClient,
    NbdError,
    merge_ranges,
    parse_nbd_url,
)
from diskrsync.synccore.push import PushRequest, local_push

# -- URIs --------------------------------------------------------------------------------


@pytest.mark.pure
def test_uris_of_both_transports_parse():
    a = parse_nbd_url("nbd+unix:///disk0?socket=/run/qsd/nbd.sock")
    assert (a.export, a.socket_path, a.host) == ("disk0", "/run/qsd/nbd.sock", None)
    b = parse_nbd_url("nbd://example.org:10810/vm%2Fdisk")
    assert (b.export, b.host, b.port) == ("vm/disk", "example.org", 10810)
    assert parse_nbd_url("nbd://[::1]/x").host == "::1"
    assert parse_nbd_url("nbd://h/x").port == nbd.DEFAULT_PORT
    for s in (str(a), str(b)):
        assert parse_nbd_url(s) == parse_nbd_url(s)


@pytest.mark.pure
@pytest.mark.parametrize("bad", [
    "nbd+unix:///disk0", "nbd+unix://host/disk0?socket=/s", "nbds://h/x",
    "nbd:///x", "nbd://h:99999/x", "http://h/x",
])
def test_bad_uris_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_nbd_url(bad)


@pytest.mark.pure
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 16))),
       st.sampled_from([1, 512, 4096, 65536]))
def test_merged_ranges_cover_their_input_and_stay_bounded(raw, grain):
    size = (1 << 20) + (1 << 16)
    ranges = sorted(raw)
    out = merge_ranges(iter(ranges), grain, size)
    for (a, n), (b, _m) in itertools.pairwise(out):
        assert a + n < b  # disjoint, ascending, not touching
    assert all(n > 0 and a + n <= size for a, n in out)
    for off, n in ranges:
        lo, hi = off, min(off + n, size)
        assert lo >= hi or any(a <= lo and hi <= a + m for a, m in out)
    assert len(out) <= size // grain // 2 + 1


# -- a scripted, hostile server ------------------------------------------------------------


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("client went away")
        buf += part
    return buf


def negotiate(conn: socket.socket, size: int = 1 << 20,
              contexts: tuple[str, ...] = (BASE_ALLOCATION,),
              block_size: tuple[int, int, int] | None = None) -> None:
    """A correct fixed-newstyle negotiation that grants ``contexts``."""
    conn.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
    _recv(conn, 4)
    while True:
        _magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
        data = _recv(conn, length)
        if opt == nbd.OPT_STRUCTURED_REPLY:
            option_reply(conn, opt, nbd.REP_ACK)
        elif opt == nbd.OPT_SET_META_CONTEXT:
            for i, c in enumerate(contexts):
                if c.encode() in data:
                    option_reply(conn, opt, nbd.REP_META_CONTEXT,
                                 struct.pack(">I", i + 1) + c.encode())
            option_reply(conn, opt, nbd.REP_ACK)
        elif opt == nbd.OPT_GO:
            option_reply(conn, opt, nbd.REP_INFO, struct.pack(">HQH", 0, size, 1))
            if block_size:
                option_reply(conn, opt, nbd.REP_INFO, struct.pack(">HIII", 3, *block_size))
            option_reply(conn, opt, nbd.REP_ACK)
            return


def option_reply(conn: socket.socket, opt: int, rtype: int, data: bytes = b"",
                 length: int | None = None) -> None:
    conn.sendall(struct.pack(">QIII", nbd.REPLY_MAGIC, opt, rtype,
                             len(data) if length is None else length) + data)


def request(conn: socket.socket) -> tuple[int, int, int, int]:
    """(command, cookie, offset, length) of the client's next request."""
    _m, _f, cmd, cookie, off, length = struct.unpack(">IHHQQI", _recv(conn, 28))
    return cmd, cookie, off, length


def chunk(conn: socket.socket, cookie: int, rtype: int, payload: bytes, *, done: bool = True,
          length: int | None = None) -> None:
    conn.sendall(struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, 1 if done else 0, rtype,
                             cookie, len(payload) if length is None else length) + payload)


class FakeServer:
    """Runs ``script(conn)`` for one client on a unix socket, on a thread."""

    def __init__(self, path: Path, script: Callable[[socket.socket], None]) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[socket.socket], None]) -> None:
        conn, _ = self.listener.accept()
        try:
            script(conn)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    def address(self) -> NbdAddress:
        return NbdAddress("x", socket_path=self.path)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], NbdAddress]]:
    servers: list[FakeServer] = []

    def start(script: Callable[[socket.socket], None]) -> NbdAddress:
        s = FakeServer(tmp_path / f"nbd{len(servers)}.sock", script)
        servers.append(s)
        return s.address()

    yield start
    for s in servers:
        s.close()


def client(address: NbdAddress) -> NbdClient:
    return NbdClient(address, (BASE_ALLOCATION,), timeout=10)


def _then(*steps: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        negotiate(conn)
        for step in steps:
            step(conn)
        _recv(conn, 28)  # wait for the client's disconnect (or its going away)
    return script


@pytest.mark.inproc
def test_something_that_is_not_nbd_is_refused(fake):
    addr = fake(lambda c: c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(40)))
    with pytest.raises(NbdError, match="not an NBD server"):
        client(addr)


@pytest.mark.inproc
def test_an_option_reply_is_bounded_before_it_is_read(fake):
    def script(conn: socket.socket) -> None:
        conn.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
        _recv(conn, 4 + 16)
        option_reply(conn, nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK, length=0xFFFFFFF0)
        _recv(conn, 1)
    with pytest.raises(NbdError, match="option reply of 4294967280 bytes"):
        client(fake(script))


@pytest.mark.inproc
def test_an_impossible_export_size_is_refused(fake):
    addr = fake(lambda c: negotiate(c, size=1 << 63))
    with pytest.raises(NbdError, match="export size"):
        client(addr)


@pytest.mark.inproc
def test_impossible_block_sizes_are_refused(fake):
    addr = fake(lambda c: negotiate(c, block_size=(3, 4096, 1 << 20)))
    with pytest.raises(NbdError, match="block size"):
        client(addr)


def _reply_to_read(payload: Callable[[int, int, int], list[tuple[int, bytes, bool]]],
                   ) -> Callable[[socket.socket], None]:
    """A step answering one read with the chunks ``payload(cookie, offset, length)`` gives."""
    def step(conn: socket.socket) -> None:
        cmd, cookie, off, length = request(conn)
        assert cmd == nbd.CMD_READ
        for rtype, data, done in payload(cookie, off, length):
            chunk(conn, cookie, rtype, data, done=done)
    return step


@pytest.mark.inproc
def test_a_read_reply_longer_than_asked_is_refused_before_it_is_read(fake):
    def step(conn: socket.socket) -> None:
        _cmd, cookie, off, _n = request(conn)
        chunk(conn, cookie, nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", off),
              length=0xFFFFFFFF)
    with client(fake(_then(step))) as c, pytest.raises(NbdError, match="read reply chunk"):
        c.read(0, 4096)


@pytest.mark.inproc
def test_read_data_outside_the_range_is_refused(fake):
    step = _reply_to_read(lambda k, off, n: [
        (nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", off + 1) + bytes(n), True)])
    with client(fake(_then(step))) as c, pytest.raises(NbdError, match="outside"):
        c.read(0, 4096)


@pytest.mark.inproc
def test_read_chunks_that_leave_a_gap_or_overlap_are_refused(fake):
    gap = _reply_to_read(lambda k, off, n: [
        (nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", off) + bytes(n // 2), True)])
    overlap = _reply_to_read(lambda k, off, n: [
        (nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", off) + bytes(n // 2 + 1), False),
        (nbd.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", off + n // 2, n // 2), True)])
    for step in (gap, overlap):
        with client(fake(_then(step))) as c, pytest.raises(NbdError, match=r"gap|overlap"):
            c.read(0, 4096)


@pytest.mark.inproc
def test_a_read_made_of_data_and_holes_is_assembled(fake):
    step = _reply_to_read(lambda k, off, n: [
        (nbd.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", off + 1024, n - 1024), False),
        (nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", off) + b"\x07" * 1024, True)])
    with client(fake(_then(step))) as c:
        assert c.read(8192, 4096) == b"\x07" * 1024 + bytes(3072)


@pytest.mark.inproc
def test_a_server_read_error_is_a_read_error_at_its_offset(fake):
    msg = b"bad sector"
    step = _reply_to_read(lambda k, off, n: [
        (nbd.REPLY_TYPE_ERROR_BIT | 1, struct.pack(">IH", 5, len(msg)) + msg, True)])
    with client(fake(_then(step))) as c, pytest.raises(ReadError) as e:
        c.read(4096, 4096)
    assert e.value.offset == 4096


@pytest.mark.inproc
def test_a_reply_to_a_request_never_sent_is_refused(fake):
    def step(conn: socket.socket) -> None:
        _cmd, cookie, _off, _n = request(conn)
        conn.sendall(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie + 7))
    with client(fake(_then(step))) as c, pytest.raises(NbdError, match="never sent"):
        c.read(0, 512)


def _status(*replies: bytes | tuple[bytes, int]) -> Callable[[socket.socket], None]:
    """Answer block status requests with these payloads (context id 1 prepended); a
    (payload, length) pair announces another length than it sends."""
    def step(conn: socket.socket) -> None:
        for r in replies:
            cmd, cookie, _off, _n = request(conn)
            assert cmd == nbd.CMD_BLOCK_STATUS
            data, length = (r, None) if isinstance(r, bytes) else r
            chunk(conn, cookie, nbd.REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", 1) + data,
                  length=None if length is None else length + 4)
    return step


def _extents(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">II", n, f) for n, f in pairs)


@pytest.mark.inproc
@pytest.mark.parametrize("reply,match", [
    ((b"", 1 << 30), "block status reply of"),  # announced huge: refused before reading
    (_extents((4096, 0))[:-2], "block status reply of"),  # not a whole descriptor
    (b"", "block status reply of"),  # no descriptor at all
    (_extents((0, 0)), "length 0"),  # would never advance
    (_extents((512, 0), (512, 0)) + _extents((4096, 0)) * 2048, "beyond the range"),
])
def test_bad_block_status_replies_are_refused(fake, reply, match):
    with client(fake(_then(_status(reply)))) as c, pytest.raises(NbdError, match=match):
        c.block_status(BASE_ALLOCATION, 0, 1024)


@pytest.mark.inproc
def test_an_extent_running_past_the_range_is_cut_to_it(fake):
    with client(fake(_then(_status(_extents((1 << 31, 3)))))) as c:
        assert c.block_status(BASE_ALLOCATION, 4096, 8192) == [(8192, 3)]


@pytest.mark.inproc
def test_a_walk_of_tiny_extents_is_bounded(fake, monkeypatch):
    monkeypatch.setattr(nbd, "MAX_WALK_EXTENTS", 1000)
    # 1-byte extents: the walk advances, but would need a million replies for 1 MiB
    replies = [_extents(*[(1, 0)] * 100)] * 11
    with client(fake(_then(_status(*replies)))) as c, \
            pytest.raises(NbdError, match="more than 1000 extents"):
        list(c.walk(BASE_ALLOCATION))


@pytest.mark.inproc
def test_a_walk_covers_the_export_in_order(fake):
    replies = [_extents((4096, 0), (8192, 3)), _extents((1 << 20, 0))]
    with client(fake(_then(_status(*replies)))) as c:
        assert list(c.walk(BASE_ALLOCATION)) == [
            (0, 4096, 0), (4096, 8192, 3), (12288, (1 << 20) - 12288, 0)]


@pytest.mark.inproc
def test_a_context_the_server_did_not_grant_is_not_asked_for(fake):
    with client(fake(_then())) as c, pytest.raises(NbdError, match="did not grant"):
        c.block_status("qemu:dirty-bitmap:b0", 0, 512)


@pytest.mark.inproc
def test_a_negotiation_that_never_ends_is_refused(fake):
    def script(conn: socket.socket) -> None:
        conn.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
        _recv(conn, 4 + 16)
        option_reply(conn, nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK)
        _recv(conn, 16)
        _recv(conn, struct.unpack(">I", _recv(conn, 4))[0] + 4)  # name, 1 info request
        info = struct.pack(">HQH", 0, 1 << 20, 1)
        for _ in range(nbd.MAX_REPLIES + 1):
            option_reply(conn, nbd.OPT_GO, nbd.REP_INFO, info)
    with pytest.raises(NbdError, match="more than 1024 replies"):
        NbdClient(fake(script), timeout=10)


@pytest.mark.inproc
def test_a_read_reply_that_never_ends_is_refused(fake):
    msg = b"again"
    step = _reply_to_read(lambda k, off, n: [
        (nbd.REPLY_TYPE_ERROR_BIT | 1, struct.pack(">IH", 5, len(msg)) + msg, False)] * (
        n + nbd.MAX_REPLIES + 1))
    with client(fake(_then(step))) as c, pytest.raises(NbdError, match="more than"):
        c.read(0, 512)


@pytest.mark.inproc
def test_an_enormous_export_is_refused_before_the_push_allocates_for_it(fake, tmp_path):
    def script(conn: socket.socket) -> None:
        negotiate(conn, size=1 << 62)
        while True:
            request(conn)
    addr = fake(script)
    with pytest.raises(DiskrsyncError, match="more than"):
        local_push(f"nbd+unix:///x?socket={addr.socket_path}", str(tmp_path / "img"),
                   PushRequest())
