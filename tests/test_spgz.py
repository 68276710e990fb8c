"""Tests for the read-only SPGZ0001 reader against the Go tools' vectors and crafted files."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import runpy
import shutil
import stat
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.paths import VECTORS

from diskrsync.base.errors import CorruptChunkError, DataError, DiskrsyncError, UsageError
from diskrsync.compression import spgz as spgz_mod
from diskrsync.compression.api import DiskImage, DiskSnapshot
from diskrsync.compression.spgz import MAGIC, SpgzImage, SpgzSnapshot, is_spgz

BS = 131071  # block size of every vector (header field 32)
SLOT = BS + 1
HDR = 4096

# sha256 of each input, from the vectors' README: guards against a drifting inputs.py.
INPUT_SHA256 = {
    "mixed_1m": "441b8ff94f49dd803336f363030319823af25778b371dd55bbdde99c38756893",
    "holes_3m": "61d973f50be8332b8ffbe0d21bc4e5237fac7effd8c0f0e8d835fe16b5ee335f",
    "empty": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "unaligned": "29b20e8e18afeaa3c4ac54978869fdd54d1433a188cfd8614abbd251ca9fced0",
    "small_256k": "1e1c7ae334e2dacfe0f2f3561147dfd4b31685b6ece86ca630f458b9b48c2189",
}
VECTOR_INPUT = {
    "a_mixed_1m.spgzc.spgz": "mixed_1m",
    "a_mixed_1m.diskrsync.spgz": "mixed_1m",
    "a_holes_3m.diskrsync.spgz": "holes_3m",
    "a_empty.spgzc.spgz": "empty",
    "a_empty.diskrsync.spgz": "empty",
    "a_unaligned.spgz": "unaligned",
    "a_small_256k.diskrsync.spgz": "small_256k",
}

pytestmark = [pytest.mark.inproc,
              pytest.mark.skipif(not VECTORS.is_dir(), reason="needs /work/shared/vectors")]


@pytest.fixture(scope="module")
def inputs() -> dict[str, bytes]:
    """The raw inputs, rebuilt from the vectors' recipe and checked against the README."""
    built: dict[str, bytes] = runpy.run_path(str(VECTORS / "inputs.py"))["INPUTS"]
    for name, digest in INPUT_SHA256.items():
        assert hashlib.sha256(built[name]).hexdigest() == digest, name
    return built


def slot_at(index: int) -> int:
    return HDR + index * SLOT


def copy_vector(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copyfile(VECTORS / name, dst)
    dst.chmod(0o644)
    return dst


def gzip_stream_end(path: Path, index: int) -> int:
    """File offset just past the gzip member stored in slot ``index`` (its trailer's end)."""
    raw = path.read_bytes()[slot_at(index) : slot_at(index) + SLOT]
    assert raw[0] == 1, "test expects a gzip slot"
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    d.decompress(raw[1:])
    assert d.eof
    return slot_at(index) + SLOT - len(d.unused_data)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def build_spgz(
    path: Path,
    field: int,
    blocks: list[tuple[str, bytes]],
    last: tuple[str, bytes] | None = None,
) -> bytes:
    """Write an SPGZ0001 file the way the Go library lays it out; return its logical content.

    ``blocks`` fill full slots: ("raw", bs bytes), ("gzip", up to bs bytes, zero-padded on
    read), ("hole", ignored). ``last`` is a partial final slot: ("raw"|"gzip", data).
    """
    bs = field * 4096 - 1
    expected = bytearray()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", field))
        f.truncate(HDR)
        for i, (kind, data) in enumerate(blocks):
            f.seek(HDR + i * (bs + 1))
            if kind == "raw":
                assert len(data) == bs
                f.write(b"\0" + data)
            elif kind == "gzip":
                f.write(b"\1" + gzip.compress(data))
            else:
                data = b""
            expected += data + bytes(bs - len(data))
        f.truncate(HDR + len(blocks) * (bs + 1))
        if last is not None:
            kind, data = last
            f.seek(HDR + len(blocks) * (bs + 1))
            f.write((b"\0" + data) if kind == "raw" else (b"\1" + gzip.compress(data)))
            expected += data
    return bytes(expected)


def open_snap(path: Path | str) -> tuple[SpgzImage, SpgzSnapshot]:
    img = SpgzImage.open(str(path))
    return img, img.snapshot()


def assert_one_line(err: DiskrsyncError, path: Path | str) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert str(path) in msg


# --- the Go vectors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VECTOR_INPUT))
def test_vector_decompresses_to_input(name: str, inputs: dict[str, bytes]) -> None:
    raw = inputs[VECTOR_INPUT[name]]
    with SpgzImage.open(str(VECTORS / name)) as img, img.snapshot() as snap:
        assert snap.size == len(raw)
        assert snap.chunk_size == BS
        assert snap.chunk_count == -(-len(raw) // BS)
        data = snap.read(0, snap.size + 10)
        assert hashlib.sha256(data).hexdigest() == INPUT_SHA256[VECTOR_INPUT[name]]
        assert data == raw
        chunks = [snap.read_chunk(i) for i in range(snap.chunk_count)]
        assert all(len(c) == BS for c in chunks[:-1])
        assert b"".join(chunks) == raw
        assert img.verify() == []
        assert snap.verify() == []


@pytest.mark.parametrize("name", sorted(VECTOR_INPUT))
def test_vector_generation_info(name: str, inputs: dict[str, bytes]) -> None:
    path = VECTORS / name
    with SpgzImage.open(str(path)) as img:
        gens = img.generations()
        assert len(gens) == 1
        g = gens[0]
        assert g.number == 1
        assert g.size == len(inputs[VECTOR_INPUT[name]])
        assert g.commit_time == path.stat().st_mtime
        assert g.root_hash == b""
        assert g.source == "SPGZ0001 file"
        with img.snapshot() as s1, img.snapshot(1) as s2:
            assert s1.info == g
            assert s2.info == g


def test_protocol_conformance() -> None:
    img: DiskImage = SpgzImage.open(str(VECTORS / "a_unaligned.spgz"))
    snap: DiskSnapshot = img.snapshot()
    assert snap.size == 1060921
    snap.close()
    img.close()


@pytest.mark.parametrize(
    "name", ["a_unaligned.spgz", "a_holes_3m.diskrsync.spgz", "a_mixed_1m.spgzc.spgz"]
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_reads_match_input(name: str, inputs: dict[str, bytes], data: Any) -> None:
    raw = inputs[VECTOR_INPUT[name]]
    offset = data.draw(
        st.one_of(
            st.integers(0, len(raw) + 5000),
            # near block boundaries, where off-by-one bugs live
            st.builds(lambda b, d: max(0, b * BS + d), st.integers(0, 25), st.integers(-3, 3)),
        ),
        label="offset",
    )
    length = data.draw(st.integers(0, 3 * BS), label="length")
    with SpgzImage.open(str(VECTORS / name)) as img, img.snapshot() as snap:
        assert snap.read(offset, length) == raw[offset : offset + length]


def test_chunk_is_zero_on_holes(inputs: dict[str, bytes]) -> None:
    raw = inputs["holes_3m"]
    expected = [raw[i : i + BS].count(0) == len(raw[i : i + BS]) for i in range(0, len(raw), BS)]
    assert True in expected and False in expected
    vec = VECTORS / "a_holes_3m.diskrsync.spgz"
    assert vec.stat().st_blocks * 512 < vec.stat().st_size, "vector should be sparse"
    with SpgzImage.open(str(vec)) as img, img.snapshot() as s:
        assert [s.chunk_is_zero(i) for i in range(s.chunk_count)] == expected


def test_chunk_is_zero_without_holes(inputs: dict[str, bytes], tmp_path: Path) -> None:
    """A copy that lost its sparseness (zeros written as data) still reports zero blocks."""
    dense = tmp_path / "dense.spgz"
    dense.write_bytes((VECTORS / "a_holes_3m.diskrsync.spgz").read_bytes())
    assert dense.stat().st_blocks * 512 >= dense.stat().st_size, "copy should have no holes"
    raw = inputs["holes_3m"]
    expected = [raw[i : i + BS].count(0) == len(raw[i : i + BS]) for i in range(0, len(raw), BS)]
    with SpgzImage.open(str(dense)) as img, img.snapshot() as s:
        assert [s.chunk_is_zero(i) for i in range(s.chunk_count)] == expected


def test_chunk_is_zero_never_inflates(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> bytes:
        raise AssertionError("chunk_is_zero inflated a block")

    with SpgzImage.open(str(VECTORS / "a_mixed_1m.spgzc.spgz")) as img, img.snapshot() as s:
        monkeypatch.setattr(spgz_mod, "_inflate", boom)
        assert [s.chunk_is_zero(i) for i in range(s.chunk_count)] == [
            False, False, False, True, False, False, False, False, False,
        ]  # fmt: skip
        with pytest.raises(AssertionError):
            s.read_chunk(4)  # proves the patch is live: gzip block 4 does inflate


def test_concurrent_reads(inputs: dict[str, bytes]) -> None:
    raw = inputs["holes_3m"]
    with SpgzImage.open(str(VECTORS / "a_holes_3m.diskrsync.spgz")) as img, img.snapshot() as s:
        order = list(range(s.chunk_count)) * 4
        random.Random(1).shuffle(order)
        with ThreadPoolExecutor(max_workers=8) as pool:
            got = list(pool.map(s.read_chunk, order))
        for i, chunk in zip(order, got, strict=True):
            assert chunk == raw[i * BS : (i + 1) * BS]


# --- damaged files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda p: slot_at(1) + 1 + 2000, id="deflate-data"),
        pytest.param(lambda p: gzip_stream_end(p, 1) - 8, id="crc32"),
        pytest.param(lambda p: gzip_stream_end(p, 1) - 4, id="isize"),
        pytest.param(lambda p: slot_at(1) + 1, id="gzip-magic"),
        pytest.param(lambda p: slot_at(1), id="flag-byte"),
    ],
)
def test_flipped_byte_in_gzip_slot(
    where: Callable[[Path], int], inputs: dict[str, bytes], tmp_path: Path
) -> None:
    raw = inputs["unaligned"]
    path = copy_vector("a_unaligned.spgz", tmp_path)
    flip_byte(path, where(path))
    img, snap = open_snap(path)
    with img, snap:
        with pytest.raises(CorruptChunkError) as exc:
            snap.read_chunk(1)
        assert exc.value.chunk == 1
        assert exc.value.offset == BS
        assert "chunk 1 at offset 131071" in str(exc.value)
        assert_one_line(exc.value, path)
        with pytest.raises(CorruptChunkError):
            snap.read(BS - 10, 20)  # a read spanning into the bad block fails as a whole
        problems = img.verify()
        assert [(i, off) for i, off, _ in problems] == [(1, BS)]
        assert problems[0][2]
        for i in (0, 2, 3, 4, 8):
            assert snap.read_chunk(i) == raw[i * BS : (i + 1) * BS]
        assert snap.read(0, BS) == raw[:BS]
        assert snap.read(2 * BS, 3 * BS) == raw[2 * BS : 5 * BS]


def test_unknown_flag_on_raw_slot(inputs: dict[str, bytes], tmp_path: Path) -> None:
    path = copy_vector("a_unaligned.spgz", tmp_path)
    with open(path, "r+b") as f:
        f.seek(slot_at(5))
        f.write(b"\x07")
    img, snap = open_snap(path)
    with img, snap:
        with pytest.raises(CorruptChunkError, match="0x07"):
            snap.read(5 * BS + 100, 10)  # a partial read must check the flag too
        assert [p[:2] for p in img.verify()] == [(5, 5 * BS)]
        assert not snap.chunk_is_zero(5)
        assert snap.read_chunk(6) == inputs["unaligned"][6 * BS : 7 * BS]


def test_bytes_after_gzip_member_are_ignored(inputs: dict[str, bytes], tmp_path: Path) -> None:
    """As in the Go reader (Multistream off): only the first member counts, CRC-checked."""
    path = copy_vector("a_unaligned.spgz", tmp_path)
    with open(path, "r+b") as f:
        f.seek(gzip_stream_end(path, 2))
        f.write(b"garbage" + gzip.compress(b"second member"))
    img, snap = open_snap(path)
    with img, snap:
        assert snap.read_chunk(2) == inputs["unaligned"][2 * BS : 3 * BS]
        assert img.verify() == []


def test_gzip_inflating_past_block_size(tmp_path: Path) -> None:
    path = tmp_path / "big.spgz"
    build_spgz(path, 3, [("raw", bytes(12287)), ("gzip", b"x" * 12287)])
    with open(path, "r+b") as f:  # replace slot 1 with a stream of bs + 1 bytes
        f.seek(HDR + 12288)
        f.write(b"\1" + gzip.compress(b"y" * 12288))
    img, snap = open_snap(path)
    with img, snap:
        with pytest.raises(CorruptChunkError, match="more than the block size"):
            snap.read_chunk(1)
        assert snap.read_chunk(0) == bytes(12287)


def test_truncated_inside_last_gzip_slot(tmp_path: Path) -> None:
    path = copy_vector("a_unaligned.spgz", tmp_path)
    os.truncate(path, slot_at(2) + 2000)
    with pytest.raises(DataError, match="last block 2") as exc:
        SpgzImage.open(str(path))
    assert_one_line(exc.value, path)


def test_truncated_inside_raw_slot_looks_shorter(inputs: dict[str, bytes], tmp_path: Path) -> None:
    """The format stores no size: a cut through raw data is indistinguishable from a short disk."""
    path = copy_vector("a_unaligned.spgz", tmp_path)
    os.truncate(path, slot_at(5) + 1000)
    img, snap = open_snap(path)
    with img, snap:
        assert snap.size == 5 * BS + 999
        assert snap.read(0, snap.size) == inputs["unaligned"][: 5 * BS + 999]


def test_truncated_on_slot_boundary(inputs: dict[str, bytes], tmp_path: Path) -> None:
    path = copy_vector("a_unaligned.spgz", tmp_path)
    os.truncate(path, slot_at(4))
    img, snap = open_snap(path)
    with img, snap:
        assert snap.size == 4 * BS
        assert snap.read(0, 10 * BS) == inputs["unaligned"][: 4 * BS]


def test_file_shrinks_after_open(inputs: dict[str, bytes], tmp_path: Path) -> None:
    raw = inputs["unaligned"]
    path = copy_vector("a_unaligned.spgz", tmp_path)
    img, old = open_snap(path)
    with img, old:
        os.truncate(path, slot_at(7) + 10)  # cut inside raw slot 7's data
        with pytest.raises(CorruptChunkError):
            old.read(7 * BS + 100, 10)  # the in-place raw path notices
        assert old.read(7 * BS, 9) == raw[7 * BS : 7 * BS + 9]  # what is still there reads
        os.truncate(path, slot_at(4))
        for i in (4, 7, 8):
            with pytest.raises(CorruptChunkError):
                old.read_chunk(i)
        with pytest.raises(CorruptChunkError):
            old.read(6 * BS + 5, 10)
        assert [p[0] for p in old.verify()] == [4, 5, 6, 7, 8]
        assert old.read_chunk(3) == raw[3 * BS : 4 * BS]
        img.refresh()
        assert img.generations()[0].size == 4 * BS
        assert old.size == len(raw)
        with img.snapshot() as new:
            assert new.size == 4 * BS
            assert new.read(0, new.size) == raw[: 4 * BS]
        assert img.verify() == []


@pytest.mark.parametrize("length", [0, 5, 8, 11])
def test_truncated_header(length: int, tmp_path: Path) -> None:
    path = tmp_path / "short.spgz"
    path.write_bytes((VECTORS / "a_unaligned.spgz").read_bytes()[:length])
    with pytest.raises(DataError) as exc:
        SpgzImage.open(str(path))
    assert_one_line(exc.value, path)


@pytest.mark.parametrize("header", [b"SPGZ0002" + bytes(4), b"\x00" * 12, b"hello world!\n"])
def test_wrong_magic(header: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.spgz"
    path.write_bytes(header + bytes(8192))
    with pytest.raises(DataError, match="not an SPGZ0001") as exc:
        SpgzImage.open(str(path))
    assert_one_line(exc.value, path)
    assert not is_spgz(str(path))
    assert not is_spgz(header)


@pytest.mark.parametrize("field", [0, spgz_mod.MAX_BLOCK_SIZE_FIELD + 1, 0xFFFFFFFF])
def test_unsupported_block_size_field(field: int, tmp_path: Path) -> None:
    path = tmp_path / "bs.spgz"
    path.write_bytes(MAGIC + struct.pack("<I", field) + bytes(4084))
    with pytest.raises(DataError, match="block size") as exc:
        SpgzImage.open(str(path))
    assert_one_line(exc.value, path)


def test_directory_missing_and_fifo(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory") as exc:
        SpgzImage.open(str(tmp_path))
    assert_one_line(exc.value, tmp_path)
    missing = tmp_path / "nope.spgz"
    with pytest.raises(UsageError) as exc:
        SpgzImage.open(str(missing))
    assert_one_line(exc.value, missing)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(UsageError):
        SpgzImage.open(str(fifo))  # must not block waiting for a writer
    assert not is_spgz(str(fifo))
    assert not is_spgz(str(tmp_path))
    assert not is_spgz(str(missing))


@pytest.mark.parametrize("name", ["a_empty.spgzc.spgz", "a_empty.diskrsync.spgz"])
def test_empty_images(name: str) -> None:
    with SpgzImage.open(str(VECTORS / name)) as img, img.snapshot() as snap:
        assert snap.size == 0
        assert snap.chunk_count == 0
        assert snap.read(0, 100) == b""
        assert img.verify() == []
        assert img.generations()[0].size == 0
        with pytest.raises(UsageError):
            snap.read_chunk(0)


def test_header_then_padding_short_of_first_slot(tmp_path: Path) -> None:
    """Bytes 12..4095 are padding whatever they hold; a file ending there is empty."""
    path = tmp_path / "pad.spgz"
    path.write_bytes(MAGIC + struct.pack("<I", 32) + b"\xff" * 1000)
    with SpgzImage.open(str(path)) as img:
        assert img.generations()[0].size == 0


def test_is_spgz() -> None:
    assert is_spgz(str(VECTORS / "a_unaligned.spgz"))
    assert is_spgz(str(VECTORS / "a_empty.diskrsync.spgz"))
    assert is_spgz(MAGIC + b"\x20\0\0\0")
    assert not is_spgz(b"SPGZ000")
    assert not is_spgz(str(VECTORS / "README.md"))


# --- API edges ---------------------------------------------------------------------------------


def test_snapshot_numbers_and_closing() -> None:
    img = SpgzImage.open(str(VECTORS / "a_small_256k.diskrsync.spgz"))
    for bad in (0, 2, -1):
        with pytest.raises(UsageError):
            img.snapshot(bad)
    snap = img.snapshot()
    img.close()
    assert len(snap.read_chunk(0)) == BS  # a snapshot outlives its image
    with pytest.raises(UsageError):
        img.snapshot()
    with pytest.raises(UsageError):
        img.generations()
    snap.close()
    snap.close()
    with pytest.raises(UsageError):
        snap.read(0, 1)
    img.close()


def test_bad_read_arguments() -> None:
    img, snap = open_snap(VECTORS / "a_small_256k.diskrsync.spgz")
    with img, snap:
        for bad in (-1, 3):
            with pytest.raises(UsageError):
                snap.read_chunk(bad)
            with pytest.raises(UsageError):
                snap.chunk_is_zero(bad)
        with pytest.raises(UsageError):
            snap.read(-1, 5)
        with pytest.raises(UsageError):
            snap.read(0, -5)
        assert snap.read(snap.size, 10) == b""
        assert snap.read(snap.size + 10**12, 10) == b""


# --- crafted files: layouts the vectors do not show --------------------------------------------

FIELD = 3  # the Go writer's minimum: 12287-byte blocks keep crafted files small
CBS = FIELD * 4096 - 1


def block_bytes(seed: int, nonzero: int) -> bytes:
    """``nonzero`` compressible-but-not-trivial bytes, then zeros to a full block."""
    r = random.Random(seed)
    head = bytes(r.choice(b"abcdef\0") for _ in range(nonzero))
    return head + bytes(CBS - nonzero)


def test_short_gzip_block_is_zero_padded(tmp_path: Path) -> None:
    path = tmp_path / "pad.spgz"
    expected = build_spgz(
        path, FIELD, [("gzip", b"abc"), ("raw", block_bytes(1, 100))], ("gzip", b"tail" * 10)
    )
    with SpgzImage.open(str(path)) as img, img.snapshot() as snap:
        assert snap.size == 2 * CBS + 40
        assert snap.read_chunk(0) == b"abc" + bytes(CBS - 3)
        assert snap.read(0, snap.size) == expected


def test_gzip_last_full_slot_is_padded_when_file_ends_on_boundary(tmp_path: Path) -> None:
    """A file ending exactly on a slot boundary holds whole blocks, even if the last is gzip."""
    path = tmp_path / "edge.spgz"
    build_spgz(path, FIELD, [("raw", block_bytes(2, 50))])
    with open(path, "r+b") as f:  # full-length slot 1: a short gzip stream then zeros
        f.seek(HDR + 2 * (CBS + 1) - 1)
        f.write(b"\0")
        f.seek(HDR + CBS + 1)
        f.write(b"\1" + gzip.compress(b"xyz"))
    with SpgzImage.open(str(path)) as img, img.snapshot() as snap:
        assert snap.size == 2 * CBS
        assert snap.read_chunk(1) == b"xyz" + bytes(CBS - 3)


def test_last_gzip_block_rewritten_to_other_length(tmp_path: Path) -> None:
    """Same file length, different content length: a stale snapshot must refuse, not guess."""
    path = tmp_path / "rewrite.spgz"
    build_spgz(path, FIELD, [("raw", block_bytes(5, 10))])
    with open(path, "ab") as f:
        f.write(b"\1" + gzip.compress(b"a" * 100, mtime=0))
    img, snap = open_snap(path)
    with img, snap:
        assert snap.read(CBS, 200) == b"a" * 100
        length = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(HDR + CBS + 1)
            f.write(b"\1" + gzip.compress(b"a" * 101, mtime=0))
        assert path.stat().st_size == length
        with pytest.raises(CorruptChunkError, match="file changed"):
            snap.read_chunk(1)
        img.refresh()
        with img.snapshot() as new:
            assert new.read(CBS, 200) == b"a" * 101


def test_flag_only_last_slot_adds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "flag.spgz"
    expected = build_spgz(path, FIELD, [("raw", block_bytes(3, 10))], ("raw", b""))
    with SpgzImage.open(str(path)) as img, img.snapshot() as snap:
        assert snap.size == CBS
        assert snap.chunk_count == 1
        assert snap.read(0, 2 * CBS) == expected


def test_smallest_block_size_field(tmp_path: Path) -> None:
    """The Go reader accepts field 1 (4095-byte blocks) though its writer never makes it."""
    path = tmp_path / "one.spgz"
    r = random.Random(4)
    blocks = [("raw", r.randbytes(4095)), ("gzip", b"q" * 4095), ("hole", b"")]
    expected = build_spgz(path, 1, blocks, ("raw", b"end"))
    with SpgzImage.open(str(path)) as img, img.snapshot() as snap:
        assert snap.chunk_size == 4095
        assert snap.read(0, snap.size) == expected
        assert [snap.chunk_is_zero(i) for i in range(4)] == [False, False, True, False]


block_kind = st.tuples(st.sampled_from(["raw", "gzip", "gzip-short", "hole"]), st.integers(0, 99))
last_kind = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["raw", "gzip"]), st.integers(0, CBS), st.integers(0, 99)),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kinds=st.lists(block_kind, max_size=5),
    last=last_kind,
    reads=st.lists(st.tuples(st.integers(0, 7 * CBS), st.integers(0, 3 * CBS)), max_size=5),
)
def test_crafted_files_round_trip(
    tmp_path: Path,
    kinds: list[tuple[str, int]],
    last: tuple[str, int, int] | None,
    reads: list[tuple[int, int]],
) -> None:
    blocks: list[tuple[str, bytes]] = []
    for kind, seed in kinds:
        data = block_bytes(seed, (seed * 97) % CBS)
        if kind == "gzip-short":
            blocks.append(("gzip", data[: (seed * 97) % CBS]))
        else:
            blocks.append((kind, data))
    tail = None
    if last is not None:
        tail = (last[0], block_bytes(last[2], min(last[1], (last[2] * 89) % CBS))[: last[1]])
    path = tmp_path / "crafted.spgz"
    expected = build_spgz(path, FIELD, blocks, tail)
    with SpgzImage.open(str(path)) as img, img.snapshot() as snap:
        assert snap.size == len(expected)
        assert b"".join(snap.read_chunk(i) for i in range(snap.chunk_count)) == expected
        for off, n in reads:
            assert snap.read(off, n) == expected[off : off + n]
        for i in range(snap.chunk_count):
            chunk = expected[i * CBS : (i + 1) * CBS]
            if snap.chunk_is_zero(i):
                assert chunk.count(0) == len(chunk)  # never a false "zero"
            if i < len(kinds) and kinds[i][0] == "hole":
                assert snap.chunk_is_zero(i)
        assert img.verify() == []
