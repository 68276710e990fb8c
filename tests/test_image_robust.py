"""Robustness of the image format: full disks, damaged files, bad paths, the CLI's answers, readers
in other processes, and hole punching.

Every CLI error must be one line on stderr starting with ``diskrsync: ``, a non-zero exit code,
and no traceback. Mount-based tests (tmpfs, ramfs, read-only bind mounts) need root and unmount
in ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskrsync.base.errors import (
    EXIT_REDUNDANCY_LOST,
    CorruptChunkError,
    DataError,
    FormatVersionError,
    LocalError,
    UsageError,
)
from diskrsync.compression.codec import Kind
from diskrsync.compression.format import (
    CHECKSUM_SIZE,
    SLOT_SIZE,
    SUPERBLOCK_SLOTS,
    Superblock,
    checksum,
    unpack_entry,
)
from diskrsync.compression.image import Image, TreeView, punch_hole

CS = 16 * 1024
SUPPORT = Path(__file__).parent / "support"
SB_BODY = 60  # bytes of a superblock covered by its checksum (struct "<8sHHIIIQQI16s")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")


# -- helpers ---------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "diskrsync.cli", *args], capture_output=True, timeout=60
    )


def assert_cli_error(r: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """A failed command: exit code != 0, one stderr line ``diskrsync: ...``, no traceback."""
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert r.returncode != 0, f"expected a failure, got exit 0:\n{out}{err}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diskrsync: "), f"stderr is not one line:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def commit(path: str, data: bytes, *, chunks=None, keep: int = 2, source: str = "") -> object:
    """Commit ``data`` as the new generation, writing only ``chunks`` (default: all)."""
    with Image.open(path) as img:
        tx = img.begin()
    try:
        tx.resize(len(data))
        n = -(-len(data) // CS)
        for c in range(n) if chunks is None else chunks:
            tx.write_chunk(c, data[c * CS : (c + 1) * CS])
        return tx.commit(keep=keep, source=source)
    finally:
        tx.close()


def content(path: str, number: int | None = None) -> bytes:
    with Image.open(path) as img, img.snapshot(number) as snap:
        return snap.read(0, snap.size)


def disk(seed: int, chunks: int, tail: int = 0) -> bytes:
    """Random chunks, compressible text chunks and zero chunks, ``tail`` extra bytes."""
    rnd = random.Random(seed)
    parts = []
    for c in range(chunks):
        kind = c % 3
        if kind == 0:
            parts.append(rnd.randbytes(CS))
        elif kind == 1:
            parts.append((f"{seed} chunk {c} ".encode() * CS)[:CS])
        else:
            parts.append(bytes(CS))
    parts.append(rnd.randbytes(tail))
    return b"".join(parts)


def new_image(path: str, *gens: bytes, keep: int = 2) -> str:
    Image.create(path, chunk_size=CS, fanout=4).close()
    for i, data in enumerate(gens):
        commit(path, data, keep=keep, source=f"src{i + 1}")
    return path


def flip(path: str, offset: int, count: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def superblocks(path: str) -> list[tuple[int, Superblock | None]]:
    with open(path, "rb") as f:
        head = f.read(2 * SLOT_SIZE)
    out: list[tuple[int, Superblock | None]] = []
    for off in SUPERBLOCK_SLOTS:
        try:
            out.append((off, Superblock.decode(head[off : off + SLOT_SIZE])))
        except DataError:
            out.append((off, None))
    return out


def newest_slot(path: str) -> int:
    valid = [(sb.counter, off) for off, sb in superblocks(path) if sb is not None]
    return max(valid)[1]


@contextlib.contextmanager
def mounted(where: Path, fstype: str, options: str = "") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", fstype, *(["-o", options] if options else []), fstype, str(where)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {fstype}: {r.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def read_only_view(src: Path, where: Path) -> Iterator[Path]:
    """``src`` bind-mounted read-only at ``where`` (root cannot write there either)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "--bind", str(src), str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount: {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


# -- ENOSPC ------------------------------------------------------------------------------


def fill(folder: Path) -> Path:
    """Fill a filesystem to the last page with a filler file."""
    filler = folder / "filler"
    block = b"\xa5" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            try:
                if os.write(fd, block) < len(block):
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


@needs_root
@pytest.mark.process
def test_enospc_inside_commit_keeps_previous_generation(tmp_path):
    """The disk fills up while commit() writes index pages and the table: a one-line
    LocalError, the previous generation intact and verifying, and once space is freed a
    smaller commit goes through."""
    with mounted(tmp_path / "small", "tmpfs", "size=4m") as mnt:
        path = str(mnt / "full.img")
        first = random.Random(1).randbytes(CS * 100)  # ~1.6 MiB, stored raw
        new_image(path, first)
        tx = Image.open(path).begin()
        tx.resize(len(first) + CS * 8)
        second = random.Random(2).randbytes(CS * 108)
        for c in range(100, 108):
            tx.write_chunk(c, second[c * CS : (c + 1) * CS])
        filler = fill(mnt)  # the chunks fit, the index pages and the table do not
        try:
            with pytest.raises(LocalError) as exc:
                tx.commit(keep=1)
            assert "\n" not in str(exc.value) and path in str(exc.value)
        finally:
            tx.abort()
        assert content(path) == first
        with Image.open(path) as img:
            assert [g.number for g in img.generations()] == [1]
        r = cli("verify", path)
        assert r.returncode == 0, r.stdout + r.stderr
        filler.unlink()
        third = first[: CS * 10] + random.Random(3).randbytes(CS * 4) + first[CS * 14 :]
        commit(path, third, chunks=range(10, 14), keep=1)
        assert content(path) == third
        assert cli("verify", path).returncode == 0
        # the failed transaction's writes past the end were given back
        assert os.path.getsize(path) < 3 * len(first)


@needs_root
@pytest.mark.process
def test_enospc_is_reported_as_no_space_left(tmp_path):
    with mounted(tmp_path / "small", "tmpfs", "size=4m") as mnt:
        path = str(mnt / "full.img")
        first = random.Random(1).randbytes(CS * 100)
        new_image(path, first)
        tx = Image.open(path).begin()
        try:
            tx.resize(CS * 200)
            with pytest.raises(LocalError) as exc:
                for c in range(200):
                    tx.write_chunk(c, random.Random(c).randbytes(CS))
        finally:
            tx.abort()
        assert content(path) == first
        assert "no space left" in str(exc.value), str(exc.value)


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


@needs_root
@pytest.mark.process
def test_failed_push_gives_the_space_back(tmp_path):
    """A push that fills the filesystem fails with exit 3 and leaves the filesystem as free as
    it found it: the aborted transaction's chunks are cut off the file (tmpfs punches holes
    too), not kept until the next push."""
    with mounted(tmp_path / "small", "tmpfs", "size=4m") as mnt:
        path = str(mnt / "full.img")
        first = random.Random(1).randbytes(CS * 100)  # ~1.6 MiB, stored raw
        new_image(path, first)
        size_before, free_before = os.path.getsize(path), free_bytes(mnt)
        src = tmp_path / "big.raw"
        src.write_bytes(random.Random(2).randbytes(CS * 300))  # ~4.7 MiB, incompressible
        r = cli("push", "-q", str(src), path)
        assert_cli_error(r, "no space left")
        assert r.returncode == 3
        assert free_bytes(mnt) >= free_before - 64 * 1024, (free_bytes(mnt), free_before)
        assert os.path.getsize(path) <= size_before + 64 * 1024
        assert content(path) == first
        assert cli("verify", path).returncode == 0


@pytest.mark.process
def test_abort_gives_back_only_what_no_checkpoint_holds(tmp_path):
    path = new_image(str(tmp_path / "cp.img"), disk(1, 4))
    size = os.path.getsize(path)
    data = random.Random(7).randbytes(CS * 40)
    with Image.open(path) as img:
        tx = img.begin()
    try:
        tx.resize(len(data))
        for c in range(20):
            tx.write_chunk(c, data[c * CS : (c + 1) * CS])
        tx.checkpoint()
        saved = os.path.getsize(path)
        assert saved >= size + 20 * CS
        for c in range(20, 40):
            tx.write_chunk(c, data[c * CS : (c + 1) * CS])
        assert os.path.getsize(path) >= saved + 20 * CS
    finally:
        tx.abort()
    assert os.path.getsize(path) <= saved + 4 * 4096  # the chunks after the checkpoint
    with Image.open(path) as img:
        tx = img.begin()  # resumes: the checkpointed chunks are all there
    try:
        assert tx.resumed_from is not None
        for c in range(20):
            assert tx.read_chunk(c) == data[c * CS : (c + 1) * CS]
    finally:
        tx.abort()
    assert cli("verify", path).returncode == 0


@needs_root
@pytest.mark.process
def test_restore_onto_a_full_disk_fails_cleanly(tmp_path):
    data = random.Random(1).randbytes(CS * 8)
    path = new_image(str(tmp_path / "r.img"), data)
    with mounted(tmp_path / "dest", "tmpfs", "size=1m") as mnt:
        filler = fill(mnt)
        # room for 7.5 chunks: the last chunk's write is cut short by the full disk
        os.truncate(filler, os.path.getsize(filler) - (7 * CS + 8192))
        dest = mnt / "out.raw"
        r = cli("restore", "-q", path, str(dest))
        if r.returncode == 0:
            assert dest.read_bytes() == data, "restore reported success for a corrupt copy"
        assert_cli_error(r, "no space left")
        assert not dest.exists()
        assert not [p for p in mnt.iterdir() if p.name.startswith(".diskrsync-restore")]


# -- damage ------------------------------------------------------------------------------


@pytest.fixture
def two_gens(tmp_path) -> tuple[str, bytes, bytes]:
    g1 = disk(1, 20, tail=1234)
    g2 = bytearray(g1)
    g2[3 * CS : 5 * CS] = random.Random(9).randbytes(2 * CS)
    path = new_image(str(tmp_path / "two.img"), g1, bytes(g2))
    return path, g1, bytes(g2)


@pytest.mark.process
def test_newest_superblock_damaged_keeps_the_newest_generation(two_gens):
    """Both slots hold the newest commit (each naming its own table copy): one damaged slot
    costs redundancy only. (One-slot-per-commit images: tests/test_image_damage.py.)"""
    path, _g1, g2 = two_gens
    slot = newest_slot(path)
    flip(path, slot + 30, 4)  # inside the checksummed body: counter/table fields
    with Image.open(path) as img:
        assert img.damaged_slots == (SUPERBLOCK_SLOTS.index(slot),)
        assert [g.number for g in img.generations()] == [1, 2]
    assert content(path) == g2
    r = cli("verify", path)
    err = r.stderr.decode()
    assert r.returncode == EXIT_REDUNDANCY_LOST and "Traceback" not in err
    assert f"warning: superblock copy {SUPERBLOCK_SLOTS.index(slot)} is damaged" in err
    assert cli("info", path).returncode == 0
    # a new commit rewrites the damaged slot; numbers are never handed out twice
    commit(path, g2, chunks=range(3, 5), keep=3)
    with Image.open(path) as img:
        assert img.damaged_slots == ()
        assert [g.number for g in img.generations()] == [1, 2, 3]
    assert content(path, 2) == g2 and content(path) == g2


@pytest.mark.process
def test_both_superblocks_damaged(two_gens):
    path, _, _ = two_gens
    for off in SUPERBLOCK_SLOTS:
        flip(path, off + 20, 2)
    with pytest.raises(DataError) as exc:
        Image.open(path)
    assert "no valid superblock" in exc.value.message and "\n" not in exc.value.message
    for cmd in (["info"], ["verify"], ["prune", "--keep", "1"]):
        assert_cli_error(cli(*cmd, path), "no valid superblock")
    r = cli("restore", path, str(Path(path).with_suffix(".out")))
    assert_cli_error(r, "no valid superblock")
    assert not Path(path).with_suffix(".out").exists()


@pytest.mark.process
def test_damaged_index_page(two_gens):
    path, _, _ = two_gens
    with Image.open(path) as img:
        rec = img.record()
        view = TreeView(img.store, rec.tree, img.chunk_size, img.fanout)
        top = view.shape.top_level
        assert top >= 2
        # a level-1 page (chunks 4..7), located through the page above it
        parent = view.page(2, 1 // img.fanout)
        leaf = unpack_entry(parent, 1 % img.fanout)
        assert leaf.kind == Kind.PAGE
    flip(path, leaf.offset + 40)
    r = cli("verify", path)
    out = r.stdout.decode()
    assert r.returncode != 0 and "Traceback" not in out + r.stderr.decode()
    assert f"index page (1,1) at offset {leaf.offset}" in out, out
    assert "chunks 4-7 unreadable" in out
    with Image.open(path) as img, img.snapshot() as snap:
        assert snap.read_chunk(0)  # other pages still read
        with pytest.raises(DataError, match=r"index page \(1,1\)"):
            snap.read_chunk(5)
    assert_cli_error(cli("restore", path, str(Path(path).with_suffix(".out"))), "index page")
    assert not Path(path).with_suffix(".out").exists()
    # the top page: nothing of the generation is reachable
    flip(path, rec.tree.offset + 30)
    r = cli("verify", "--json", path)
    report = json.loads(r.stdout)
    assert r.returncode != 0 and not report["ok"]
    assert any(f"index page ({top},0)" in p for p in report["problems"]), report


@pytest.mark.parametrize("kind", [Kind.RAW, Kind.ZSTD])
@pytest.mark.process
def test_corrupt_chunk(tmp_path, kind):
    data = disk(4, 12)
    path = new_image(str(tmp_path / "c.img"), data)
    with Image.open(path) as img, img.snapshot() as snap:
        victim = next(i for i in range(snap.chunk_count) if snap.tree.entry(i).kind == kind)
        e = snap.tree.entry(victim)
    flip(path, e.offset + e.length // 2)
    with Image.open(path) as img, img.snapshot() as snap:
        with pytest.raises(CorruptChunkError) as exc:
            snap.read_chunk(victim)
        assert exc.value.chunk == victim and exc.value.offset == victim * CS
        assert f"corrupt chunk {victim} at offset {victim * CS}" in exc.value.message
        with pytest.raises(CorruptChunkError):
            snap.read(victim * CS + 5, 10)
        for i in range(snap.chunk_count):
            if i != victim:
                assert snap.read_chunk(i) == data[i * CS : (i + 1) * CS]
    r = cli("verify", path)
    out = r.stdout.decode()
    assert r.returncode != 0 and "Traceback" not in out + r.stderr.decode()
    assert f"bad chunk: generation 1 chunk {victim} at offset {victim * CS}" in out
    report = json.loads(cli("verify", "--json", path).stdout)
    assert not report["ok"] and [b["chunk"] for b in report["bad_chunks"]] == [victim]
    dest = tmp_path / "out.raw"
    assert_cli_error(cli("restore", path, str(dest)), f"corrupt chunk {victim}")
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diskrsync-restore")]
    # without --force an existing file keeps its bytes; --force rewrites it in place (same
    # inode), and a restore that fails says the file is left partly rewritten
    dest.write_bytes(b"precious")
    assert_cli_error(cli("restore", path, str(dest)), "--force")
    assert dest.read_bytes() == b"precious"
    ino = os.stat(dest).st_ino
    assert_cli_error(cli("restore", "--force", path, str(dest)), "corrupt chunk",
                     "left partly rewritten")
    assert os.stat(dest).st_ino == ino


@pytest.mark.process
def test_verify_names_every_generation_sharing_a_bad_chunk(tmp_path):
    """Chunk 0 is stored once and shared by generations 1-3 (4 rewrote it): verify names all
    three, so "restore another generation" does not send users to one that is broken too."""
    data = disk(4, 12)
    path = new_image(str(tmp_path / "s.img"), data, keep=4)
    model = bytearray(data)
    for g, chunk in ((2, 5), (3, 6), (4, 0)):
        model[chunk * CS : (chunk + 1) * CS] = random.Random(g).randbytes(CS)
        commit(path, bytes(model), chunks=[chunk], keep=4)
    with Image.open(path) as img, img.snapshot(1) as snap:
        e = snap.tree.entry(0)
        assert e.kind != Kind.ZERO
    flip(path, e.offset + e.length // 2)
    r = cli("verify", path)
    out = r.stdout.decode()
    assert r.returncode == 6, out
    assert "bad chunk: generations 1, 2, 3 chunk 0 at offset 0: corrupt chunk 0" in out, out
    report = json.loads(cli("verify", "--json", path).stdout)
    assert [(b["generations"], b["chunk"]) for b in report["bad_chunks"]] == [([1, 2, 3], 0)]
    # checking one generation still names every generation that shares the chunk
    report = json.loads(cli("verify", "--json", "-g", "2", path).stdout)
    assert [b["generations"] for b in report["bad_chunks"]] == [[1, 2, 3]]
    assert cli("restore", "-g", "4", "-q", path, str(tmp_path / "ok.raw")).returncode == 0


@pytest.mark.process
def test_truncated_image(tmp_path, two_gens):
    """Cut short inside the superblocks or the first generation's data: a clear error (cuts
    that only lose the newest generation are test_damaged_newest_table_fails_verify)."""
    path, _, _ = two_gens
    for cut in (0, 100, 5000, 8192, 12288, 20000, 40000):
        copy = tmp_path / f"cut{cut}.img"
        with open(path, "rb") as f:
            copy.write_bytes(f.read(cut))
        r = cli("verify", str(copy))
        text = (r.stdout + r.stderr).decode()
        assert r.returncode != 0, f"cut at {cut}: verify passed"
        assert "Traceback" not in text
        if r.stderr.strip():
            line = assert_cli_error(r)
            assert any(w in line for w in ("truncated", "cut short", "not a diskrsync image")), line
        else:
            assert "cut short" in text, text
        if cut >= 12288:
            with pytest.raises(DataError, match=r"cut short|truncated"), \
                    Image.open(str(copy)) as img, img.snapshot() as snap:
                snap.read(0, snap.size)


@pytest.mark.parametrize("damage", ["cut", "half", "flip"])
@pytest.mark.process
def test_damaged_newest_table(tmp_path, two_gens, damage):
    """The newest commit's table is written twice, the second copy last in the file: cutting
    its tail costs one copy; damage to both copies or half the file is a loud error, never
    the older generation served in silence."""
    path, _, g2 = two_gens
    sbs = [sb for _, sb in superblocks(path) if sb is not None]
    last = max(sbs, key=lambda sb: sb.table_offset)
    assert last.table_offset + last.table_length == os.path.getsize(path)
    if damage == "cut":
        os.truncate(path, os.path.getsize(path) - 10)
    elif damage == "half":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        for sb in sbs:
            flip(path, sb.table_offset + sb.table_length // 2)
    r = cli("verify", path)
    assert "Traceback" not in (r.stdout + r.stderr).decode()
    if damage == "cut":
        with Image.open(path) as img:
            assert [g.number for g in img.generations()] == [1, 2]
        assert content(path) == g2
        assert r.returncode == EXIT_REDUNDANCY_LOST, r.stdout + r.stderr
    else:
        assert_cli_error(r, "no valid superblock")
        assert r.returncode == 6
        with pytest.raises(DataError, match="no valid superblock"):
            Image.open(path)


@pytest.mark.process
def test_not_an_image(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(random.Random(5).randbytes(50000))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for p in (junk, empty):
        with pytest.raises(DataError, match="not a diskrsync image"):
            Image.open(str(p))
        for cmd in ("info", "verify"):
            assert_cli_error(cli(cmd, str(p)), "not a diskrsync image")
    # a real image whose magic is wrong in both slots
    path = new_image(str(tmp_path / "m.img"), disk(1, 3))
    for off in SUPERBLOCK_SLOTS:
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(b"NOTMAGIC")
    assert_cli_error(cli("info", path), "not a diskrsync image")
    with pytest.raises(DataError, match="not a diskrsync image"):
        Image.open(path)


def set_version(path: str, slot_offset: int, version: int) -> None:
    with open(path, "r+b") as f:
        f.seek(slot_offset)
        body = bytearray(f.read(SB_BODY))
        struct.pack_into("<H", body, 8, version)
        f.seek(slot_offset)
        f.write(bytes(body) + checksum(bytes(body)))
        f.seek(slot_offset)
        raw = f.read(SLOT_SIZE)
    # the checksum is right again: only the version is left to complain about
    assert raw[SB_BODY + CHECKSUM_SIZE : SB_BODY + CHECKSUM_SIZE + 8] == bytes(8)
    with pytest.raises(FormatVersionError, match=f"format version {version} is not supported"):
        Superblock.decode(raw)


@pytest.mark.parametrize("which", ["both", "newest"])
@pytest.mark.process
def test_future_format_version(two_gens, which):
    path, _, _ = two_gens
    slots = SUPERBLOCK_SLOTS if which == "both" else (newest_slot(path),)
    for off in slots:
        set_version(path, off, 7)
    with pytest.raises(FormatVersionError, match="format version 7 is not supported"):
        Image.open(path)
    for cmd in (["info"], ["verify"], ["restore", "-", "--quiet"], ["prune", "--keep", "1"]):
        r = cli(cmd[0], path, *cmd[1:])
        assert_cli_error(r, "format version 7 is not supported")
        assert r.stdout == b""


@pytest.mark.process
def test_bad_paths(tmp_path):
    assert_cli_error(cli("info", str(tmp_path)), "is a directory")
    assert_cli_error(cli("verify", str(tmp_path / "missing")), "No such file")
    assert_cli_error(cli("restore", str(tmp_path / "missing"), str(tmp_path / "o")),
                     "No such file")
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="is a directory"):
        Image.open(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway: "
                    "permission denied on read cannot be provoked as root")
@pytest.mark.process
def test_permission_denied_reading(tmp_path):
    path = new_image(str(tmp_path / "p.img"), disk(1, 2))
    os.chmod(path, 0)
    try:
        assert_cli_error(cli("info", path), "Permission denied")
    finally:
        os.chmod(path, 0o644)


@needs_root
@pytest.mark.process
def test_read_only_filesystem(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = disk(2, 6)
    new_image(str(src / "ro.img"), data, data[: 3 * CS])
    with read_only_view(src, tmp_path / "ro") as ro:
        path = str(ro / "ro.img")
        # reading works
        assert cli("verify", path).returncode == 0
        assert cli("info", "--json", path).returncode == 0
        assert content(path, 1) == data
        # writing fails cleanly
        assert_cli_error(cli("prune", "--keep", "1", path), "Read-only file system")
        with Image.open(path) as img, pytest.raises(LocalError, match="Read-only file system"):
            img.begin()
        with pytest.raises(LocalError, match="Read-only file system"):
            Image.create(str(ro / "new.img"), chunk_size=CS)
        assert_cli_error(cli("restore", path, str(ro / "out.raw")), "Read-only file system")
        assert not (ro / "out.raw").exists()
        # the write attempts changed nothing
        with Image.open(path) as img:
            assert [g.number for g in img.generations()] == [1, 2]


# -- CLI ---------------------------------------------------------------------------------


@pytest.fixture
def sparse_image(tmp_path) -> tuple[str, list[bytes]]:
    """Three generations of a 4 MiB disk that is mostly zeros."""
    size = 256 * CS
    gens = []
    model = bytearray(size)
    path = str(tmp_path / "s.img")
    Image.create(path, chunk_size=CS, fanout=4).close()
    for g in range(3):
        rnd = random.Random(g)
        touched = [g, 100 + g, 255]
        for c in touched:
            model[c * CS : (c + 1) * CS] = rnd.randbytes(CS) if c != 100 + g else (
                b"compressible " * CS)[:CS]
        commit(path, bytes(model), chunks=touched, keep=3, source=f"host:/dev/sd{g}")
        gens.append(bytes(model))
    return path, gens


@pytest.mark.process
def test_info_text_and_json(sparse_image):
    path, gens = sparse_image
    r = cli("info", "--json", path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    with Image.open(path) as img:
        want = img.generations()
    assert info["size"] == len(gens[-1]) and info["chunk_size"] == CS
    assert [g["number"] for g in info["generations"]] == [1, 2, 3]
    for g, w in zip(info["generations"], want, strict=True):
        assert g["root_hash"] == w.root_hash.hex() and len(g["root_hash"]) == 64
        assert g["source"] == w.source and g["size"] == len(gens[-1])
        assert abs(g["time"] - time.time()) < 300
    # stored: six distinct random chunks (0, 1, 2 and three versions of 255), three
    # compressible ones and a little index; far less than the 4 MiB disk
    assert 6 * CS <= info["stored_bytes"] <= 6 * CS + 3 * 2000 + 40 * 1000
    assert info["ratio"] == round(info["stored_bytes"] / info["size"], 4)
    assert info["allocated_bytes"] == os.stat(path).st_blocks * 512 > 0
    text = cli("info", path).stdout.decode()
    assert f"size:         {len(gens[-1])} bytes" in text
    for g in info["generations"]:
        assert g["root_hash"][:16] in text and g["source"] in text


@pytest.mark.process
def test_verify_json(sparse_image):
    path, _ = sparse_image
    r = cli("verify", "--json", path)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"] is True
    assert report["problems"] == [] and report["bad_chunks"] == [] and report["warnings"] == []
    # distinct stored chunks of the three generations: 0, 1, 2, 100, 101, 102 and three
    # versions of 255 (shared chunks are checked once); generation 1 alone: 0, 100, 255
    assert report["chunks_checked"] == 9
    r = cli("verify", "--json", "--generation", "1", path)
    assert json.loads(r.stdout)["chunks_checked"] == 3


@pytest.mark.process
def test_restore_file_is_sparse_and_exact(sparse_image, tmp_path):
    path, gens = sparse_image
    dest = tmp_path / "restored.raw"
    r = cli("restore", "--quiet", path, str(dest))
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert dest.read_bytes() == gens[-1]
    st = os.stat(dest)
    assert st.st_size == len(gens[-1]) and st.st_blocks * 512 < st.st_size // 8
    r = cli("restore", "-g", "1", path, str(tmp_path / "g1.raw"))
    assert r.returncode == 0 and (tmp_path / "g1.raw").read_bytes() == gens[0]


@pytest.mark.process
def test_restore_to_stdout(sparse_image):
    path, gens = sparse_image
    r = cli("restore", path, "-")
    assert r.returncode == 0 and r.stdout == gens[-1]
    r = cli("restore", "--generation", "2", path, "-")
    assert r.returncode == 0 and r.stdout == gens[1]


@pytest.mark.process
def test_restore_refuses_existing_file(sparse_image, tmp_path):
    path, gens = sparse_image
    dest = tmp_path / "busy.raw"
    dest.write_bytes(b"keep me")
    os.utime(dest, (1_000_000, 1_000_000))
    assert_cli_error(cli("restore", path, str(dest)), "--force")
    assert dest.read_bytes() == b"keep me" and os.stat(dest).st_mtime == 1_000_000
    r = cli("restore", "--force", "-q", path, str(dest))
    assert r.returncode == 0 and dest.read_bytes() == gens[-1]
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    assert cli("restore", "-q", path, str(empty)).returncode == 0
    assert empty.read_bytes() == gens[-1]


@pytest.mark.process
def test_prune_keep_1(sparse_image):
    path, gens = sparse_image
    r = cli("prune", "--keep", "1", path)
    assert r.returncode == 0 and r.stdout.decode().strip() == "pruned generation(s) 1, 2"
    info = json.loads(cli("info", "--json", path).stdout)
    assert [g["number"] for g in info["generations"]] == [3]
    assert content(path) == gens[-1]
    assert cli("prune", "--keep", "1", path).stdout.decode().strip() == "nothing to prune"
    assert_cli_error(cli("restore", "-g", "1", path, "-"), "no generation 1")
    assert cli("verify", path).returncode == 0


@pytest.mark.process
def test_cli_errors(sparse_image, tmp_path):
    path, _ = sparse_image
    empty = str(tmp_path / "none.img")
    Image.create(empty, chunk_size=CS).close()
    cases = [
        (["restore", "-g", "99", path, "-"], "no generation 99"),
        (["verify", "-g", "99", path], "no generation 99"),
        (["restore", empty, str(tmp_path / "x")], "no committed generation"),
        (["prune", "--keep", "0", path], "at least 1"),
        (["restore", path, str(tmp_path)], "is a directory"),
        (["restore", path, str(tmp_path / "no" / "such" / "dir" / "x")], "No such file"),
    ]
    for args, needle in cases:
        assert_cli_error(cli(*args), needle)
    # a second writer
    with Image.open(path) as img:
        tx = img.begin(what="push")
        try:
            line = assert_cli_error(cli("prune", "--keep", "1", path), "being written")
            assert f"pid {os.getpid()}" in line
        finally:
            tx.abort()


@pytest.mark.process
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["info"], ["info", "--json"], ["verify"], ["restore"],
                                  ["prune", "--keep", "5"]],
                         ids=["info", "info-json", "verify", "restore", "prune"])
def test_output_onto_a_full_disk_is_one_line(sparse_image, args):
    """stdout redirected to a full disk (``info > /full/f``, ``restore IMG - > /full/f``):
    one line and exit 3; each command printed a traceback (exit 1)."""
    path, _ = sparse_image
    argv = [*args, path, "-"] if args == ["restore"] else [*args, path]
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "diskrsync.cli", *argv], stdout=full,
                           stderr=subprocess.PIPE, timeout=60)
    r.stdout = b""
    line = assert_cli_error(r, "no space left on device")
    assert r.returncode == LocalError.exit_code, line


# -- readers in other processes ------------------------------------------------------------


@pytest.mark.process
def test_reader_in_another_process_pins_its_generation(tmp_path):
    path = str(tmp_path / "pin.img")
    n = 24
    first = random.Random(0).randbytes(CS * n)
    new_image(path, first)
    child = subprocess.Popen([sys.executable, str(SUPPORT / "pinreader.py"), path, "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "pinned\n", child.stderr.read()  # type: ignore[union-attr]
        for g in range(2, 7):  # every chunk rewritten, keep=1: generation 1 is pruned
            commit(path, random.Random(g).randbytes(CS * n), keep=1)
        with Image.open(path) as img:
            assert [x.number for x in img.generations()] == [6]
            with pytest.raises(UsageError, match="no generation 1"):
                img.snapshot(1)
        child.send_signal(signal.SIGUSR1)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert out.split() == ["sha256", hashlib.sha256(first).hexdigest(), str(len(first))]
    # the pin is gone with the process: the space comes back and the file stops growing
    sizes = []
    for g in range(7, 14):
        commit(path, random.Random(g).randbytes(CS * n), keep=1)
        sizes.append(os.path.getsize(path))
    assert max(sizes[3:]) <= sizes[2], sizes
    assert max(sizes) <= 6 * len(first), sizes
    assert content(path) == random.Random(13).randbytes(CS * n)


# -- hole punching -----------------------------------------------------------------------


def punch_scenario(folder: Path) -> tuple[int, int]:
    """Two full generations, prune the first, then small commits: returns (allocated before
    the prune, allocated after) for a file whose size did not shrink."""
    path = str(folder / "holes.img")
    n = 64
    a = random.Random(1).randbytes(CS * n)
    b = random.Random(2).randbytes(CS * n)
    new_image(path, a, b)
    before = allocated(path)
    size = os.path.getsize(path)
    assert before >= size - 8192  # written densely: no holes yet
    assert cli("prune", "--keep", "1", path).returncode == 0
    model = bytearray(b)
    for g in range(3):  # the freed extents are punched once no superblock reaches them
        model[g * CS : (g + 1) * CS] = random.Random(100 + g).randbytes(CS)
        commit(path, bytes(model), chunks=[g], keep=1)
    with Image.open(path) as img:
        img.begin().abort()
    # punching did the work (the file lost at most its tail of table copies)
    assert os.path.getsize(path) >= size - 8 * 4096
    assert content(path) == bytes(model)
    assert cli("verify", path).returncode == 0
    return before, allocated(path)


@pytest.mark.process
def test_pruned_space_is_punched_on_ext4_or_tmp(tmp_path):
    before, after = punch_scenario(tmp_path)
    assert after <= before - 60 * CS, (before, after)


@needs_root
@pytest.mark.process
def test_pruned_space_is_punched_on_tmpfs(tmp_path):
    with mounted(tmp_path / "t", "tmpfs", "size=16m") as mnt:
        before, after = punch_scenario(mnt)
        assert after <= before - 60 * CS, (before, after)


@needs_root
@pytest.mark.process
def test_ramfs_without_hole_punching_still_works(tmp_path):
    with mounted(tmp_path / "r", "ramfs") as mnt:
        probe = os.open(mnt / "probe", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(probe, bytes(65536))
            assert not punch_hole(probe, 0, 65536), "ramfs punches holes after all"
        finally:
            os.close(probe)
        path = str(mnt / "r.img")
        gens = [disk(s, 10, tail=s * 100) for s in range(1, 5)]
        new_image(path, *gens[:2])
        assert cli("prune", "--keep", "1", path).returncode == 0
        for g in gens[2:]:
            commit(path, g, keep=1)
        assert content(path) == gens[-1]
        with Image.open(path) as img:
            assert [x.number for x in img.generations()] == [4]
        r = cli("verify", path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert cli("restore", path, "-").stdout == gens[-1]
        # space is still reused (by allocation, not punching): the file stays bounded
        for s in range(5, 12):
            commit(path, disk(s, 10), keep=1)
        assert os.path.getsize(path) < 6 * len(gens[-1])
        assert content(path) == disk(11, 10)


# -- checkpoints -------------------------------------------------------------------------


@pytest.mark.inproc
def test_checkpoint_after_growing_resize_keeps_chunks(tmp_path):
    path = new_image(str(tmp_path / "cp.img"), disk(1, 4))
    grown = bytearray(disk(1, 4) + bytes(6 * CS))
    grown[8 * CS : 9 * CS] = b"\x08" * CS
    grown[9 * CS : 10 * CS] = b"\x09" * CS
    with Image.open(path) as img:
        tx = img.begin()
    try:
        tx.resize(10 * CS)
        tx.write_chunk(8, grown[8 * CS : 9 * CS])
        tx.checkpoint()
        tx.write_chunk(9, grown[9 * CS : 10 * CS])  # same level-1 page as chunk 8 (fanout 4)
        tx.commit()
    finally:
        tx.close()
    got = content(path)
    assert got[8 * CS : 9 * CS] == grown[8 * CS : 9 * CS], "chunk 8 was lost"
    assert got == bytes(grown)


@pytest.mark.process
@pytest.mark.parametrize("args", [["info"], ["verify"], ["prune", "--keep", "1"],
                                  ["restore", "OUT"], ["mount", "MNT"]],
                         ids=["info", "verify", "prune", "restore", "mount"])
def test_a_fifo_given_as_the_image_is_refused_at_once(tmp_path, args):
    """A FIFO where an image belongs was opened for reading and waited for a writer forever
    (info, verify, prune, restore, mount hung); it is "not an image" at once."""
    fifo = tmp_path / "image.spgz"
    os.mkfifo(fifo)
    words = [str(tmp_path / w) if w in ("OUT", "MNT") else w for w in args]
    (tmp_path / "MNT").mkdir()
    r = cli(words[0], str(fifo), *words[1:])  # cli()'s timeout is the did-not-hang guard
    assert_cli_error(r, "not a diskrsync image")
    assert r.returncode == 6
    assert not (tmp_path / "OUT").exists()
