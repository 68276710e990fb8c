"""The mount's tree and read-range logic over a fake image (no FUSE)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from support import diskbuild
from support.fakeimage import FakeImage

from diskrsync.base.errors import CorruptChunkError
from diskrsync.fsmount.cache import ChunkCache
from diskrsync.fsmount.reader import LONG_SPAN_BYTES, SPAN_BYTES, ChunkReader, SpanBuffer
from diskrsync.fsmount.vfs import (
    ROOT_INODE,
    Changes,
    DirNode,
    FileNode,
    IsADirectory,
    LinkNode,
    MountVFS,
    NoSuchEntry,
    NotADirectory,
    ReadOnly,
    chunk_ranges,
    generation_dir_name,
    load_generation,
)

CHUNK = 64 * 1024
T0 = 1_795_000_000.0  # 2026-11-19T...


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if diskbuild.missing_tools("sgdisk"):
        pytest.skip("needs sgdisk (Debian: gdisk)")
    built = diskbuild.build_pattern_gpt_disk(tmp_path_factory.mktemp("d") / "p.img")
    return built.path.read_bytes()


def sync(vfs: MountVFS, image: FakeImage) -> Changes:
    """What DiskOperations.refresh does, synchronously."""
    infos = image.generations()
    known = vfs.generation_numbers()
    loaded = {i.number: load_generation(image, i.number) for i in infos if i.number not in known}
    return vfs.apply_generations(infos, loaded)


def make(disk: bytes, generations: int = 1) -> tuple[FakeImage, MountVFS]:
    image = FakeImage(CHUNK)
    for n in range(generations):
        image.add_generation(disk, commit_time=T0 + 60 * n)
    vfs = MountVFS(uid=0, gid=0)
    sync(vfs, image)
    return image, vfs


@pytest.mark.pure
def test_chunk_ranges_cover_exactly() -> None:
    rng = random.Random(1)
    for _ in range(500):
        size = rng.randrange(1, 10_000)
        chunk = rng.choice([1, 7, 512, 4096])
        offset, length = rng.randrange(0, size + 10), rng.randrange(0, 5000)
        ranges = chunk_ranges(offset, length, chunk, size)
        covered = [i * chunk + p for i, a, b in ranges for p in range(a, b)]
        assert covered == list(range(offset, min(offset + length, size)))
    assert chunk_ranges(100, 200, 64, 1000) == [(1, 36, 64), (2, 0, 64), (3, 0, 64), (4, 0, 44)]


@pytest.mark.pure
def test_generation_dir_name() -> None:
    image = FakeImage()
    image.add_generation(bytes(10), commit_time=1795698300.0)
    assert generation_dir_name(image.generations()[0]) == "000001-2026-11-26T13-05-00Z"


@pytest.mark.pure
def test_generation_names_sort_and_latest_oldest_links() -> None:
    """From generation 10 on, ``ls`` listed 10-... before 9-...; and there were no links."""
    image = FakeImage(CHUNK)
    vfs = MountVFS(uid=0, gid=0)
    assert sync(vfs, image).invalidate == [] and vfs.generations_dir.children == {}
    for n in range(12):
        image.add_generation(bytes([n]) * CHUNK, commit_time=T0 + 60 * n)
    sync(vfs, image)
    folder = vfs.resolve("/generations")
    assert isinstance(folder, DirNode)
    names = sorted(n for n in folder.children if n[0].isdigit())
    assert [int(n.split("-")[0]) for n in names] == list(range(1, 13))
    assert names == [generation_dir_name(i) for i in image.generations()]

    def link(name: str) -> bytes:
        node = vfs.resolve(f"/generations/{name}")
        assert isinstance(node, LinkNode)
        return vfs.readlink(node.inode)

    assert (link("latest"), link("oldest")) == (names[-1].encode(), names[0].encode())
    old_latest = vfs.resolve("/generations/latest")
    oldest = vfs.resolve("/generations/oldest")
    image.add_generation(b"new" * CHUNK, commit_time=T0 + 3600)
    image.prune(1)
    changes = sync(vfs, image)
    assert link("latest").startswith(b"000013-") and link("oldest").startswith(b"000002-")
    # a link that moves is a new inode, its name invalidated; one that stays is untouched
    assert vfs.resolve("/generations/latest") is not old_latest
    assert (folder.inode, "latest") in changes.invalidate
    assert (folder.inode, "oldest") in changes.invalidate
    assert vfs.readlink(old_latest.inode) == names[-1].encode()  # the old inode still answers
    image.add_generation(b"newer" * CHUNK, commit_time=T0 + 7200)
    oldest = vfs.resolve("/generations/oldest")
    changes = sync(vfs, image)
    assert vfs.resolve("/generations/oldest") is oldest
    assert (folder.inode, "oldest") not in changes.invalidate


@pytest.mark.process
def test_tree_layout(disk: bytes) -> None:
    image, vfs = make(disk, 2)
    assert sorted(vfs.root.children) == ["disk.raw", "generations", "partitions"]
    names = sorted(vfs.resolve("/generations").children)
    assert names == [*(generation_dir_name(i) for i in image.generations()), "latest", "oldest"]
    top = vfs.resolve("/disk.raw")
    assert isinstance(top, FileNode) and top.size == len(disk)
    assert top is vfs.resolve(f"/generations/{names[1]}/disk.raw")  # newest; same inode
    assert vfs.getattr(top.inode).mtime_ns == int((T0 + 60) * 1e9)
    p2 = vfs.resolve("/partitions/p2")
    assert isinstance(p2, FileNode) and (p2.start, p2.size) == (4101 * 512, 1536 * 1024)
    link = vfs.resolve("/partitions/by-partlabel/data")
    assert isinstance(link, LinkNode) and vfs.readlink(link.inode) == b"../p2"
    assert sorted(vfs.resolve("/partitions/by-partlabel").children) == ["data", "root"]
    assert "by-label" not in vfs.resolve("/partitions").children  # no file systems in it
    attr = vfs.getattr(ROOT_INODE)
    assert attr.nlink == 4 and attr.mode & 0o777 == 0o555
    assert vfs.getattr(p2.inode).mode & 0o777 == 0o444


@pytest.mark.process
def test_by_label_holds_file_system_labels_and_by_partlabel_gpt_names(
        tmp_path: Path) -> None:
    """As udev: by-label/ names file systems by their own labels, by-partlabel/ names GPT
    partitions; each in every partitions/ directory, the generations' too."""
    if diskbuild.missing_tools("sgdisk", "mkfs.ext4"):
        pytest.skip("needs sgdisk and mkfs.ext4 (Debian: gdisk, e2fsprogs)")
    built = diskbuild.build_labelled_gpt_disk(tmp_path / "l.img", tmp_path)
    _, vfs = make(built.path.read_bytes())
    gen = next(iter(vfs.resolve("/generations").children))
    for parts in ("/partitions", f"/generations/{gen}/partitions"):
        links = {d: {n: vfs.readlink(c.inode) for n, c in
                     vfs.resolve(f"{parts}/{d}").children.items()}
                 for d in ("by-label", "by-partlabel")}
        assert links == {"by-label": {"ROOTFS": b"../p1", "spare": b"../p2"},
                         "by-partlabel": {"root": b"../p1", "swap": b"../p3"}}


@pytest.mark.process
def test_lookup_errors_and_stable_inodes(disk: bytes) -> None:
    _, vfs = make(disk)
    a = vfs.lookup(ROOT_INODE, "disk.raw")
    assert vfs.lookup(ROOT_INODE, "disk.raw") is a
    with pytest.raises(NoSuchEntry):
        vfs.lookup(ROOT_INODE, "nope")
    with pytest.raises(NotADirectory):
        vfs.lookup(a.inode, "x")
    with pytest.raises(NoSuchEntry):
        vfs.getattr(10_000)
    with pytest.raises(ReadOnly):
        vfs.open(a.inode, write=True)
    with pytest.raises(IsADirectory):
        vfs.open(ROOT_INODE)


@pytest.mark.process
def test_readdir_offsets(disk: bytes) -> None:
    _, vfs = make(disk)
    fh = vfs.opendir(vfs.resolve("/partitions").inode)
    entries = list(vfs.readdir(fh, 0))
    assert [e.name for e in entries] == ["p1", "p2", "by-partlabel"]
    assert [e.next_id for e in entries] == [1, 2, 3]
    assert [e.name for e in vfs.readdir(fh, 2)] == ["by-partlabel"]
    vfs.releasedir(fh)


@pytest.mark.pure
def test_no_table_means_no_partition_files() -> None:
    image = FakeImage(CHUNK)
    image.add_generation(bytes(1024 * 1024))
    vfs = MountVFS()
    sync(vfs, image)
    assert vfs.resolve("/partitions").children == {}


@pytest.mark.process
def test_generations_appear_and_top_moves(disk: bytes) -> None:
    image, vfs = make(disk)
    old_top = vfs.resolve("/disk.raw")
    handle = vfs.open(old_top.inode)
    image.add_generation(disk[::-1], commit_time=T0 + 3600)
    changes = sync(vfs, image)
    assert vfs.generation_numbers() == {1, 2}
    new_top = vfs.resolve("/disk.raw")
    assert new_top is not old_top and vfs.top_generation == 2
    assert (ROOT_INODE, "disk.raw") in changes.invalidate
    assert handle.view.number == 1  # the open file keeps its generation
    assert vfs.getattr(old_top.inode).size == len(disk)  # old inode still answers


@pytest.mark.process
def test_pinned_generation_top(disk: bytes) -> None:
    image = FakeImage(CHUNK)
    image.add_generation(disk)
    image.add_generation(disk)
    vfs = MountVFS(generation=1)
    sync(vfs, image)
    assert vfs.top_generation == 1
    image.add_generation(disk)
    sync(vfs, image)
    assert vfs.top_generation == 1
    image.prune(1)
    sync(vfs, image)
    assert vfs.top_generation == 1  # kept one refresh: it was the top
    sync(vfs, image)
    assert vfs.top_generation is None and "disk.raw" not in vfs.root.children


@pytest.mark.process
def test_pruned_generation_stays_while_open(disk: bytes) -> None:
    image, vfs = make(disk, 2)
    name = generation_dir_name(image.generations()[0])
    node = vfs.resolve(f"/generations/{name}/partitions/p1")
    handle = vfs.open(node.inode)
    assert image.pins(1) == 1
    image.prune(1)
    changes = sync(vfs, image)
    assert changes.dropped == [] and name in vfs.generations_dir.children
    assert image.pins(1) == 1 and vfs.view(1).removed
    with pytest.raises(KeyError):
        vfs.view(3)
    changes = vfs.release(handle.fh)
    assert changes.dropped == [1]
    assert (vfs.generations_dir.inode, name) in changes.invalidate
    assert name not in vfs.generations_dir.children
    assert image.pins(1) == 0
    with pytest.raises(NoSuchEntry):
        vfs.open(node.inode)  # the snapshot is closed
    # A pruned generation nobody has open goes: at the next refresh when it was the top (the
    # kernel may still open names it resolved to it a moment ago), at once otherwise.
    image.prune(2)
    assert sync(vfs, image).dropped == []
    assert vfs.top_generation == 2 and image.pins(2) == 1
    assert sync(vfs, image).dropped == [2]
    assert vfs.generations_dir.children == {} and image.open_snapshots() == 0
    assert vfs.top_generation is None and "disk.raw" not in vfs.root.children


@pytest.mark.process
def test_former_top_is_kept_one_refresh(disk: bytes) -> None:
    image, vfs = make(disk, 2)
    image.add_generation(disk)
    image.prune(1)
    assert sync(vfs, image).dropped == [1]  # not the top: at once
    image.add_generation(disk)
    image.prune(2)
    image.prune(3)
    changes = sync(vfs, image)
    assert changes.dropped == [2]  # 3 was the top until now
    assert vfs.top_generation == 4 and image.pins(3) == 1
    node = vfs.resolve(f"/generations/{generation_dir_name(vfs.view(3).info)}/disk.raw")
    vfs.release(vfs.open(node.inode).fh)  # still opens; its release does not drop it early
    assert image.pins(3) == 1
    assert sync(vfs, image).dropped == [3]
    assert image.pins(3) == 0


@pytest.mark.process
def test_close_unpins_everything(disk: bytes) -> None:
    image, vfs = make(disk, 3)
    assert image.open_snapshots() == 3
    vfs.close()
    assert image.open_snapshots() == 0


@pytest.mark.process
def test_unused_loaded_views_are_closed(disk: bytes) -> None:
    image, vfs = make(disk)
    extra = load_generation(image, 1)  # already in the tree
    vfs.apply_generations(image.generations(), {1: extra})
    assert extra.closed and image.open_snapshots() == 1


# --- reads -------------------------------------------------------------------------------------


async def _read(
    reader: ChunkReader, vfs: MountVFS, path: str, off: int, size: int
) -> bytes | memoryview:
    handle = vfs.open(vfs.resolve(path).inode)
    try:
        return await reader.read(handle, off, size)
    finally:
        vfs.release(handle.fh)


@pytest.mark.process
def test_reads_across_chunk_boundaries(disk: bytes) -> None:
    image, vfs = make(disk)
    reader = ChunkReader(ChunkCache(1 << 20))
    p2 = 4101 * 512
    rng = random.Random(2)

    async def main() -> None:
        for _ in range(200):
            off = rng.randrange(0, 1536 * 1024 + 100)
            size = rng.choice([1, 511, 4096, CHUNK, 3 * CHUNK + 17, 131072])
            got = await _read(reader, vfs, "/partitions/p2", off, size)
            assert got == disk[p2 + off : p2 + min(off + size, 1536 * 1024)]
        whole = await _read(reader, vfs, "/disk.raw", 0, len(disk) + 100)
        assert whole == disk
        assert await _read(reader, vfs, "/disk.raw", len(disk), 10) == b""

    trio.run(main)
    assert image.chunk_reads > 0


@pytest.mark.process
def test_zero_chunks_read_without_io(disk: bytes) -> None:
    image, vfs = make(disk)
    reader = ChunkReader(ChunkCache(1 << 20))
    before = image.chunk_reads
    data = trio.run(_read, reader, vfs, "/disk.raw", 58 * CHUNK, 4 * CHUNK)
    assert data == bytes(4 * CHUNK) and image.chunk_reads == before
    assert reader.stats.zero_chunks == 4


@pytest.mark.process
def test_concurrent_misses_of_one_chunk_fetch_once(disk: bytes) -> None:
    image, vfs = make(disk)
    before = image.chunk_reads  # the partition table was read while loading
    image.read_delay = 0.05
    reader = ChunkReader(ChunkCache(1 << 20))
    results: list[bytes] = []

    async def main() -> None:
        async def one(off: int) -> None:
            results.append(bytes(await _read(reader, vfs, "/partitions/p1", off, 4096)))

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i * 4096)

    trio.run(main)
    assert image.chunk_reads - before == 1 and reader.stats.coalesced == 9
    assert sorted(results) == sorted(disk[(1 << 20) + i * 4096 :][:4096] for i in range(10))


@pytest.mark.process
def test_sequential_reader_gets_read_ahead(disk: bytes) -> None:
    image, vfs = make(disk)
    reader = ChunkReader(ChunkCache(8 << 20), readahead_bytes=4 * CHUNK)
    before = image.chunk_reads
    out = bytearray()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.start_readahead(nursery)
            handle = vfs.open(vfs.resolve("/partitions/p1").inode)
            for off in range(0, 1 << 20, 32 * 1024):
                out.extend(await reader.read(handle, off, 32 * 1024))
                await trio.sleep(0.001)  # let read-ahead threads finish
            vfs.release(handle.fh)

    trio.run(main)
    assert bytes(out) == disk[1 << 20 : 2 << 20]
    assert reader.stats.readahead_started >= 10
    assert image.chunk_reads - before == 16  # each chunk once, mostly by read-ahead
    assert reader.cache.stats().hits >= 16


NONZERO_SPAN_CHUNKS = 4 * SPAN_BYTES // CHUNK - 1


def _span_disk() -> bytes:
    """Five read-ahead spans: data, data, zeros, data with one zero chunk, data."""
    rng = random.Random(5)
    spans = [rng.randbytes(SPAN_BYTES) for _ in range(5)]
    spans[2] = bytes(SPAN_BYTES)
    spans[3] = spans[3][:CHUNK] + bytes(CHUNK) + spans[3][2 * CHUNK :]
    return b"".join(spans)


def _span_mount() -> tuple[bytes, FakeImage, MountVFS, ChunkReader]:
    """``_span_disk`` as the only generation of a mounted image, and a reader with a 16 MiB
    cache."""
    disk = _span_disk()
    image = FakeImage(CHUNK)
    image.add_generation(disk, commit_time=T0)
    vfs = MountVFS(uid=0, gid=0)
    sync(vfs, image)
    return disk, image, vfs, ChunkReader(ChunkCache(16 << 20))


@pytest.mark.process
def test_sequential_requests_are_views_of_read_ahead_spans() -> None:
    """Read-ahead decodes a span of chunks into one buffer, and a request inside it is answered
    with a view of that buffer: no copy on the loop (a join of the request's chunks cost a
    1 MiB copy per request, issue 16). Zeros are a view of one shared block."""
    disk, image, vfs, reader = _span_mount()
    before = image.chunk_reads  # the partition table was looked for
    got: list[bytes | memoryview] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.start_readahead(nursery)
            handle = vfs.open(vfs.resolve("/disk.raw").inode)
            for off in range(0, len(disk), SPAN_BYTES):
                got.append(await reader.read(handle, off, SPAN_BYTES))
            # again, from the cache: the second half of span 3 and the start of span 4
            got.append(await reader.read(handle, 3 * SPAN_BYTES + 4 * CHUNK, 4 * CHUNK))
            got.append(await reader.read(handle, 4 * SPAN_BYTES + CHUNK + 5, 3 * CHUNK))
            vfs.release(handle.fh)

    trio.run(main)
    assert b"".join(got[:5]) == disk
    assert got[5] == disk[3 * SPAN_BYTES + 4 * CHUNK :][: 4 * CHUNK]
    assert got[6] == disk[4 * SPAN_BYTES + CHUNK + 5 :][: 3 * CHUNK]
    # the first request had no read-ahead yet; every later one is a view of a span buffer
    for index in (1, 3, 4, 5, 6):
        data = got[index]
        assert isinstance(data, memoryview) and isinstance(data.obj, SpanBuffer), index
    assert isinstance(got[2], memoryview)  # zeros: of the span, or of the shared block
    assert image.chunk_reads - before == NONZERO_SPAN_CHUNKS  # each once


@pytest.mark.process
def test_a_streaming_reader_gets_long_spans() -> None:
    """After eight sequential requests read-ahead decodes LONG_SPAN_BYTES per worker call (one
    thread hand-off per 4 MiB); requests stay views, each chunk is decoded once."""
    disk = random.Random(6).randbytes(16 * SPAN_BYTES)
    image = FakeImage(CHUNK)
    image.add_generation(disk, commit_time=T0)
    vfs = MountVFS(uid=0, gid=0)
    sync(vfs, image)
    before = image.chunk_reads
    reader = ChunkReader(ChunkCache(32 << 20))
    got: list[bytes | memoryview] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.start_readahead(nursery)
            handle = vfs.open(vfs.resolve("/disk.raw").inode)
            for off in range(0, len(disk), SPAN_BYTES):
                got.append(await reader.read(handle, off, SPAN_BYTES))
            vfs.release(handle.fh)

    trio.run(main)
    assert b"".join(got) == disk
    spans = [g.obj for g in got[1:] if isinstance(g, memoryview)]
    assert len(spans) == len(got) - 1 and all(isinstance(b, SpanBuffer) for b in spans)
    lengths = [len(b) for b in spans]  # type: ignore[arg-type]
    assert lengths[:3] == [SPAN_BYTES] * 3 and lengths[-1] == LONG_SPAN_BYTES
    assert image.chunk_reads - before == len(disk) // CHUNK


@pytest.mark.process
def test_read_ahead_stops_at_the_end_of_a_partition(disk: bytes) -> None:
    """Spans are cut at the end of the file read: reading a partition to its end decodes no
    chunk after it."""
    _, vfs = make(disk)
    node = vfs.resolve("/partitions/p2")  # ends inside a 1 MiB span, data after it
    assert isinstance(node, FileNode) and node.view is not None
    last = (node.start + node.size - 1) // CHUNK
    decoded: list[int] = []
    snapshot = node.view.snapshot
    read_chunk = snapshot.read_chunk

    def recording(index: int) -> bytes:
        decoded.append(index)
        return read_chunk(index)

    snapshot.read_chunk = recording
    reader = ChunkReader(ChunkCache(32 << 20))
    out = bytearray()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.start_readahead(nursery)
            handle = vfs.open(node.inode)
            for off in range(0, node.size, 64 * 1024):
                out.extend(await reader.read(handle, off, 64 * 1024))
            vfs.release(handle.fh)

    trio.run(main)
    assert bytes(out) == disk[node.start : node.start + node.size]
    assert decoded and max(decoded) == last and len(decoded) == len(set(decoded))


@pytest.mark.process
def test_span_claimed_after_a_chunk_was_cached_serves_only_what_it_decoded() -> None:
    """A span whose first chunk a random read decoded before leaves that chunk out (decoded
    once) and is not complete: requests over both are joined, byte for byte right."""
    disk, image, vfs, reader = _span_mount()
    before = image.chunk_reads  # the partition table was looked for
    got: list[bytes | memoryview] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.start_readahead(nursery)
            handle = vfs.open(vfs.resolve("/disk.raw").inode)
            base = SPAN_BYTES
            for off in range(base, base + SPAN_BYTES, 32 * 1024):  # 32 KiB requests
                got.append(await reader.read(handle, off, 32 * 1024))
            got.append(await reader.read(handle, base, SPAN_BYTES))
            vfs.release(handle.fh)

    trio.run(main)
    assert b"".join(bytes(g) for g in got[:-1]) == disk[SPAN_BYTES : 2 * SPAN_BYTES]
    assert got[-1] == disk[SPAN_BYTES : 2 * SPAN_BYTES] and isinstance(got[-1], bytes)
    # read-ahead went on to the end; the first chunk was not decoded again
    assert image.chunk_reads - before == NONZERO_SPAN_CHUNKS - SPAN_BYTES // CHUNK


@pytest.mark.process
def test_read_ahead_over_a_corrupt_chunk(disk: bytes) -> None:
    image, vfs = make(disk)
    image.corrupt_chunk(1, 20)
    reader = ChunkReader(ChunkCache(8 << 20), readahead_bytes=8 * CHUNK)
    failed: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.start_readahead(nursery)
            handle = vfs.open(vfs.resolve("/disk.raw").inode)
            for off in range(16 * CHUNK, 32 * CHUNK, 16 * 1024):
                try:
                    data = await reader.read(handle, off, 16 * 1024)
                except CorruptChunkError as exc:
                    assert exc.chunk == 20
                    failed.append(off // CHUNK)
                else:
                    assert data == disk[off : off + 16 * 1024]

    trio.run(main)
    assert failed == [20] * 4 and reader.stats.readahead_started > 0


@pytest.mark.process
def test_random_reader_gets_no_read_ahead(disk: bytes) -> None:
    _, vfs = make(disk)
    reader = ChunkReader(ChunkCache(8 << 20))
    rng = random.Random(3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader.start_readahead(nursery)
            handle = vfs.open(vfs.resolve("/partitions/p1").inode)
            for index in [0, 8, 3, 12, 6, 15, 1, 10, 4, 13, 7, 2, 11, 5, 14, 9]:
                await reader.read(handle, index * CHUNK + rng.randrange(CHUNK - 4096), 4096)

    trio.run(main)
    assert reader.stats.readahead_started == 0


@pytest.mark.process
def test_image_snapshot_read_matches(disk: bytes, tmp_path: Path) -> None:
    image, _ = make(disk)
    snap = image.snapshot()
    assert snap.read(CHUNK - 3, 10) == disk[CHUNK - 3 : CHUNK + 7]
    snap.close()
    assert isinstance(MountVFS().root, DirNode)


@pytest.mark.pure
def test_readdir_makes_only_the_entries_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel lists a directory a bufferful per call: each call makes only the entries it
    takes, from where it starts, so listing generations/ of N generations is linear in N
    (it made every entry from the first each call: quadratic, issue 16)."""
    image = FakeImage(CHUNK)
    for n in range(60):
        image.add_generation(bytes(CHUNK), commit_time=T0 + 60 * n)
    vfs = MountVFS(uid=0, gid=0)
    sync(vfs, image)
    made = 0
    attributes = vfs.attributes

    def counting(node: Any) -> Any:
        nonlocal made
        made += 1
        return attributes(node)

    monkeypatch.setattr(vfs, "attributes", counting)
    fh = vfs.opendir(vfs.resolve("/generations").inode)
    names, start = [], 0
    while True:  # as the kernel does: 7 entries per call
        batch = list(itertools.islice(vfs.readdir(fh, start), 7))
        if not batch:
            break
        names += [e.name for e in batch]
        start = batch[-1].next_id
    vfs.releasedir(fh)
    assert len(names) == 62 and names[-2:] == ["latest", "oldest"]
    assert made == len(names)
