"""Partition table parsing on disks built with sgdisk/sfdisk/mkfs (pure, no FUSE)."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support import diskbuild
from support.diskbuild import BuiltDisk

from diskrsync.compression.partitions import (
    NO_TABLE,
    Partition,
    filesystem_label,
    label_entries,
    read_partition_table,
)

LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"


def reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: data[offset : offset + length]


def need(*tools: str) -> None:
    missing = diskbuild.missing_tools(*tools)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: gdisk, fdisk, e2fsprogs, xfsprogs, "
                    f"btrfs-progs, dosfstools)")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disks")


@pytest.fixture(scope="module")
def gpt(work: Path) -> BuiltDisk:
    need("sgdisk", "sfdisk", "mkfs.ext4", "mkfs.xfs")
    return diskbuild.build_gpt_disk(work / "gpt.img", work)


@pytest.fixture(scope="module")
def mbr(work: Path) -> BuiltDisk:
    need("sfdisk", "mkfs.ext4", "mkfs.xfs")
    return diskbuild.build_mbr_disk(work / "mbr.img", work)


@pytest.mark.process
def test_gpt_with_names(gpt: BuiltDisk) -> None:
    table = read_partition_table(reader(gpt.path.read_bytes()), gpt.size)
    assert table.scheme == "gpt"
    assert table.partitions == (
        Partition(1, gpt.partition(1).start, gpt.partition(1).size, "root", LINUX_FS),
        Partition(2, gpt.partition(2).start, gpt.partition(2).size, "data", LINUX_FS),
    )


@pytest.mark.process
def test_gpt_backup_header_used_when_primary_is_damaged(gpt: BuiltDisk) -> None:
    data = bytearray(gpt.path.read_bytes())
    data[512 + 100] ^= 0xFF  # primary header fails its CRC
    table = read_partition_table(reader(bytes(data)), len(data))
    assert [(p.number, p.label) for p in table.partitions] == [(1, "root"), (2, "data")]


@pytest.mark.process
def test_gpt_partition_past_the_end_is_clipped(gpt: BuiltDisk) -> None:
    data = gpt.path.read_bytes()
    cut = gpt.partition(2).start + 1024 * 1024
    table = read_partition_table(reader(data[:cut]), cut)
    assert table.partitions[1].size == 1024 * 1024


@pytest.mark.process
def test_mbr_with_extended_and_logical(mbr: BuiltDisk) -> None:
    table = read_partition_table(reader(mbr.path.read_bytes()), mbr.size)
    assert table.scheme == "mbr"
    assert [(p.number, p.start, p.size, p.type, p.label) for p in table.partitions] == [
        (b.number, b.start, b.size, "0x83", "") for b in mbr.partitions
    ]
    assert [p.number for p in table.partitions] == [1, 5, 6]  # the extended (2) is not listed


@pytest.mark.process
def test_no_table_on_whole_disk_filesystem(work: Path) -> None:
    need("mkfs.ext4")
    disk = diskbuild.build_plain_disk(work / "plain.img", work)
    assert read_partition_table(reader(disk.path.read_bytes()), disk.size) == NO_TABLE


@pytest.mark.process
def test_protective_mbr_without_gpt_is_empty(work: Path) -> None:
    need("sgdisk")
    disk = diskbuild.build_protective_only_disk(work / "prot.img", work)
    assert read_partition_table(reader(disk.path.read_bytes()), disk.size) == NO_TABLE


@pytest.mark.inproc
def test_garbage_is_empty(work: Path) -> None:
    disk = diskbuild.build_garbage_disk(work / "garbage.img")
    assert read_partition_table(reader(disk.path.read_bytes()), disk.size) == NO_TABLE
    assert read_partition_table(reader(b""), 0) == NO_TABLE
    assert read_partition_table(reader(bytes(300)), 300) == NO_TABLE


def _mbr_entry(ptype: int, lba: int, count: int) -> bytes:
    return bytes([0, 0, 0, 0, ptype, 0, 0, 0]) + struct.pack("<II", lba, count)


@pytest.mark.pure
def test_ebr_chain_loop_terminates() -> None:
    size = 4 * 1024 * 1024
    disk = bytearray(size)
    disk[446:462] = _mbr_entry(0x05, 100, 4000)
    disk[510:512] = b"\x55\xaa"
    ebr = 100 * 512
    disk[ebr + 446 : ebr + 462] = _mbr_entry(0x83, 10, 50)
    disk[ebr + 462 : ebr + 478] = _mbr_entry(0x05, 0, 1000)  # next EBR: itself
    disk[ebr + 510 : ebr + 512] = b"\x55\xaa"
    table = read_partition_table(reader(bytes(disk)), size)
    assert table.partitions == (Partition(5, 110 * 512, 50 * 512, "", "0x83"),)


@pytest.mark.pure
def test_label_entries() -> None:
    parts = (
        Partition(3, 0, 1, "x/y", "t"),
        Partition(1, 0, 1, "root", "t"),
        Partition(2, 0, 1, "root", "t"),
        Partition(4, 0, 1, "", "t"),
        Partition(5, 0, 1, "..", "t"),
    )
    entries = label_entries(parts)
    assert {name: p.number for name, p in entries.items()} == {"root": 1, "x_y": 3}


@pytest.mark.pure
def test_label_entries_by_file_system_label() -> None:
    parts = (
        Partition(1, 0, 1, "root", "t", fs_label="ROOTFS"),
        Partition(2, 0, 1, "data", "t", fs_label=""),
        Partition(3, 0, 1, "", "t", fs_label="a/b"),
    )
    assert {n: p.number for n, p in label_entries(parts, filesystem=True).items()} == {
        "ROOTFS": 1, "a_b": 3}
    assert {n: p.number for n, p in label_entries(parts).items()} == {"root": 1, "data": 2}


def _file_reader(path: Path) -> Callable[[int, int], bytes]:
    fd = os.open(path, os.O_RDONLY)
    return lambda offset, length: os.pread(fd, length, offset)


def _mkfs(kind: str, path: Path, label: str | None, work: Path) -> None:
    """A file system image of ``kind`` made by its own mkfs (labelled unless None)."""
    sizes = {"ext4": 8, "xfs": 64, "btrfs": 128, "fat16": 16, "fat32": 40}
    size = sizes[kind] << 20
    if kind == "xfs":
        diskbuild.make_xfs(path, size, label or "", {}, work)  # "" is no label to mkfs.xfs
        return
    if kind.startswith("fat"):
        cmd = ["mkfs.fat", "-C", "-F", kind[3:], *(["-n", label] if label else []),
               str(path), str(size // 1024)]
    else:
        with open(path, "wb") as f:
            f.truncate(size)
        cmd = [f"mkfs.{kind}", "-q", "-f" if kind == "btrfs" else "-F",
               *(["-L", label] if label else []), str(path)]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.mark.process
@pytest.mark.parametrize(("kind", "label"), [
    ("ext4", "root fs-1"), ("xfs", "xdata"), ("btrfs", "pool/äöü"), ("fat16", "BOOT"),
    ("fat32", "EFI SYSTEM"),
])
def test_filesystem_labels_as_their_mkfs_wrote_them(kind: str, label: str,
                                                    work: Path) -> None:
    tool = {"fat16": "mkfs.fat", "fat32": "mkfs.fat"}.get(kind, f"mkfs.{kind}")
    need(tool)
    for want in (label, None):
        image = work / f"label-{kind}.img"
        image.unlink(missing_ok=True)
        _mkfs(kind, image, want, work)
        size = image.stat().st_size
        assert filesystem_label(_file_reader(image), 0, size) == (want or "")
        # the same file system inside a disk, at an offset
        disk = work / f"disk-{kind}.img"
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        diskbuild.copy_into(disk, image, 1 << 20)
        assert filesystem_label(_file_reader(disk), 1 << 20, size) == (want or "")
        disk.unlink()
        image.unlink()


@pytest.mark.pure
def test_filesystem_label_needs_the_magic() -> None:
    blank = bytes(128 * 1024)
    assert filesystem_label(reader(blank), 0, len(blank)) == ""
    # ext magic without room for the superblock, a FAT boot sector without its signature
    fake = bytearray(blank)
    fake[1024 + 56 : 1024 + 58] = b"\x53\xef"
    fake[1024 + 120 : 1024 + 124] = b"name"
    assert filesystem_label(reader(bytes(fake)), 0, len(fake)) == "name"
    assert filesystem_label(reader(bytes(fake)), 0, 1100) == ""
    fat = bytearray(blank)
    fat[510:512] = b"\x55\xaa"
    fat[54:59] = b"FAT16"
    fat[43:54] = b"LABEL      "
    assert filesystem_label(reader(bytes(fat)), 0, len(fat)) == ""  # no 0x29 signature
    fat[38] = 0x29
    assert filesystem_label(reader(bytes(fat)), 0, len(fat)) == "LABEL"
    fat[43:54] = b"NO NAME    "
    assert filesystem_label(reader(bytes(fat)), 0, len(fat)) == ""
