"""A cold source is read at the device's speed: the scan asks the reader for what it will read a
window ahead of the batches its workers read (``SourceReader.prefetch``: ``POSIX_FADV_WILLNEED``
for a file or block device), every byte once, only what the scan reads (a sparse file's data,
a map's changed ranges), and a no-change push reads each byte of the source exactly once."""

from __future__ import annotations

import importlib
import os
import random
import threading
from collections.abc import Iterator

import pytest
from support.pushes import threaded_push

from diskrsync.compression.sources import RawSource
from diskrsync.synccore import source as source_mod
from diskrsync.synccore.source import PushStats

pytestmark = pytest.mark.inproc
cli_main = importlib.import_module("diskrsync.cli.main")  # (the package's is the function)

CS = 16384
BATCH = 32 * CS  # BATCH_CHUNKS chunks: what one worker reads at once
MiB = 1 << 20
BASE = {"map": "test-map", "bitmap": "b1"}


class RecordingSource(RawSource):
    """A raw file that records, in order, the ranges asked for (``prefetch``) and read."""

    def __init__(self, path: str, changed: list[tuple[int, int]] | None = None) -> None:
        super().__init__(path)
        self.events: list[tuple[str, int, int]] = []
        self.changed = changed
        self._lock = threading.Lock()

    def prefetch(self, offset: int, length: int) -> None:
        with self._lock:
            self.events.append(("hint", offset, offset + length))
        super().prefetch(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.events.append(("read", offset, offset + length))
        return super().read(offset, length)

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        return self.changed

    def change_base(self) -> dict[str, str] | None:
        return BASE if self.changed is not None else None

    def hints(self) -> list[tuple[int, int]]:
        return [(a, b) for kind, a, b in self.events if kind == "hint"]

    def reads(self) -> list[tuple[int, int]]:
        return [(a, b) for kind, a, b in self.events if kind == "read"]


def push(reader: RawSource, dst: str) -> PushStats:
    return threaded_push(reader, dst, chunk_size=CS)


def covered(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def hinted_before_read(events: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """The reads (start, end) some of whose bytes were not asked for before they were read."""
    hinted: list[tuple[int, int]] = []
    late = []
    for kind, a, b in events:
        if kind == "hint":
            hinted = covered([*hinted, (a, b)])
        elif not any(x <= a and b <= y for x, y in hinted):
            late.append((a, b))
    return late


@pytest.fixture
def disk(tmp_path) -> Iterator[tuple[str, bytes]]:
    """A 12.5 MiB file of random bytes (no holes): 800 chunks, 25 batches."""
    data = random.Random(5).randbytes(800 * CS)
    path = tmp_path / "disk"
    path.write_bytes(data)
    yield str(path), data


@pytest.fixture
def small_window(monkeypatch) -> int:
    """Read-ahead of three batches, so a small disk shows the window sliding."""
    monkeypatch.setattr(source_mod, "PREFETCH_BYTES", 3 * BATCH)
    return 3 * BATCH


def test_every_byte_is_asked_for_once_before_it_is_read(disk, tmp_path, small_window):
    """A file without holes: the hints cover it exactly once, in ascending order, and no
    read comes before its hint (before, only a scan in pieces was ever hinted)."""
    path, data = disk
    dst = str(tmp_path / "dst.img")
    push(RawSource(path), dst)  # the target holds it: the next push changes nothing
    reader = RecordingSource(path)
    stats = push(reader, dst)
    assert stats.chunks_differing == 0
    hints = reader.hints()
    assert hints and covered(hints) == [(0, len(data))]
    assert sum(b - a for a, b in hints) == len(data)  # each byte once
    assert hints == sorted(hints)
    assert hinted_before_read(reader.events) == []


def test_the_window_slides_with_the_scan(disk, tmp_path, small_window):
    """No hint runs further ahead of the reads handed out than the window (plus the
    batches the worker pool holds): the page cache is not filled with the whole disk."""
    path, _data = disk
    dst = str(tmp_path / "dst.img")
    push(RawSource(path), dst)
    reader = RecordingSource(path)
    push(reader, dst)
    assert reader.hints()[0] == (0, BATCH + small_window)  # the first batch and the window
    in_flight = (source_mod.SCAN_WINDOW + 2) * BATCH  # submitted, not yet read: at most this
    read_to = 0
    for kind, a, b in reader.events:
        if kind == "read":
            read_to = max(read_to, b)
        else:
            assert b <= read_to + in_flight + small_window + BATCH, (a, b, read_to)
    assert len(reader.hints()) > 3


def test_no_change_push_reads_every_byte_exactly_once(disk, tmp_path):
    path, data = disk
    dst = str(tmp_path / "dst.img")
    push(RawSource(path), dst)
    reader = RecordingSource(path)
    stats = push(reader, dst)
    reads = reader.reads()
    assert sum(b - a for a, b in reads) == len(data) == stats.bytes_read
    assert covered(reads) == [(0, len(data))]


def test_a_sparse_file_is_hinted_only_where_it_holds_data(tmp_path, small_window):
    src, dst = str(tmp_path / "sparse"), str(tmp_path / "dst.img")
    r = random.Random(7)
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
        for mib in (1, 2, 20, 31):
            f.seek(mib * MiB)
            f.write(r.randbytes(MiB))
    with open(src, "rb") as f:
        try:
            if os.lseek(f.fileno(), 0, os.SEEK_HOLE) >= 32 * MiB:
                pytest.skip("this file system keeps no holes")
        except OSError:
            pytest.skip("no SEEK_HOLE here")
    push(RawSource(src), dst)  # (a first push also reads samples: the space estimate)
    reader = RecordingSource(src)
    push(reader, dst)
    data = [(MiB, 3 * MiB), (20 * MiB, 21 * MiB), (31 * MiB, 32 * MiB)]
    assert covered(reader.hints()) == data
    assert hinted_before_read(reader.events) == []


def test_with_a_map_only_the_changed_ranges_are_hinted(disk, tmp_path, small_window):
    """A map of changed ranges relative to the target's newest generation: only those
    ranges are read, and only those asked for (before, every piece of the file that
    overlapped one was)."""
    path, _data = disk
    dst = str(tmp_path / "dst.img")
    push(RecordingSource(path, changed=[]), dst)  # records the map's base in generation 1
    changed = [(100 * CS + 5, 10), (600 * CS, 3 * CS)]
    with open(path, "r+b") as f:
        f.seek(100 * CS + 5)
        f.write(b"0123456789")
    reader = RecordingSource(path, changed=changed)
    stats = push(reader, dst)
    assert stats.map == "test-map" and stats.chunks_differing == 1
    assert covered(reader.hints()) == [(a, a + n) for a, n in changed]
    # chunks are read whole: each read holds a hinted range
    assert covered(reader.reads()) == [(100 * CS, 101 * CS), (600 * CS, 603 * CS)]
