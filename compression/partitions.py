"""Partition tables of a disk image: MBR (with extended/logical partitions) and GPT.

Pure code: everything goes through a ``read(offset, length) -> bytes`` callable, so it works on a
snapshot, a file or a bytes object alike. A table that fails its checks is treated as no table
(an empty result), never as an error: the mount still shows the whole disk.

Numbering follows Linux: MBR primaries keep their slot number (1-4, holes allowed), logical
partitions count from 5 in chain order; GPT partitions keep their entry number (1-based). MBR
extended containers are not listed (they hold no file system).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

ReadFn = Callable[[int, int], bytes]

SECTOR = 512
_GPT_SIGNATURE = b"EFI PART"
_MBR_PROTECTIVE = 0xEE
_MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_MAX_LOGICAL = 128  # a chain longer than this is a loop or garbage
_MAX_GPT_ENTRIES = 1024
_ZERO_GUID = b"\x00" * 16


@dataclass(frozen=True)
class Partition:
    """One partition: a byte range of the disk."""

    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes (clipped to the disk)
    label: str  # GPT partition name; "" for MBR
    type: str  # GPT type GUID (lower case) or MBR type as "0x83"
    fs_label: str = ""  # the label of the file system in it (see filesystem_label)


@dataclass(frozen=True)
class PartitionTable:
    """What the disk holds: ``scheme`` is "gpt", "mbr" or "" (no recognised table)."""

    scheme: str
    partitions: tuple[Partition, ...]
    sector_size: int = SECTOR


NO_TABLE = PartitionTable("", ())


def _exact(read: ReadFn, offset: int, length: int) -> bytes | None:
    data = read(offset, length)
    return data if len(data) == length else None


def _clip(number: int, start: int, size: int, disk_size: int, label: str, ptype: str) -> (
    Partition | None
):
    if size <= 0 or start >= disk_size or start < 0:
        return None
    return Partition(number, start, min(size, disk_size - start), label, ptype)


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(slot 1-4, type, first LBA, sector count) of the non-empty entries."""
    out = []
    for slot in range(4):
        entry = sector[446 + 16 * slot : 446 + 16 * (slot + 1)]
        status, ptype, lba, count = entry[0], entry[4], *struct.unpack_from("<II", entry, 8)
        if ptype == 0 or count == 0:
            continue
        if status not in (0x00, 0x80):
            raise ValueError("bad MBR status byte")
        out.append((slot + 1, ptype, lba, count))
    return out


def _parse_gpt_at(read: ReadFn, disk_size: int, header_offset: int, sector: int) -> (
    PartitionTable | None
):
    header = _exact(read, header_offset, sector)
    if header is None or header[:8] != _GPT_SIGNATURE:
        return None
    (hsize,) = struct.unpack_from("<I", header, 12)
    if not 92 <= hsize <= sector:
        return None
    (hcrc,) = struct.unpack_from("<I", header, 16)
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:hsize]) != hcrc:
        return None
    entries_lba, count, esize, ecrc = struct.unpack_from("<QIII", header, 72)
    if esize < 128 or esize % 8 or not 0 < count <= _MAX_GPT_ENTRIES:
        return None
    table = _exact(read, entries_lba * sector, count * esize)
    if table is None or zlib.crc32(table) != ecrc:
        return None
    parts = []
    for i in range(count):
        entry = table[i * esize : (i + 1) * esize]
        if entry[:16] == _ZERO_GUID:
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            continue
        name = entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        ptype = str(uuid.UUID(bytes_le=entry[:16]))
        part = _clip(i + 1, first * sector, (last - first + 1) * sector, disk_size, name, ptype)
        if part is not None:
            parts.append(part)
    return PartitionTable("gpt", tuple(parts), sector)


def _parse_gpt(read: ReadFn, disk_size: int) -> PartitionTable | None:
    for sector in (SECTOR, 4096):
        primary = _parse_gpt_at(read, disk_size, sector, sector)
        if primary is not None:
            return primary
    for sector in (SECTOR, 4096):  # primary damaged: the backup header is the last sector
        if disk_size >= 3 * sector:
            backup = _parse_gpt_at(read, disk_size, disk_size // sector * sector - sector, sector)
            if backup is not None:
                return backup
    return None


def _parse_mbr(read: ReadFn, disk_size: int, entries: list[tuple[int, int, int, int]]) -> (
    PartitionTable
):
    parts: list[Partition] = []
    extended: tuple[int, int] | None = None
    for slot, ptype, lba, count in entries:
        if ptype in _MBR_EXTENDED:
            if extended is None:
                extended = (lba, count)
            continue
        part = _clip(slot, lba * SECTOR, count * SECTOR, disk_size, "", f"0x{ptype:02x}")
        if part is not None:
            parts.append(part)
    if extended is not None:
        parts.extend(_parse_logical(read, disk_size, extended[0]))
    return PartitionTable("mbr", tuple(parts))


def _parse_logical(read: ReadFn, disk_size: int, ext_start: int) -> list[Partition]:
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr_lba = ext_start
    number = 5
    while ebr_lba not in seen and len(seen) < _MAX_LOGICAL:
        seen.add(ebr_lba)
        ebr = _exact(read, ebr_lba * SECTOR, SECTOR)
        if ebr is None or ebr[510:512] != b"\x55\xaa":
            break
        try:
            entries = _mbr_entries(ebr)
        except ValueError:
            break
        nxt = None
        for slot, ptype, lba, count in entries:
            if slot == 1 and ptype not in _MBR_EXTENDED:
                part = _clip(
                    number, (ebr_lba + lba) * SECTOR, count * SECTOR, disk_size, "",
                    f"0x{ptype:02x}",
                )
                if part is not None:
                    parts.append(part)
                number += 1
            elif slot == 2 and ptype in _MBR_EXTENDED:
                nxt = ext_start + lba
        if nxt is None:
            break
        ebr_lba = nxt
    return parts


def read_partition_table(read: ReadFn, disk_size: int) -> PartitionTable:
    """Parse the disk's partition table; ``NO_TABLE`` when there is none or it is garbage."""
    mbr = _exact(read, 0, SECTOR) if disk_size >= SECTOR else None
    if mbr is None or mbr[510:512] != b"\x55\xaa":
        # No MBR signature: a GPT disk always has a (protective) MBR, so this is no table.
        return NO_TABLE
    try:
        entries = _mbr_entries(mbr)
    except ValueError:
        return NO_TABLE
    if any(ptype == _MBR_PROTECTIVE for _, ptype, _, _ in entries):
        return _parse_gpt(read, disk_size) or NO_TABLE
    if not entries:
        return NO_TABLE
    # A boot sector of a whole-disk file system (FAT, NTFS) also ends in 55 AA: reject entries
    # that start at sector 0 or past the end, which such a boot sector's code bytes rarely
    # avoid. (A partition that merely runs past the end is clipped: a truncated image.)
    if any(lba == 0 or lba * SECTOR >= disk_size for _, _, lba, _ in entries):
        return NO_TABLE
    return _parse_mbr(read, disk_size, entries)


def read_partitions(read: ReadFn, disk_size: int) -> tuple[Partition, ...]:
    """Shorthand for ``read_partition_table(...).partitions``."""
    return read_partition_table(read, disk_size).partitions


def label_entries(partitions: tuple[Partition, ...], *,
                  filesystem: bool = False) -> dict[str, Partition]:
    """File names for ``by-partlabel`` (GPT partition names) or, with ``filesystem``,
    ``by-label`` (file system labels): usable labels, first (lowest-numbered) one wins.

    A "/" becomes "_" and NUL is dropped; empty labels and "." / ".." are skipped.
    """
    out: dict[str, Partition] = {}
    for part in sorted(partitions, key=lambda p: p.number):
        label = part.fs_label if filesystem else part.label
        name = label.replace("\0", "").replace("/", "_")
        if name in ("", ".", "..") or name in out:
            continue
        out[name] = part
    return out


# -- file system labels (what udev's by-label shows) -----------------------------------------

_EXT_MAGIC = b"\x53\xef"  # s_magic 0xEF53, little endian, at superblock offset 56
_XFS_MAGIC = b"XFSB"
_BTRFS_SUPER = 64 * 1024
_BTRFS_MAGIC = b"_BHRfS_M"
_FAT_NO_LABEL = "NO NAME"


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def filesystem_label(read: ReadFn, start: int, size: int) -> str:
    """The label of the file system in ``[start, start + size)``: ext2/3/4, XFS, Btrfs or
    FAT, read from its superblock or boot sector as blkid does; "" when it has none, is
    none of these, or the fields fail their magic checks."""

    def at(offset: int, length: int) -> bytes | None:
        return _exact(read, start + offset, length) if offset + length <= size else None

    ext = at(1024, 256)
    if ext is not None and ext[56:58] == _EXT_MAGIC:
        return _text(ext[120:136])  # s_volume_name
    head = at(0, SECTOR)
    if head is not None and head[:4] == _XFS_MAGIC:
        return _text(head[108:120])  # sb_fname
    btrfs = at(_BTRFS_SUPER, 4096)
    if btrfs is not None and btrfs[64:72] == _BTRFS_MAGIC:
        return _text(btrfs[299:555])  # label[256]
    if head is not None and head[510:512] == b"\x55\xaa":
        # FAT32 keeps its extended BPB at 64, FAT12/16 at 36: boot signature 0x29, then the
        # serial and an 11-byte label padded with spaces ("NO NAME" when unset)
        if head[82:87] == b"FAT32" and head[66] == 0x29:
            label = head[71:82]
        elif head[54:59] in (b"FAT12", b"FAT16") and head[38] == 0x29:
            label = head[43:54]
        else:
            return ""
        text = label.decode("latin-1").rstrip(" \0")
        return "" if text == _FAT_NO_LABEL else text
    return ""
