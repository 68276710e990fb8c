"""The seams later features plug into: the chunk codec, the image's chunk store and the source
reader, each exercised through its interface with today's implementation (and, for the
codec, a stand-in that binds a chunk to its place the way an AEAD codec will)."""

from __future__ import annotations

import os
import random
from contextlib import closing

import pytest

from diskrsync.base.errors import CorruptChunkError, DataError
from diskrsync.base.merkle import leaf_hash, zero_hash
from diskrsync.compression import maintenance
from diskrsync.compression.codec import STANDARD, ChunkAt, Kind
from diskrsync.compression.format import DATA_START
from diskrsync.compression.image import FileStore, Image
from diskrsync.compression.importer import write_new_image
from diskrsync.compression.sources import RawSource, SnapshotSource, open_source

CS = 16384


class PlacedCodec:
    """The standard codec with the chunk index in front of every stored form, checked on
    decode: the stand-in for an AEAD whose associated data is the chunk's position."""

    name = "test-placed"

    def __init__(self) -> None:
        self.encoded: list[int] = []

    def encode(self, data: bytes | bytearray | memoryview, at: ChunkAt) -> tuple[Kind, bytes]:
        self.encoded.append(at.index)
        kind, stored = STANDARD.encode(data, at)
        return kind, at.index.to_bytes(8, "little") + stored

    def decode(self, kind: Kind | int, stored: bytes, length: int, at: ChunkAt) -> bytes:
        if int.from_bytes(stored[:8], "little") != at.index:
            raise ValueError(f"stored for another place than chunk {at.index}")
        return STANDARD.decode(kind, stored[8:], length, at)

    def leaf_hash(self, data: bytes | bytearray | memoryview, index: int = 0) -> bytes:
        return leaf_hash(b"key" + bytes(data))  # a keyed hash stands apart from the plain one

    def zero_hash(self, length: int) -> bytes:
        return self.leaf_hash(bytes(length))


def _disk(chunks: int, zero: set[int], seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    return b"".join(bytes(CS) if c in zero else rnd.randbytes(CS // 2) * 2 for c in range(chunks))


# -- the chunk codec --------------------------------------------------------------------


@pytest.mark.pure
def test_standard_codec_is_zstd_or_raw_with_plain_blake3():
    text, noise = b"abc" * (CS // 3) + b"a", random.Random(2).randbytes(CS)
    kind, stored = STANDARD.encode(text, ChunkAt(0))
    assert kind == Kind.ZSTD and len(stored) < CS
    assert STANDARD.decode(kind, stored, CS, ChunkAt(0)) == text
    assert STANDARD.encode(noise, ChunkAt(1)) == (Kind.RAW, noise)
    assert STANDARD.leaf_hash(text) == leaf_hash(text)
    assert STANDARD.zero_hash(CS) == zero_hash(CS) == leaf_hash(bytes(CS))
    with pytest.raises(ValueError):
        STANDARD.decode(kind, stored, CS - 1, ChunkAt(0))


@pytest.mark.inproc
def test_image_stores_reads_and_verifies_through_its_codec(tmp_path):
    codec = PlacedCodec()
    data = _disk(6, {2})
    path = str(tmp_path / "a.img")
    info = write_new_image(lambda o, n: data[o : o + n], len(data), path, chunk_size=CS,
                           codec=codec)
    assert sorted(codec.encoded) == [0, 1, 3, 4, 5]  # a zero chunk never reaches a codec
    with Image.open(path, codec=codec) as img:
        with img.snapshot() as snap:
            assert snap.read(0, len(data)) == data
            assert snap.tree.entry(1).hash == codec.leaf_hash(data[CS : 2 * CS])
            assert snap.tree.entry(2).hash == codec.zero_hash(CS)
        assert maintenance.verify(img).ok
        tx = img.begin()
        tx.write_chunk(4, data[:CS])  # through the transaction: bound to its own place
        tx.commit()
        img.refresh()
        with img.snapshot() as snap:
            assert snap.read_chunk(4) == data[:CS]
    # the plain codec cannot read it: the digests differ and the stored form is not zstd/raw
    with Image.open(path) as img, img.snapshot(info.number) as snap, \
            pytest.raises(CorruptChunkError):
        snap.read_chunk(0)


@pytest.mark.inproc
def test_a_chunk_stored_for_one_place_does_not_read_at_another(tmp_path):
    codec = PlacedCodec()
    data = _disk(3, set())
    path = str(tmp_path / "a.img")
    write_new_image(lambda o, n: data[o : o + n], len(data), path, chunk_size=CS, codec=codec)
    with Image.open(path, codec=codec) as img:
        with img.snapshot() as snap:
            kind, stored = snap.read_stored(0)
        tx = img.begin()
        # what a storage host could try: chunk 0's stored bytes put where chunk 2 belongs
        tx.put_chunk(2, kind, stored, codec.leaf_hash(data[:CS]), CS)
        tx.commit()
        img.refresh()
        with img.snapshot() as snap, pytest.raises(CorruptChunkError) as err:
            snap.read_chunk(2)
        assert err.value.chunk == 2


# -- the chunk store --------------------------------------------------------------------


@pytest.mark.inproc
def test_file_store_writes_into_free_space_and_gives_back_what_nothing_references(tmp_path):
    path = tmp_path / "store"
    path.write_bytes(bytes(DATA_START))
    store = FileStore(os.open(path, os.O_RDWR), str(path))
    try:
        store.open_space([])
        a = store.write(b"A" * 5000, "chunk 0")
        b = store.write(b"B" * 300, "table", align=4096)
        assert a == (DATA_START, 5000) and b[0] % 4096 == 0 and b[1] == 300
        assert store.read(*a, "chunk 0") == b"A" * 5000
        store.release(*a)
        assert store.write(b"C" * 5000, "chunk 1") == a  # released space is reused
        store.sync()
        store.settle()  # all referenced: nothing to give back
        store.give_back()
        end = store.space()[1]
        assert end == b[0] + 300
        c = store.write(b"D" * 9000, "chunk 2")
        assert c[0] >= end and store.space()[1] == c[0] + 9000
        store.give_back()  # written since the last settle: referenced by nothing, cut off
        assert store.space()[1] <= c[0]
        with pytest.raises(DataError, match="cut short"):
            store.read(c[0], c[1], "chunk 2")
    finally:
        store.close()


@pytest.mark.inproc
def test_snapshot_and_transaction_do_their_io_through_the_store(tmp_path):
    data = _disk(4, {1})
    path = str(tmp_path / "a.img")
    write_new_image(lambda o, n: data[o : o + n], len(data), path, chunk_size=CS)
    with Image.open(path) as img:
        with img.snapshot() as snap:
            reads: list[str] = []
            real = snap.store.read

            def counted(offset: int, length: int, what: str) -> bytes:
                reads.append(what)
                return real(offset, length, what)

            snap.store.read = counted
            assert snap.read(0, len(data)) == data
        assert [w for w in reads if w.startswith("chunk")] == ["chunk 0", "chunk 2", "chunk 3"]
        assert any(w.startswith("index page") for w in reads)
        tx = img.begin()
        written: list[str] = []
        real_write = tx._store.write

        def logged(blob: bytes, what: str, *, align: int = 0) -> tuple[int, int]:
            written.append(what)
            return real_write(blob, what, align=align)

        tx._store.write = logged
        tx.write_chunk(1, data[:CS])
        tx.commit()
        assert written == ["chunk 1", "index page", "generation table", "generation table"]


# -- the source reader ------------------------------------------------------------------


@pytest.mark.inproc
def test_raw_source_extents_are_the_whole_disk(tmp_path):
    path = tmp_path / "disk"
    path.write_bytes(_disk(3, {1}) + b"tail")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with closing(RawSource(str(path))) as src:
        assert list(src.extents()) == [(0, 3 * CS + 4)]
    with closing(RawSource(str(empty))) as src:
        assert list(src.extents()) == []


@pytest.mark.inproc
def test_image_source_extents_are_its_stored_chunks(tmp_path):
    zero = {0, 3, 4, 7}
    data = _disk(9, zero) + b"short"  # chunk 9 is short and not zero
    path = str(tmp_path / "a.img")
    write_new_image(lambda o, n: data[o : o + n], len(data), path, chunk_size=CS)
    with closing(open_source(path)) as src:
        assert isinstance(src, SnapshotSource) and src.codec is STANDARD
        extents = list(src.extents())
        assert extents == [(CS, 2 * CS), (5 * CS, 2 * CS), (8 * CS, CS + 5)]
        # outside the extents everything reads as zero
        covered = bytearray(len(data))
        for off, n in extents:
            covered[off : off + n] = src.read(off, n)
        assert bytes(covered) == data

