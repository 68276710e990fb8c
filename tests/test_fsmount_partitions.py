"""Partition table parsing on disks built with sgdisk/sfdisk/mkfs (pure, no FUSE)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from support import diskbuild
from support.diskbuild import BuiltDisk

from diskrsync.compression.partitions import (
    NO_TABLE,
    Partition,
    label_entries,
    read_partition_table,
)

LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"


def reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: data[offset : offset + length]


def need(*tools: str) -> None:
    missing = diskbuild.missing_tools(*tools)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: gdisk, fdisk, e2fsprogs, xfsprogs)")


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
