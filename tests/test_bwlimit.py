"""``push --bwlimit`` (issue 15): a token bucket in the channel layer, checked by counting
bytes against an injected clock (no wall-clock assertions)."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.imagetools import cli

from diskrsync.base.units import parse_rate
from diskrsync.compression.image import Image
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import FramedChannel, TokenBucket, channel_pair
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions

CS = 16 * 1024


class FakeClock:
    """Time that passes only when someone sleeps (thread-safe)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        with self._lock:
            self.now += seconds
            self.slept += seconds

    def idle(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def bucket(rate: float, burst: int | None = None) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(rate, burst, clock=clock, sleep=clock.sleep), clock


@pytest.mark.pure
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10_000_000), st.integers(1, 1 << 20),
       st.lists(st.tuples(st.integers(0, 1 << 20), st.floats(0, 5)), max_size=50))
def test_bucket_never_exceeds_rate_plus_burst(rate, burst, steps):
    """After every take returns, what passed is at most burst + rate x elapsed; and with no
    idle time at all, it waited exactly as long as the bytes beyond the first burst need."""
    limit, clock = bucket(rate, burst)
    t0, total = clock(), 0
    for n, idle in steps:
        clock.idle(idle)
        limit.take(n)
        total += n
        assert total <= burst + rate * (clock() - t0) + 1e-6 * total + 1
    fresh, fresh_clock = bucket(rate, burst)
    amount = sum(n for n, _idle in steps)
    for n, _idle in steps:
        fresh.take(n)
    assert fresh_clock.slept == pytest.approx(max(0, amount - burst) / rate, rel=1e-9,
                                              abs=1e-9)


@pytest.mark.pure
def test_default_burst_and_pieces():
    limit, _ = bucket(1 << 20)
    assert limit.burst == 256 * 1024  # a quarter of a second
    assert bucket(1000)[0].burst == 4096  # never below 4 KiB
    pieces = limit.pieces(bytes(600 * 1024))
    assert [len(x) for x in pieces] == [256 * 1024, 256 * 1024, 88 * 1024]
    assert [len(x) for x in limit.pieces(b"")] == [0]
    with pytest.raises(ValueError):
        TokenBucket(0)


class RecordingStream:
    """A Stream that notes (time, bytes) of each send and serves ``incoming`` to recv."""

    def __init__(self, clock: FakeClock, incoming: bytes = b"") -> None:
        self.clock = clock
        self.sent: list[tuple[float, int]] = []
        self.incoming = incoming

    def send(self, data: bytes) -> None:
        self.sent.append((self.clock(), len(data)))

    def recv(self, max_bytes: int) -> bytes:
        data, self.incoming = self.incoming[:max_bytes], self.incoming[max_bytes:]
        return data

    def close_send(self) -> None:
        pass


@pytest.mark.pure
def test_framed_channel_paces_large_frames_in_pieces():
    rate, burst = 64 * 1024, 16 * 1024
    limit, clock = bucket(rate, burst)
    stream = RecordingStream(clock)
    ch = FramedChannel(stream, limit=limit)
    t0 = clock()
    for i in range(4):
        ch.send(p.Chunk(i, 1, bytes(32), os.urandom(100 * 1024)))
    assert max(n for _t, n in stream.sent) <= burst  # the link never waits on one big write
    total = 0
    for t, n in stream.sent:
        total += n
        assert total <= burst + rate * (t - t0) + 1e-6  # sent once allowed, not before
    assert total == ch.bytes_sent
    assert clock.slept == pytest.approx((total - burst) / rate)
    before = clock.slept
    ch.send(p.Alive())  # keepalives are not held back
    assert clock.slept == before


@pytest.mark.pure
def test_framed_channel_paces_what_it_reads():
    """A pull: this end receives the data; reading slower slows the sender."""
    rate = 32 * 1024
    limit, clock = bucket(rate, 8192)
    frames = p.preamble() + b"".join(p.encode(p.Chunk(i, 1, bytes(32), bytes(20_000)))
                                     for i in range(5))
    ch = FramedChannel(RecordingStream(clock, frames), recv_size=4096, limit=limit)
    got = [ch.recv() for _ in range(5)]
    assert [m.index for m in got if isinstance(m, p.Chunk)] == list(range(5))
    assert clock.slept == pytest.approx((len(frames) - 8192) / rate)


@pytest.mark.inproc
def test_local_push_is_paced_by_its_channel(tmp_path: Path):
    """The whole push over a limited in-process pair: the (fake) time it took is what the
    bytes it sent need at that rate, less one burst."""
    src, dst = tmp_path / "s", tmp_path / "t.spgz"
    data = os.urandom(CS * 64)
    src.write_bytes(data)
    rate = 256 * 1024
    limit, clock = bucket(rate)
    req = PushRequest(source=SourceOptions(chunk_size=CS))
    stats = local_push(str(src), str(dst), req, channels=channel_pair(limit=limit))
    assert stats.bytes_sent > len(data)
    assert clock.slept == pytest.approx((stats.bytes_sent - limit.burst) / rate, rel=1e-6)
    with Image.open(str(dst)) as img, img.snapshot() as snap:
        assert snap.read(0, len(data)) == data


@pytest.mark.pure
@pytest.mark.parametrize("text,rate", [
    ("800", 800 * 1024), ("500K", 500 * 1024), ("10M", 10 << 20), ("1.5MiB/s", 1.5 * (1 << 20)),
    ("2mb", 2 << 20), ("100B", 100), ("100b/s", 100), ("1G", 1 << 30), ("0", 0)])
def test_rates(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.pure
@pytest.mark.parametrize("text", ["", "x", "-1", "nan", "inf", "5iB", "10 M B", "0.5B"])
def test_bad_rates(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a rate"):
        parse_rate(text)


@pytest.mark.process
def test_cli_bwlimit(tmp_path: Path):
    src, dst = tmp_path / "s", tmp_path / "t.spgz"
    src.write_bytes(os.urandom(CS * 4))
    r = cli("push", "-q", "--bwlimit", "64M", str(src), str(dst))
    assert r.returncode == 0, r.stderr
    r = cli("push", "--bwlimit", "fast", str(src), str(dst))
    assert r.returncode == 2 and b"not a rate" in r.stderr
    r = cli("push", "--legacy", "--bwlimit", "1M", str(src), "host:/x")
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1
    assert b"--bwlimit works with the native protocol only" in r.stderr
