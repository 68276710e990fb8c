"""A remote push starts scanning while SSH connects (issue 16): behaviour, not timing.

``remote.start_remote`` is replaced by a fake connection whose target end runs in this
process (``run_target_end`` over an in-process channel, verifying every chunk as serve
does). The fake does not "finish connecting" until it has seen the source being read, so a
push that scans only after connecting fails here instead of merely being slower; counting the
source's reads shows whether the head start was used or scanned again.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diskrsync.base.errors import LocalError, PeerError
from diskrsync.compression.image import Image
from diskrsync.compression.sources import RawSource
from diskrsync.synccore import remote
from diskrsync.synccore import source as source_mod
from diskrsync.synccore.channel import PIPE_SIZE, FdStream, channel_pair
from diskrsync.synccore.location import LocalPath, RemotePath
from diskrsync.synccore.push import PushRequest, local_push, run_target_end
from diskrsync.synccore.source import SourceOptions
from diskrsync.synccore.ssh.config import RemoteOptions, SshOptions
from diskrsync.synccore.ssh.errors import ConnectError

CS = 64 << 10
SIZE = 32 << 20  # 512 chunks of CS: 16 batches, 4 pages
GUARD = 30.0  # "did not hang" only: the events below decide every outcome


class CountingSource(RawSource):
    """A raw source that counts its reads and says when the first one happened."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.bytes = 0
        self.first_read = threading.Event()
        self.closed = False
        self._count = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        data = super().read(offset, length)
        with self._count:
            self.bytes += len(data)
        self.first_read.set()
        return data

    def close(self) -> None:
        self.closed = True
        super().close()


class FakeRun:
    """What ``start_remote`` returns, with the target end on a thread of this process."""

    def __init__(self, path: str, req: PushRequest) -> None:
        self.a, b = channel_pair()
        self.failure: list[BaseException] = []

        def target() -> None:
            try:
                run_target_end(b, path, req, verify=True)
            except BaseException as e:
                self.failure.append(e)

        self.thread = threading.Thread(target=target, name="fake-serve", daemon=True)
        self.thread.start()

    def framed(self, limit: object = None) -> Any:
        return self.a

    def converse(self, body: Callable[[], Any]) -> Any:
        try:
            return body()
        finally:
            self.thread.join(GUARD)


class Harness:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        self.tmp = tmp
        self.src = tmp / "disk.raw"
        self.src.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4))
        self.readers: list[CountingSource] = []
        self.read_before_connected: list[int] = []
        self.connect: Callable[[CountingSource], None] = self.wait_for_scan
        monkeypatch.setattr(remote, "open_push_source", self.open_source)
        monkeypatch.setattr(remote, "start_remote", self.start_remote)

    def open_source(self, path: str, req: PushRequest) -> CountingSource:
        reader = CountingSource(path)
        self.readers.append(reader)
        return reader

    def wait_for_scan(self, reader: CountingSource) -> None:
        """The connection completes only once the scan has started."""
        if not reader.first_read.wait(GUARD):
            raise ConnectError("the scan did not start while connecting")

    def start_remote(self, where: RemotePath, opts: RemoteOptions, argv: list[str]) -> FakeRun:
        reader = self.readers[-1]
        self.connect(reader)
        self.read_before_connected.append(reader.bytes)
        return FakeRun(where.path, self.req)

    def push(self, dst: Path, chunk_size: int = CS) -> Any:
        self.req = PushRequest(source=SourceOptions(chunk_size=chunk_size))
        opts = RemoteOptions(SshOptions())
        return remote.remote_push(LocalPath(str(self.src)),
                                  RemotePath(None, "host", None, str(dst)), self.req, opts)


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Harness]:
    yield Harness(monkeypatch, tmp_path)


def _content(image: Path) -> bytes:
    with Image.open(str(image)) as img:
        snap = img.snapshot()
        return snap.read(0, snap.size)


def _early_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name == "push-early" or t.name.startswith("diskrsync")]


@pytest.mark.inproc
def test_no_change_push_uses_the_scan_made_while_connecting(h: Harness) -> None:
    image = h.tmp / "r.spgz"
    local_push(str(h.src), str(image), PushRequest(source=SourceOptions(chunk_size=CS)))
    stats = h.push(image)
    assert h.read_before_connected[-1] > 0  # the scan began before the connection was up
    assert stats.unchanged and stats.chunks_differing == 0
    # what was hashed while connecting was used: every byte read exactly once
    assert h.readers[-1].bytes == stats.bytes_read == SIZE
    assert stats.phases["connect"] >= 0


@pytest.mark.inproc
def test_first_push_compresses_what_the_early_scan_only_hashed(h: Harness) -> None:
    image = h.tmp / "new.spgz"
    stats = h.push(image)
    assert h.read_before_connected[-1] > 0
    assert stats.created and _content(image) == h.src.read_bytes()


@pytest.mark.inproc
def test_changed_source_with_an_early_scan(h: Harness) -> None:
    image = h.tmp / "r.spgz"
    local_push(str(h.src), str(image), PushRequest(source=SourceOptions(chunk_size=CS)))
    data = bytearray(h.src.read_bytes())
    data[5 * CS + 7] ^= 0xFF  # within the part read before connecting
    data[SIZE - 3] ^= 0xFF
    h.src.write_bytes(bytes(data))
    stats = h.push(image)
    assert stats.chunks_differing == 2
    assert _content(image) == bytes(data)


@pytest.mark.inproc
def test_early_scan_is_dropped_when_the_target_has_another_chunk_size(h: Harness) -> None:
    image = h.tmp / "r.spgz"
    local_push(str(h.src), str(image), PushRequest(source=SourceOptions(chunk_size=2 * CS)))
    data = bytearray(h.src.read_bytes())
    data[3] ^= 1
    h.src.write_bytes(bytes(data))
    stats = h.push(image, chunk_size=CS)  # the image keeps its own 2 * CS
    assert stats.chunk_size == 2 * CS and stats.chunks_differing == 1
    assert _content(image) == bytes(data)


@pytest.mark.inproc
def test_early_scan_keeps_a_bounded_head_start(h: Harness,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """It stops at EARLY_CHUNKS digests even when the connection takes long; the scan goes
    on from there once the target is known."""
    monkeypatch.setattr(source_mod, "EARLY_CHUNKS", 32)  # one batch
    image = h.tmp / "r.spgz"
    local_push(str(h.src), str(image), PushRequest(source=SourceOptions(chunk_size=CS)))
    done = threading.Event()

    def slow_connect(reader: CountingSource) -> None:
        h.wait_for_scan(reader)
        # the head start ends by itself: its thread exits after its first batch
        for t in threading.enumerate():
            if t.name == "push-early":
                t.join(GUARD)
        done.set()

    h.connect = slow_connect
    stats = h.push(image)
    assert done.is_set()
    assert h.read_before_connected[-1] == 32 * CS  # one batch, no more
    assert h.readers[-1].bytes == SIZE and stats.unchanged


@pytest.mark.inproc
@pytest.mark.parametrize("failure", [ConnectError("cannot connect to host port 22: refused"),
                                     KeyboardInterrupt()])
def test_failed_connection_stops_the_early_scan(h: Harness, failure: BaseException) -> None:
    def fail(reader: CountingSource) -> None:
        h.wait_for_scan(reader)
        raise failure

    h.connect = fail
    with pytest.raises(type(failure)) as got:
        h.push(h.tmp / "r.spgz")
    if isinstance(failure, PeerError):
        assert isinstance(got.value, PeerError) and got.value.exit_code == 5  # unchanged
    assert h.readers[-1].closed
    assert _early_threads() == []  # nothing of the scan keeps running


@pytest.mark.inproc
def test_read_error_met_early_is_reported_as_before(h: Harness,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The head start stops at a failing read; the scan meets it again and the push fails
    as it always did (a local read error, exit 3), after connecting."""
    bad = 9 * CS
    image = h.tmp / "r.spgz"
    local_push(str(h.src), str(image), PushRequest(source=SourceOptions(chunk_size=CS)))
    original = CountingSource.read

    def read(self: CountingSource, offset: int, length: int) -> bytes:
        if offset <= bad < offset + length:
            self.first_read.set()
            raise OSError(5, "Input/output error")
        return original(self, offset, length)

    monkeypatch.setattr(CountingSource, "read", read, raising=True)
    h.connect = lambda reader: None
    with pytest.raises(LocalError) as got:
        h.push(image)
    assert f"offset {bad}" in got.value.message and got.value.exit_code == 3
    assert _early_threads() == []


@pytest.mark.inproc
def test_fdstream_widens_its_pipes() -> None:
    """serve's stdin and stdout (pipes from and to sshd) take a MiB at a time, so a first
    push's data does not wake serve for every 64 KiB."""
    r, w = os.pipe()
    try:
        before = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
        FdStream(r, w)
        after = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
        assert before < PIPE_SIZE and after == PIPE_SIZE
    finally:
        os.close(r)
        os.close(w)
