"""Cost proportional to change: a source that knows which ranges may have changed since the
generation it was last pushed into (``changed_ranges``/``change_base``) reads only those, takes
every other chunk's digest from the target, and falls back to a full scan, saying why, when
the target's newest generation is not the one its map is relative to. Sparse files read only
their data (``SEEK_DATA``)."""

from __future__ import annotations

import json
import os
import random
import threading
from typing import Any

import pytest
from support.pushes import framed_pair, threaded_push

from diskrsync.base.errors import BusyError, PeerError
from diskrsync.cli.main import main
from diskrsync.compression.crypto import MasterKey
from diskrsync.compression.image import Image
from diskrsync.compression.objstore import DirStore
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repository import Repository
from diskrsync.compression.sources import RawSource, space_estimate
from diskrsync.synccore import protocol as p
from diskrsync.synccore.push import (
    PushRequest,
    local_push,
    push_sealed,
    run_target_end,
)
from diskrsync.synccore.source import PushStats, SourceOptions, SourceSession, _map_refused

CS = 16384
CHUNKS = 600  # 5 pages of 128 chunks, the last one short
MiB = 1 << 20
BASE = {"map": "test-map", "bitmap": "b1"}


class MapSource(RawSource):
    """A raw file whose map of changed ranges the test sets; counts the bytes it reads."""

    def __init__(self, path: str, ranges: list[tuple[int, int]] | None,
                 base: dict[str, Any] | None = BASE) -> None:
        super().__init__(path)
        self.ranges = ranges
        self.base = base
        self.bytes_read = 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.bytes_read += length
        return super().read(offset, length)

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        return self.ranges

    def change_base(self) -> dict[str, Any] | None:
        return self.base


def push(reader: RawSource, dst: str, *, framed: bool = False, raw: bool = False) -> PushStats:
    return threaded_push(reader, dst, chunk_size=CS, framed=framed, raw=raw)


def current(path: str) -> bytes:
    with Image.open(path) as img, img.snapshot() as s:
        return s.read(0, s.size)


def newest_meta(path: str) -> dict[str, Any]:
    with Image.open(path) as img:
        return dict(img.generations()[-1].meta)


def disk(seed: int, chunks: int = CHUNKS) -> bytearray:
    r = random.Random(seed)
    return bytearray(b"".join(r.randbytes(CS) if r.random() < 0.7 else bytes(CS)
                              for _ in range(chunks)))


def write_chunks(data: bytearray, chunks: list[int], seed: int) -> list[tuple[int, int]]:
    """Overwrite ``chunks`` with new bytes; the map a dirty bitmap would give (one range per
    chunk, a few bytes into it and not to its end, as a block-sized map would)."""
    r = random.Random(seed)
    for c in chunks:
        data[c * CS + 100 : c * CS + 200] = r.randbytes(100)
    return [(c * CS + 100, 100) for c in chunks]


@pytest.fixture
def first(tmp_path):
    """An image whose generation 1 was pushed with the map's base: (src, dst, data)."""
    src, dst = tmp_path / "src", str(tmp_path / "dst.img")
    data = disk(1)
    src.write_bytes(data)
    reader = MapSource(str(src), [(0, 5)])
    stats = push(reader, dst)
    # the first push has nothing its map is relative to: a full scan, said so
    assert stats.map == "full"
    assert "first push" in stats.map_fallback
    assert any("full scan: test-map not used" in w for w in stats.warnings)
    # a first push also reads the samples of its space estimate (only a first push does)
    sampler = MapSource(str(src), [(0, 5)])
    space_estimate(sampler)
    assert reader.bytes_read == len(data) + sampler.bytes_read
    meta = newest_meta(dst)
    assert meta["change_base"] == BASE and meta["map"] == "full"
    return src, dst, data


@pytest.mark.inproc
@pytest.mark.parametrize("framed", [False, True], ids=["local", "framed"])
def test_a_map_of_changed_ranges_reads_only_those(first, framed):
    src, dst, data = first
    # changes in one page (a partly changed page asks for its leaves) and across two
    changed = [3, 4, 200, 255, 256]
    ranges = write_chunks(data, changed, seed=2)
    src.write_bytes(data)
    reader = MapSource(str(src), ranges)
    stats = push(reader, dst, framed=framed)
    assert stats.warnings == [] and stats.map_fallback == ""
    assert stats.map == "test-map"
    assert reader.bytes_read == stats.bytes_read == len(changed) * CS
    assert stats.chunks_differing == len(changed)
    assert current(dst) == data
    meta = newest_meta(dst)
    assert meta["map"] == "test-map" and meta["change_base"] == BASE
    # an unchanged disk with an empty map reads nothing and commits the same root
    reader = MapSource(str(src), [])
    again = push(reader, dst, framed=framed)
    assert reader.bytes_read == 0 and again.chunks_differing == 0
    assert again.root_hash == stats.root_hash
    assert current(dst) == data


@pytest.mark.inproc
def test_a_grown_disk_reads_its_new_space_whatever_the_map(first):
    src, dst, data = first
    data += disk(9, 130)  # a new page and a bit
    ranges = write_chunks(data, [7], seed=3)
    src.write_bytes(data)
    reader = MapSource(str(src), ranges)
    stats = push(reader, dst)
    assert stats.map == "test-map"
    assert reader.bytes_read == CS + 130 * CS
    assert current(dst) == data


@pytest.mark.inproc
def test_a_lying_map_is_trusted_and_a_full_scan_repairs_it(first):
    """The map is trusted, as documented: a change outside it is not seen by that push (no
    check can catch it without reading); the next full scan stores it."""
    src, dst, data = first
    write_chunks(data, [10], seed=4)
    ranges = write_chunks(data, [20], seed=5)
    src.write_bytes(data)
    stats = push(MapSource(str(src), ranges), dst)
    assert stats.warnings == [] and stats.chunks_differing == 1
    held = current(dst)
    assert held[20 * CS : 21 * CS] == data[20 * CS : 21 * CS]
    assert held[10 * CS : 11 * CS] != data[10 * CS : 11 * CS]  # missed, as the map said
    full = push(RawSource(str(src)), dst)  # no map: reads everything
    assert full.map == "full" and full.chunks_differing == 1
    assert current(dst) == data


@pytest.mark.inproc
@pytest.mark.parametrize("framed", [False, True], ids=["local", "framed"])
def test_a_stale_base_falls_back_to_a_full_scan_loudly(first, framed):
    src, dst, data = first
    ranges = write_chunks(data, [30], seed=6)
    write_chunks(data, [40], seed=7)  # outside the map: a full scan must find it
    src.write_bytes(data)
    other = {"map": "test-map", "bitmap": "b2"}
    reader = MapSource(str(src), ranges, base=other)
    stats = push(reader, dst, framed=framed)
    assert stats.map == "full" and "another map" in stats.map_fallback
    assert any("full scan" in w and "b1" in w for w in stats.warnings)
    assert stats.bytes_read == len(data)  # (and the two differing chunks read again to send)
    assert reader.bytes_read == len(data) + 2 * CS
    assert current(dst) == data
    meta = newest_meta(dst)
    assert meta["change_base"] == other and "another map" in meta["map_fallback"]
    # a push without a map in between (of a change: an unchanged push makes no generation,
    # and the newest one's base then stays true): the newest generation says nothing of it
    write_chunks(data, [50], seed=8)
    src.write_bytes(data)
    push(RawSource(str(src)), dst)
    reader = MapSource(str(src), [], base=other)
    stats = push(reader, dst, framed=framed)
    assert "was not pushed with this map" in stats.map_fallback
    assert reader.bytes_read == len(data)


@pytest.mark.inproc
def test_a_push_resuming_a_checkpoint_does_not_trust_the_map(first):
    """The checkpoint an interrupted push left may hold chunks of another source: its
    digests are not the generation's the map is relative to, so a full scan, said so."""
    src, dst, data = first
    with Image.open(dst) as img:  # an interrupted push of another disk got as far as this
        tx = img.begin()
        tx.write_chunk(500, random.Random(21).randbytes(CS))
        tx.checkpoint()
        tx.abort()
    ranges = write_chunks(data, [5], seed=22)
    src.write_bytes(data)
    reader = MapSource(str(src), ranges)
    stats = push(reader, dst)
    assert "checkpoint" in stats.map_fallback and stats.map == "full"
    assert stats.bytes_read == len(data)
    assert current(dst) == data


@pytest.mark.inproc
def test_a_raw_target_or_a_source_without_a_base_scans_everything(tmp_path):
    src, dst = tmp_path / "src", str(tmp_path / "dst.raw")
    data = disk(11, 40)
    src.write_bytes(data)
    push(RawSource(str(src)), dst, raw=True)
    reader = MapSource(str(src), [])
    stats = push(reader, dst, raw=True)
    assert "raw file" in stats.map_fallback and reader.bytes_read == len(data)
    reader = MapSource(str(src), [], base=None)
    stats = push(reader, dst, raw=True)
    assert "does not say" in stats.map_fallback and reader.bytes_read == len(data)


@pytest.mark.pure
def test_map_refusals_name_the_reason():
    base = {"map": "m", "x": 1}
    ok = {"kind": "image", "generation": 3, "change_base": base}
    assert _map_refused(ok, base) == ""
    assert "older diskrsync" in _map_refused({"kind": "image"}, base)
    assert "first push" in _map_refused({**ok, "generation": 0}, base)
    assert "checkpoint" in _map_refused({**ok, "resumed": True}, base)
    assert "generation 3 was pushed with another map" in _map_refused(ok, {"map": "m"})
    assert "raw file" in _map_refused({"kind": "raw"}, base)


# -- sparse files ----------------------------------------------------------------------------


class CountingSource(RawSource):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.bytes_read = 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.bytes_read += length
        return super().read(offset, length)


def _has_holes(path: str) -> bool:
    with open(path, "rb") as f:
        try:
            return os.lseek(f.fileno(), 0, os.SEEK_HOLE) < os.fstat(f.fileno()).st_size
        except OSError:
            return False


@pytest.mark.inproc
def test_a_sparse_file_reads_only_its_data(tmp_path):
    """A 64 MiB file with 5 MiB allocated reads 5 MiB; holes are zero chunks."""
    src, dst = str(tmp_path / "sparse"), str(tmp_path / "dst.img")
    r = random.Random(12)
    blocks = {1: r.randbytes(MiB), 7: r.randbytes(MiB), 8: r.randbytes(MiB),
              40: r.randbytes(MiB), 63: r.randbytes(MiB)}
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        for i, blob in blocks.items():
            f.seek(i * MiB)
            f.write(blob)
    if not _has_holes(src):
        pytest.skip("this file system keeps no holes")
    expect = bytearray(64 * MiB)
    for i, blob in blocks.items():
        expect[i * MiB : (i + 1) * MiB] = blob
    reader = CountingSource(src)
    assert list(reader.extents()) == [(MiB, MiB), (7 * MiB, 2 * MiB), (40 * MiB, MiB),
                                      (63 * MiB, MiB)]
    stats = local_push(src, dst, PushRequest(source=SourceOptions(chunk_size=CS)))
    assert stats.bytes_read == 5 * MiB and stats.map == "sparse"
    assert current(dst) == expect
    assert newest_meta(dst)["map"] == "sparse"
    stats = push(reader, dst)
    assert reader.bytes_read == 5 * MiB  # counted at the reader: no hole was read
    # data written into a hole is found; a hole punched into data reads as zeros
    with open(src, "r+b") as f:
        f.seek(20 * MiB + 5)
        f.write(b"new")
    expect[20 * MiB + 5 : 20 * MiB + 8] = b"new"
    stats = local_push(src, dst, PushRequest(source=SourceOptions(chunk_size=CS)))
    assert stats.chunks_differing == 1
    assert current(dst) == expect


@pytest.mark.inproc
def test_a_file_that_is_all_hole_reads_nothing(tmp_path):
    src, dst = tmp_path / "hole", str(tmp_path / "dst.img")
    with open(src, "wb") as f:
        f.truncate(8 * MiB + 5)
    if not _has_holes(str(src)):
        pytest.skip("this file system keeps no holes")
    reader = CountingSource(str(src))
    assert list(reader.extents()) == []
    stats = push(reader, dst)
    assert reader.bytes_read == 0 and stats.zero_chunks == stats.chunks
    assert current(dst) == bytes(8 * MiB + 5)


def _decoded(msg: p.Message) -> p.Message | None:
    d = p.Decoder()
    d.feed(p.preamble() + p.encode(msg))
    return d.next()


@pytest.mark.pure
def test_the_new_hello_and_done_fields_are_checked():
    """A target's generation and change_base, and a Done's map fields, are validated like
    every other number and shape a peer sends (a wrong type is one PeerError)."""
    good: dict[str, Any] = {"hash": p.HASH, "caps": [], "generation": 3,
                            "change_base": {"map": "m"}}
    hello = p.Hello("target", 0, CS, 128, "t", good)
    assert _decoded(hello) == hello
    bad: dict[str, Any]
    for bad in ({"generation": "3"}, {"generation": -1}, {"generation": True},
                {"change_base": ["m"]}):
        with pytest.raises(PeerError, match="malformed"):
            _decoded(p.Hello("target", 0, CS, 128, "t", {**good, **bad}))
    done = p.Done(bytes(32), {"map": "sparse", "map_fallback": "", "change_base": None})
    assert _decoded(done) == done
    for bad in ({"map": 1}, {"map_fallback": []}, {"change_base": "x"}):
        with pytest.raises(PeerError, match="malformed"):
            _decoded(p.Done(bytes(32), bad))


@pytest.mark.inproc
def test_push_json_says_which_map_was_used(tmp_path, capsys):
    src, dst = tmp_path / "sparse", tmp_path / "dst.img"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(random.Random(30).randbytes(MiB))
    if not _has_holes(str(src)):
        pytest.skip("this file system keeps no holes")
    assert main(["push", "--json", str(src), str(dst)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["map"] == "sparse" and out["map_fallback"] == "" and out["bytes_read"] == MiB
    assert main(["push", "--json", "--skip-free-blocks", str(src), str(dst)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["map"] == "sparse"
    assert "--skip-free-blocks: no ext2/3/4 or xfs file system found" in out["warnings"][0]
    assert "warning: --skip-free-blocks: no ext2/3/4" in captured.err


@pytest.mark.inproc
def test_a_pull_reports_the_remote_sources_map_and_its_warnings(first):
    """Where this machine is the target (a pull), what the far source said of its map comes
    in its Done: the summary and --json show it, named by the host."""
    src, dst, _data = first
    reader = MapSource(str(src), [], base={"map": "test-map", "bitmap": "other"})
    with framed_pair() as (a, b):
        t = threading.Thread(target=lambda: SourceSession(a, reader,
                                                          SourceOptions(chunk_size=CS)).run())
        t.start()
        try:
            stats = run_target_end(b, dst, PushRequest(), pulled_from="web1")
        finally:
            t.join(60)
            reader.close()
    assert stats.map == "full" and "another map" in stats.map_fallback
    assert any(w.startswith("web1: full scan: test-map not used") for w in stats.warnings)
    assert "another map" in newest_meta(dst)["map_warnings"][0]


# -- an encrypted repository: the client reads its source itself ---------------------------


@pytest.mark.inproc
def test_encrypted_repository_pushes_read_only_what_the_map_names(tmp_path) -> None:
    """A push into an encrypted repository reads its source on this end (the sync
    protocol's source cannot make its keyed ids) and plans that reading as the protocol's
    scan does: with a map relative to the newest generation (recorded in its sealed
    manifest) only the changed chunks are read; another map, a changed size or a first push
    is a full read, said why. (It read the whole source every time.)"""
    (tmp_path / "repo").mkdir()
    key = MasterKey.generate()
    repo = Repository.init(DirStore(str(tmp_path / "repo")), chunk_size=CS, key=key)
    src = tmp_path / "src"
    data = disk(3)
    src.write_bytes(data)
    req = PushRequest()

    def sealed(reader: MapSource) -> PushStats:
        try:
            return push_sealed(reader, repo, "vm", req, None)
        finally:
            reader.close()

    def stored() -> bytes:
        snap = repo.snapshot("vm")
        return snap.read(0, snap.size)

    first = sealed(MapSource(str(src), [(0, 5)]))
    assert first.map == "full" and "first push" in first.map_fallback
    assert first.bytes_read == len(data)
    changes = write_chunks(data, [3, 250, 599], seed=4)
    src.write_bytes(data)
    second = sealed(MapSource(str(src), changes))
    assert second.map == "test-map" and second.map_fallback == ""
    assert second.bytes_read == 3 * CS and second.generation == 2
    assert stored() == bytes(data)
    assert repo.manifest(repo.generations("vm")[-1]).meta["change_base"] == BASE
    # a map relative to something else: everything is read, and the result is still right
    write_chunks(data, [7], seed=5)
    src.write_bytes(data)
    other = sealed(MapSource(str(src), [], base={"map": "test-map", "bitmap": "b2"}))
    assert other.bytes_read == len(data) and "another map" in other.map_fallback
    assert any("full scan" in w for w in other.warnings)
    assert stored() == bytes(data)
    # the disk grew: its map cannot say what the new end holds
    grown = data + bytearray(os.urandom(CS))
    src.write_bytes(grown)
    resized = sealed(MapSource(str(src), [], base={"map": "test-map", "bitmap": "b2"}))
    assert resized.bytes_read == len(grown) and "size changed" in resized.map_fallback
    assert stored() == bytes(grown)


@pytest.mark.inproc
def test_encrypted_repository_pushes_skip_the_holes_of_sparse_files(tmp_path) -> None:
    (tmp_path / "repo").mkdir()
    repo = Repository.init(DirStore(str(tmp_path / "repo")), chunk_size=CS,
                           key=MasterKey.generate())
    src = tmp_path / "sparse"
    payload = os.urandom(3 * CS)
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(40 * MiB)
        f.write(payload)
    reader = MapSource(str(src), None, base=None)
    try:
        stats = push_sealed(reader, repo, "vm", PushRequest(), None)
    finally:
        reader.close()
    assert stats.map == "sparse" and stats.bytes_read < 4 * MiB, stats.bytes_read
    snap = repo.snapshot("vm")
    assert snap.read(40 * MiB, len(payload)) == payload
    assert snap.read(0, MiB) == bytes(MiB)


@pytest.mark.inproc
def test_an_encrypted_repository_push_keeps_no_chunk_of_a_generation_it_did_not_plan_with(
        tmp_path) -> None:
    """The push plans its reads against the newest generation it saw, then takes the
    writer's lock: a generation another client commits in between is not what the map is
    relative to, so keeping its chunks would mix two disks. The push stops, writing
    nothing, and the next one is right. (It committed the other client's chunks as this
    disk's unchanged ones.)"""
    (tmp_path / "repo").mkdir()
    repo = Repository.init(DirStore(str(tmp_path / "repo")), chunk_size=CS,
                           key=MasterKey.generate())
    src = tmp_path / "src"
    data = disk(8, 64)
    src.write_bytes(data)
    reader = MapSource(str(src), None)
    try:
        push_sealed(reader, repo, "vm", PushRequest(), None)
    finally:
        reader.close()
    other = bytes(disk(9, 64))
    changes = write_chunks(data, [3], seed=10)
    src.write_bytes(data)

    class Raced(MapSource):
        def changed_ranges(self) -> list[tuple[int, int]] | None:
            # another client's push of this disk commits while this one plans
            write_disk(repo, "vm", lambda o, n: other[o : o + n], len(other))
            return super().changed_ranges()

    raced = Raced(str(src), changes)
    try:
        with pytest.raises(BusyError, match="another push"):
            push_sealed(raced, repo, "vm", PushRequest(), None)
    finally:
        raced.close()
    snap = repo.snapshot("vm")
    assert repo.generations("vm")[-1].number == 2 and snap.read(0, snap.size) == other
    again = MapSource(str(src), changes)
    try:
        stats = push_sealed(again, repo, "vm", PushRequest(), None)
    finally:
        again.close()
    assert "not pushed with this map" in stats.map_fallback
    snap = repo.snapshot("vm")
    assert snap.read(0, snap.size) == bytes(data)


@pytest.mark.inproc
def test_an_encrypted_repository_push_whose_disk_resized_says_its_map_was_not_used(
        tmp_path) -> None:
    """A map refused because the disk's size changed is not named as what narrowed the
    reading, in the push's report nor in the generation's record. (Both said "test-map"
    for a full read.)"""
    (tmp_path / "repo").mkdir()
    repo = Repository.init(DirStore(str(tmp_path / "repo")), chunk_size=CS,
                           key=MasterKey.generate())
    src = tmp_path / "src"
    data = disk(11, 40)
    for tail in (b"", os.urandom(CS + 1)):  # then the disk grows by a chunk and a byte
        src.write_bytes(bytes(data) + tail)
        reader = MapSource(str(src), [(0, 1)])
        try:
            stats = push_sealed(reader, repo, "vm", PushRequest(), None)
        finally:
            reader.close()
    assert "size changed" in stats.map_fallback and stats.map == "full", stats.map
    assert any(w.startswith("full scan: test-map not used") for w in stats.warnings)
    newest = repo.manifest(repo.generations("vm")[-1])
    assert newest.meta["map"] == "full" and newest.size == len(data) + CS + 1
    snap = repo.snapshot("vm")
    assert snap.read(0, snap.size) == src.read_bytes()
