"""push --skip-free-blocks: ext2/3/4 and xfs free blocks are stored as zeros and never read,
and no file's data is ever skipped. File systems are built with mkfs.ext4 -d and changed with
debugfs (no root needed); xfs is changed through a loop mount (root), always unmounted."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from diskrsync.cli.requests import push_request
from diskrsync.cli.serve import _parse_request
from diskrsync.compression.fsmaps import Distrust, ext_free, free_blocks, subtract_ranges
from diskrsync.compression.image import Image
from diskrsync.compression.partitions import read_partitions
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.remote import _source_argv
from diskrsync.synccore.source import SourceOptions

MiB = 1 << 20
SKIP = PushRequest(source=SourceOptions(skip_free_blocks=True))

needs_e2fs = pytest.mark.skipif(not shutil.which("debugfs") or not shutil.which("mkfs.ext4"),
                                reason="needs e2fsprogs")
needs_root_xfs = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mkfs.xfs") or not os.path.exists("/dev/loop-control"),
    reason="changing an xfs needs root, xfsprogs and loop devices")


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def reader_of(path: str | Path):
    fd = os.open(path, os.O_RDONLY)
    return fd, (lambda o, n: os.pread(fd, n, o))


def dumpe2fs_free(path: Path) -> set[int]:
    """The free blocks e2fsprogs lists, as block numbers (the oracle)."""
    out = run("dumpe2fs", str(path))
    free: set[int] = set()
    for line in re.findall(r"^  Free blocks: (.*)$", out, re.M):
        for part in filter(None, (x.strip() for x in line.split(","))):
            a, _, b = part.partition("-")
            free.update(range(int(a), int(b or a) + 1))
    return free


def make_ext4(path: Path, size: str, files: dict[str, bytes], *opts: str) -> None:
    src = path.parent / (path.name + ".d")
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    run("mkfs.ext4", "-q", "-F", *opts, "-d", str(src), str(path), size)
    shutil.rmtree(src)


def debugfs(fs: Path, *commands: str) -> None:
    for c in commands:
        run("debugfs", "-w", "-R", c, str(fs))


def ext4_files(fs: Path, names: list[str], tmp: Path) -> dict[str, bytes]:
    out = {}
    for name in names:
        dest = tmp / f"dump-{name}"
        run("debugfs", "-R", f"dump /{name} {dest}", str(fs))
        out[name] = dest.read_bytes()
        dest.unlink()
    return out


def newest(path: Path) -> bytes:
    with Image.open(str(path)) as img, img.snapshot() as s:
        return s.read(0, s.size)


# -- the maps themselves -----------------------------------------------------------------


@pytest.mark.process
@needs_e2fs
@pytest.mark.parametrize("opts", [(), ("-b", "4096"), ("-t", "ext2"), ("-O", "^flex_bg"),
                                  ("-O", "^64bit"), ("-O", "^metadata_csum,uninit_bg"),
                                  ("-O", "sparse_super2")],
                         ids=["ext4-1k", "ext4-4k", "ext2", "no-flex_bg", "32bit",
                              "uninit_bg", "sparse_super2"])
def test_ext_free_blocks_equal_what_e2fsprogs_lists(tmp_path, opts):
    r = random.Random(1)
    fs = tmp_path / "fs"
    files = {f"f{i}": r.randbytes(r.randrange(1, 3 * MiB)) for i in range(6)}
    make_ext4(fs, "200M", files, *opts)
    debugfs(fs, "rm /f2", "rm /f4")
    fd, read = reader_of(fs)
    try:
        found = ext_free(read, fs.stat().st_size)
    finally:
        os.close(fd)
    assert found is not None
    _kind, total, free = found
    size = re.search(r"Block size:\s+(\d+)", run("dumpe2fs", "-h", str(fs)))
    assert size is not None
    bs = int(size.group(1))
    mine = {b for o, n in free for b in range(o // bs, (o + n) // bs)}
    assert mine == dumpe2fs_free(fs)
    assert total == fs.stat().st_size


@pytest.mark.process
@needs_e2fs
def test_an_ext4_not_cleanly_unmounted_or_inconsistent_is_read_in_full(tmp_path):
    fs = tmp_path / "fs"
    make_ext4(fs, "64M", {"a": b"x" * 100000})
    debugfs(fs, "ssv state 0")  # as a mounted file system (or a snapshot of one) says
    fd, read = reader_of(fs)
    try:
        with pytest.raises(Distrust, match="not cleanly unmounted"):
            ext_free(read, fs.stat().st_size)
        m = free_blocks(read, fs.stat().st_size)
        assert m.free == [] and "not cleanly unmounted" in m.problems[0]
    finally:
        os.close(fd)
    make_ext4(fs2 := tmp_path / "fs2", "64M", {"a": b"x" * 100000})
    with open(fs2, "r+b") as f:  # group 0 now claims more free blocks than its bitmap has
        sb = os.pread(f.fileno(), 1024, 1024)
        bs = 1024 << int.from_bytes(sb[24:28], "little")
        gdt = (int.from_bytes(sb[20:24], "little") + 1) * bs
        count = int.from_bytes(os.pread(f.fileno(), 2, gdt + 12), "little")
        os.pwrite(f.fileno(), (count + 1).to_bytes(2, "little"), gdt + 12)
    fd, read = reader_of(fs2)
    try:
        with pytest.raises(Distrust, match="does not match its free count"):
            ext_free(read, fs2.stat().st_size)
    finally:
        os.close(fd)


@pytest.mark.pure
def test_a_pull_asks_the_remote_source_to_skip_free_blocks():
    """The far end of a pull is the source: the option travels in its serve command, which a
    forced-command server lets through."""
    argv = _source_argv("/dev/sdb", SKIP)
    assert "--skip-free-blocks" in argv
    ns = _parse_request(" ".join(["diskrsync", *argv]))
    assert push_request(ns).source.skip_free_blocks


@pytest.mark.pure
def test_subtract_ranges():
    assert subtract_ranges([(0, 10), (20, 10)], [(5, 2), (8, 14), (29, 5)]) == \
        [(0, 5), (7, 1), (22, 7)]
    assert subtract_ranges([(0, 10)], []) == [(0, 10)]
    assert subtract_ranges([(0, 10)], [(0, 10)]) == []


# -- pushes ------------------------------------------------------------------------------


def gpt_disk(path: Path, size: int, parts_mib: list[int], scheme: str = "gpt") -> (
    list[tuple[int, int]]
):
    """A GPT (or MBR) disk with partitions of those sizes; their (start, size) in bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    if scheme == "gpt":
        args = []
        for i, n in enumerate(parts_mib, 1):
            args += ["-n", f"{i}:0:+{n}M"]
        run("sgdisk", *args, str(path))
    else:
        script = "label: dos\n" + "".join(f",{n}M\n" for n in parts_mib)
        subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True,
                       capture_output=True)
    fd, read = reader_of(path)
    try:
        return [(p.start, p.size) for p in read_partitions(read, size)]
    finally:
        os.close(fd)


def embed(disk: Path, fs: Path, start: int) -> None:
    with open(disk, "r+b") as d:
        d.seek(start)
        d.write(fs.read_bytes())


def extract(data: bytes, start: int, size: int, dest: Path) -> Path:
    dest.write_bytes(data[start : start + size])
    return dest


@pytest.mark.process
@pytest.mark.skipif(not shutil.which("sgdisk") or not shutil.which("sfdisk"),
                    reason="needs gdisk and fdisk")
@needs_e2fs
@pytest.mark.parametrize("scheme", ["gpt", "mbr"])
def test_ext4_partition_files_written_deleted_and_overwritten_all_restore(tmp_path, scheme):
    r = random.Random(2)
    disk, fs, dst = tmp_path / "disk", tmp_path / "fs", tmp_path / "backup.img"
    (start, psize), (start2, psize2) = gpt_disk(disk, 200 * MiB, [96, 64], scheme)
    files = {f"f{i}": r.randbytes(r.randrange(1000, 4 * MiB)) for i in range(8)}
    make_ext4(fs, f"{psize // 1024}k", files, "-b", "4096")
    embed(disk, fs, start)
    other = r.randbytes(psize2)  # no file system: read in full
    embed_bytes = tmp_path / "other"
    embed_bytes.write_bytes(other)
    embed(disk, embed_bytes, start2)
    # garbage where the file system has free blocks: must not reach the backup
    secret = b"deleted-secret-" + r.randbytes(48)
    debugfs_tmp = tmp_path / "secret"
    debugfs_tmp.write_bytes(secret * 2000)
    debugfs(fs, f"write {debugfs_tmp} s")
    debugfs(fs, "rm /s")
    embed(disk, fs, start)

    def push_and_check(expect: dict[str, bytes]) -> None:
        stats = local_push(str(disk), str(dst), SKIP)
        assert "free-blocks" in stats.map.split("+")  # the disk file is sparse too
        # only the ext4 partition is narrowed, and not to nothing
        assert stats.bytes_read < disk.stat().st_size - 40 * MiB
        assert stats.warnings == []  # partition 2 holds no file system: read, silently
        data = newest(dst)
        assert secret not in data  # a deleted file's blocks are stored as zeros
        assert data[start2 : start2 + psize2] == other
        assert data[: start] == disk.read_bytes()[:start]  # the partition table, read
        restored = extract(data, start, psize, tmp_path / "restored")
        run("e2fsck", "-fn", str(restored))
        assert ext4_files(restored, sorted(expect), tmp_path) == expect
        with Image.open(str(dst)) as img:
            assert img.generations()[-1].meta["map"] == stats.map

    push_and_check(files)
    # between pushes: a file deleted, one overwritten, new ones written
    new = tmp_path / "new"
    debugfs(fs, "rm /f1")
    del files["f1"]
    new.write_bytes(data := r.randbytes(3 * MiB))
    debugfs(fs, "rm /f3", f"write {new} f3")
    files["f3"] = data
    for i in range(8, 12):
        new.write_bytes(data := r.randbytes(r.randrange(1000, 2 * MiB)))
        debugfs(fs, f"write {new} f{i}")
        files[f"f{i}"] = data
    embed(disk, fs, start)
    push_and_check(files)
    debugfs(fs, "rm /f0", "rm /f5")
    del files["f0"], files["f5"]
    embed(disk, fs, start)
    push_and_check(files)


@pytest.mark.process
@needs_e2fs
def test_a_whole_disk_ext4_reads_a_fraction_and_says_so_when_it_cannot(tmp_path):
    r = random.Random(3)
    fs, dst = tmp_path / "fs", tmp_path / "b.img"
    files = {f"f{i}": r.randbytes(2 * MiB) for i in range(5)}
    make_ext4(fs, "128M", files, "-b", "4096")
    fs.write_bytes(fs.read_bytes())  # no holes: only the free-block map narrows the scan
    stats = local_push(str(fs), str(dst), SKIP)
    assert stats.map == "free-blocks" and stats.warnings == []
    used = fs.stat().st_size - len(dumpe2fs_free(fs)) * 4096  # files, journal, metadata
    assert used < 48 * MiB
    # what the file system uses, and a little more: its maps and what small gaps join
    assert used <= stats.bytes_read <= used + 2 * MiB
    restored = extract(newest(dst), 0, fs.stat().st_size, tmp_path / "r")
    assert ext4_files(restored, sorted(files), tmp_path) == files
    # a file system marked not cleanly unmounted is read in full, loudly
    debugfs(fs, "ssv state 0")
    stats = local_push(str(fs), str(dst), SKIP)
    assert stats.map == "full" and stats.bytes_read >= fs.stat().st_size
    assert any("--skip-free-blocks: the disk: ext4 is mounted" in w for w in stats.warnings)
    # no file system at all: said too
    plain = tmp_path / "plain"
    plain.write_bytes(r.randbytes(4 * MiB))
    stats = local_push(str(plain), str(tmp_path / "p.img"), SKIP)
    assert any("no ext2/3/4 or xfs" in w for w in stats.warnings)


@contextlib.contextmanager
def mounted(fs: Path, where: Path, *opts: str):
    where.mkdir(exist_ok=True)
    run("mount", "-o", ",".join(("loop", *opts)), str(fs), str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.process
@pytest.mark.root
@needs_root_xfs
@pytest.mark.skipif(not shutil.which("sgdisk"), reason="needs gdisk")
def test_xfs_partition_files_written_deleted_and_overwritten_all_restore(tmp_path):
    r = random.Random(4)
    disk, fs, dst, mnt = tmp_path / "disk", tmp_path / "fs", tmp_path / "b.img", tmp_path / "m"
    ((start, psize),) = gpt_disk(disk, 400 * MiB, [360])
    with open(fs, "wb") as f:
        f.truncate(psize)
    run("mkfs.xfs", "-q", "-f", str(fs))
    files: dict[str, bytes] = {}
    secret = b"deleted-secret-" + r.randbytes(48)

    def change(write: dict[str, bytes], delete: list[str]) -> None:
        with mounted(fs, mnt) as m:
            for name in delete:
                (m / name).unlink()
                del files[name]
            for name, data in write.items():
                (m / name).write_bytes(data)
                files[name] = data
        embed(disk, fs, start)

    def push_and_check() -> None:
        stats = local_push(str(disk), str(dst), SKIP)
        assert "free-blocks" in stats.map.split("+") and stats.warnings == []
        assert stats.bytes_read < disk.stat().st_size // 2
        data = newest(dst)
        assert secret not in data
        restored = extract(data, start, psize, tmp_path / "restored")
        run("xfs_repair", "-n", str(restored))
        with mounted(restored, tmp_path / "rm", "ro") as m:
            assert {p.name: p.read_bytes() for p in m.iterdir()} == files

    change({f"f{i}": r.randbytes(r.randrange(1000, 6 * MiB)) for i in range(10)}
           | {"s": secret * 4000}, [])
    change({}, ["s"])
    push_and_check()
    change({"f3": r.randbytes(5 * MiB)} | {f"g{i}": r.randbytes(MiB) for i in range(5)},
           ["f1", "f7"])
    push_and_check()
    # a copy taken while mounted has a log to replay: read in full, loudly
    with mounted(fs, mnt) as m:
        (m / "h").write_bytes(r.randbytes(MiB))
        os.sync()
        embed(disk, fs, start)
    stats = local_push(str(disk), str(dst), SKIP)
    assert "free-blocks" not in stats.map
    assert any("xfs is mounted or was not cleanly unmounted" in w for w in stats.warnings)


@pytest.mark.pure
def test_garbage_is_no_file_system_and_a_lying_superblock_is_not_believed():
    r = random.Random(5)
    for size in (0, 100, 600, 4096, 1 << 20):
        data = r.randbytes(size)
        m = free_blocks(lambda o, n, data=data: data[o : o + n], size)
        assert m.free == []
    # an ext4 superblock claiming more blocks than the disk holds
    sb = bytearray(1024)
    sb[56:58] = (0xEF53).to_bytes(2, "little")
    sb[58:60] = (1).to_bytes(2, "little")  # clean
    sb[4:8] = (10**6).to_bytes(4, "little")
    sb[32:36] = (8192).to_bytes(4, "little")
    disk = bytes(1024) + bytes(sb) + bytes(1 << 20)
    m = free_blocks(lambda o, n: disk[o : o + n], len(disk))
    assert m.free == [] and "inconsistent" in m.problems[0]
