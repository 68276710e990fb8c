"""Which bytes of a disk its file systems mark free (``push --skip-free-blocks``).

Pure code over a ``read(offset, length) -> bytes`` callable, like ``partitions.py``: the disk's
partition table (or the whole disk) is searched for ext2/3/4 and xfs, and their own allocation
maps are read: ext4's block group descriptors and block bitmaps (``flex_bg``, ``64bit``,
``BLOCK_UNINIT`` groups, ``bigalloc`` clusters), xfs's per-AG free-space B+tree by block
number. Every count is checked against what the file system says of itself (a group's free
count, an AG's ``agf_freeblks``); a file system that is not cleanly unmounted, uses a feature
not understood here, or fails a check is not narrowed at all, and the reason is reported.

Why the result can be trusted: a block a file (or the file system's own metadata) uses is
marked allocated in these maps by the file system before it is written, and the maps are on
disk once the file system is cleanly unmounted (ext4 records that in its superblock; a
snapshot of a mounted file system needs its journal replayed first). What is free holds
nothing a file refers to: deleted files' old contents, which a backup then does not keep.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from diskrsync.base.errors import DataError, ReadError
from diskrsync.compression.partitions import read_partition_table

ReadFn = Callable[[int, int], bytes]

# ext2/3/4 superblock flags
_EXT_MAGIC = 0xEF53
_EXT_VALID_FS, _EXT_ERROR_FS = 0x1, 0x2
_EXT_RECOVER, _EXT_JOURNAL_DEV, _EXT_META_BG, _EXT_64BIT = 0x4, 0x8, 0x10, 0x80
_EXT_EXTENTS, _EXT_FLEX_BG = 0x40, 0x200
_EXT_KNOWN_INCOMPAT = (0x2 | _EXT_RECOVER | _EXT_META_BG | _EXT_EXTENTS | _EXT_64BIT | 0x100
                       | _EXT_FLEX_BG | 0x400 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000)
_EXT_RO_SPARSE_SUPER, _EXT_RO_BIGALLOC = 0x1, 0x200
_EXT_COMPAT_SPARSE_SUPER2 = 0x200
_EXT_RO_GDT_CSUM, _EXT_RO_METADATA_CSUM = 0x10, 0x400
_EXT_BLOCK_UNINIT = 0x2

# xfs
_XFS_MAGIC, _XFS_AGF_MAGIC = b"XFSB", b"XAGF"
_XFS_BNO_MAGICS = {b"ABTB": 16, b"AB3B": 56}  # v4 and v5 (CRC) short-form block headers
_XFS_MAX_DEPTH = 8
_MAX_GROUPS = 1 << 22  # ext4 block groups or xfs AGs: metadata read is bounded by this


class Distrust(Exception):
    """This file system's maps are not used (the message says why); it is read in full."""


@dataclass
class FreeMap:
    """Free byte ranges (offset, length) of the whole disk, ascending, and one line per file
    system or partition saying what was found there."""

    free: list[tuple[int, int]] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # e.g. "partition 1: ext4, 80% free"
    problems: list[str] = field(default_factory=list)  # file systems read in full, and why

    @property
    def free_bytes(self) -> int:
        return sum(n for _o, n in self.free)


def free_blocks(read: ReadFn, size: int) -> FreeMap:
    """The free blocks of the ext2/3/4 and xfs file systems on a disk: on each partition of
    its GPT or MBR table, or the whole disk when it has none."""
    table = read_partition_table(read, size)
    regions = [(f"partition {p.number}", p.start, p.size) for p in table.partitions]
    if not regions:
        regions = [("the disk", 0, size)]
    out = FreeMap()
    for name, start, length in regions:

        def sub(offset: int, n: int, start: int = start, length: int = length) -> bytes:
            if offset < 0 or offset + n > length:
                raise Distrust(f"its metadata points past its end (offset {offset})")
            return read(start + offset, n)

        try:
            found = ext_free(sub, length) or xfs_free(sub, length)
        except Distrust as e:
            out.problems.append(f"{name}: {e}: read in full")
            continue
        except (OSError, ValueError, ReadError, DataError) as e:  # a bad sector or chunk
            out.problems.append(f"{name}: its allocation map cannot be read ({e}): read in full")
            continue
        if found is None:
            continue
        kind, total, free = found
        out.free += [(start + o, n) for o, n in free]
        share = sum(n for _o, n in free) * 100 // max(total, 1)
        out.found.append(f"{name}: {kind}, {share}% free")
    if not out.found and not out.problems:
        out.problems.append("no ext2/3/4 or xfs file system found: nothing skipped")
    return out


# -- ext2/3/4 --------------------------------------------------------------------------------


def _u16(b: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", b, at)[0])


def _u32(b: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", b, at)[0])


def _zero_runs(bitmap: bytes, nbits: int) -> list[tuple[int, int]]:
    """(first bit, count) of each run of 0 bits among the first ``nbits`` (bit i is bit
    i % 8 of byte i // 8, ext4's order)."""
    x = int.from_bytes(bitmap, "little")
    free = ~x & ((1 << nbits) - 1)
    runs = []
    while free:
        start = (free & -free).bit_length() - 1
        above = x >> start
        end = start + (above & -above).bit_length() - 1 if above else nbits
        end = min(end, nbits)
        runs.append((start, end - start))
        free &= ~((1 << end) - 1)
    return runs


def ext_free(read: ReadFn, length: int) -> tuple[str, int, list[tuple[int, int]]] | None:
    """(kind, bytes of the file system, free byte ranges) of an ext2/3/4 file system at the
    start of ``read``'s space, None when there is none; Distrust when its maps are not used."""
    if length < 2048:
        return None
    sb = read(1024, 1024)
    if len(sb) < 1024 or _u16(sb, 56) != _EXT_MAGIC:
        return None
    incompat, ro = _u32(sb, 96), _u32(sb, 100)
    kind = "ext4" if incompat & (_EXT_EXTENTS | _EXT_FLEX_BG | _EXT_64BIT) else "ext2/3"
    state = _u16(sb, 58)
    if incompat & _EXT_RECOVER or not state & _EXT_VALID_FS:
        raise Distrust(f"{kind} is mounted or was not cleanly unmounted (its journal needs "
                       f"recovery)")
    if state & _EXT_ERROR_FS:
        raise Distrust(f"{kind} has errors (run e2fsck)")
    if incompat & ~_EXT_KNOWN_INCOMPAT or incompat & (_EXT_META_BG | _EXT_JOURNAL_DEV):
        raise Distrust(f"{kind} uses features this map reader does not know "
                       f"(incompat 0x{incompat:x})")
    log_bs = _u32(sb, 24)
    if log_bs > 6:
        raise Distrust(f"{kind} claims a block size of 2^{10 + log_bs}")
    bs = 1024 << log_bs
    is64 = bool(incompat & _EXT_64BIT)
    blocks = _u32(sb, 4) | ((_u32(sb, 0x150) << 32) if is64 else 0)
    first = _u32(sb, 20)
    bpg = _u32(sb, 32)
    ratio = 1
    if ro & _EXT_RO_BIGALLOC:
        log_cs = _u32(sb, 28)
        if log_cs < log_bs or log_cs - log_bs > 16:
            raise Distrust(f"{kind} claims a cluster size of 2^{10 + log_cs}")
        ratio = 1 << (log_cs - log_bs)
    cpg = bpg // ratio
    if blocks * bs > length or first >= blocks or not bpg or bpg % 8 or cpg * ratio != bpg \
            or cpg > 8 * bs:
        raise Distrust(f"{kind} superblock is inconsistent ({blocks} blocks of {bs} bytes, "
                       f"{bpg} per group, in {length} bytes)")
    groups = -(-(blocks - first) // bpg)
    if groups > _MAX_GROUPS:  # a real one has 8 * block size blocks per group
        raise Distrust(f"{kind} claims {groups} block groups")
    desc = _u16(sb, 254) if is64 else 32
    if desc < 32 or desc & (desc - 1) or desc > bs or (is64 and desc < 64):
        raise Distrust(f"{kind} claims a group descriptor size of {desc}")
    ipg, inode_size = _u32(sb, 40), (_u16(sb, 88) if _u32(sb, 76) >= 1 else 128)
    itable = -(-ipg * inode_size // bs)
    gdt_blocks = -(-groups * desc // bs)
    reserved_gdt = _u16(sb, 206)
    uninit_ok = bool(ro & (_EXT_RO_GDT_CSUM | _EXT_RO_METADATA_CSUM))
    gdt = read((first + 1) * bs, groups * desc)
    if len(gdt) != groups * desc:
        raise Distrust(f"{kind} group descriptors are cut short")

    compat = _u32(sb, 92)

    def backup(g: int) -> bool:
        """Whether group g starts with a superblock backup (sparse_super, sparse_super2)."""
        if compat & _EXT_COMPAT_SPARSE_SUPER2:
            return g == 0 or g in (_u32(sb, 0x24C), _u32(sb, 0x250))
        if g <= 1 or not ro & _EXT_RO_SPARSE_SUPER:
            return True
        for p in (3, 5, 7):
            n = p
            while n < g:
                n *= p
            if n == g:
                return True
        return False

    def hi(d: bytes, at: int) -> int:
        return _u32(d, at) << 32 if desc >= 64 else 0

    # every group's own metadata (bitmaps, inode table) wherever flex_bg put it: used
    meta: list[tuple[int, int]] = []
    descs = []
    for g in range(groups):
        d = gdt[g * desc : (g + 1) * desc]
        bb, ib = _u32(d, 0) | hi(d, 0x20), _u32(d, 4) | hi(d, 0x24)
        it = _u32(d, 8) | hi(d, 0x28)
        nfree = _u16(d, 12) | ((_u16(d, 0x2C) << 16) if desc >= 64 else 0)
        if max(bb, ib, it + itable - 1) >= blocks:
            raise Distrust(f"{kind} group {g} places its metadata past the end")
        meta += [(bb, 1), (ib, 1), (it, itable)]
        descs.append((bb, nfree, _u16(d, 18)))
    free_blocks_: list[tuple[int, int]] = []  # (first block, count)
    for g, (bb, nfree, flags) in enumerate(descs):
        gstart = first + g * bpg
        gblocks = min(bpg, blocks - gstart)
        units = -(-gblocks // ratio)
        if uninit_ok and flags & _EXT_BLOCK_UNINIT:
            # no bitmap written yet: nothing but metadata is in use (its own and other
            # groups', cut below) and the superblock and descriptor backup it may start with
            head = min(1 + gdt_blocks + reserved_gdt, gblocks) if backup(g) else 0
            runs = [(gstart + head, gblocks - head)] if head < gblocks else []
            if sum(n for _s, n in subtract_ranges(runs, meta)) > nfree * ratio:
                raise Distrust(f"{kind} group {g} has more free blocks than it counts")
            free_blocks_ += runs
            continue
        bitmap = read(bb * bs, bs)
        if len(bitmap) != bs:
            raise Distrust(f"{kind} group {g}'s block bitmap is cut short")
        runs_u = _zero_runs(bitmap[: -(-units // 8)], units)
        if sum(n for _s, n in runs_u) != nfree:
            raise Distrust(f"{kind} group {g}'s block bitmap does not match its free count "
                           f"({sum(n for _s, n in runs_u)} free, descriptor says {nfree})")
        for s, n in runs_u:
            a = gstart + s * ratio
            free_blocks_.append((a, min(n * ratio, gstart + gblocks - a)))
    free = subtract_ranges(free_blocks_, meta)
    return kind, blocks * bs, [(b * bs, n * bs) for b, n in free]


def subtract_ranges(ranges: list[tuple[int, int]],
                    cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, count) ``ranges`` less every unit in ``cut`` (both in the same units), sorted."""
    starts: list[int] = []
    ends: list[int] = []
    for s, n in sorted(cut):  # merged, so that the ends ascend too
        if n <= 0:
            continue
        if ends and s <= ends[-1]:
            ends[-1] = max(ends[-1], s + n)
        else:
            starts.append(s)
            ends.append(s + n)
    out = []
    for s, n in sorted(ranges):
        a, b = s, s + n
        i = bisect.bisect_right(ends, a)  # the first cut that ends after a
        while a < b and i < len(starts) and starts[i] < b:
            if starts[i] > a:
                out.append((a, starts[i] - a))
            a = ends[i]
            i += 1
        if a < b:
            out.append((a, b - a))
    return out


# -- xfs ---------------------------------------------------------------------------------


def _be32(b: bytes, at: int) -> int:
    return int(struct.unpack_from(">I", b, at)[0])


def xfs_free(read: ReadFn, length: int) -> tuple[str, int, list[tuple[int, int]]] | None:
    """("xfs", bytes of the file system, free byte ranges) from each allocation group's
    free-space B+tree by block number, checked against the AG's free count; None when there
    is no xfs here."""
    if length < 512:
        return None
    sb = read(0, 512)
    if len(sb) < 512 or sb[:4] != _XFS_MAGIC:
        return None
    bs, dblocks = _be32(sb, 4), int(struct.unpack_from(">Q", sb, 8)[0])
    agblocks, agcount = _be32(sb, 84), _be32(sb, 88)
    sectsize = int(struct.unpack_from(">H", sb, 102)[0])
    if not (512 <= bs <= 65536 and bs & (bs - 1) == 0 and 512 <= sectsize <= bs
            and sectsize & (sectsize - 1) == 0 and agblocks and agcount
            and agcount <= _MAX_GROUPS and (agcount - 1) * agblocks < dblocks <= agcount * agblocks
            and dblocks * bs <= length):
        raise Distrust("xfs superblock is inconsistent")
    if not _xfs_log_clean(read, sb, bs, agblocks):
        raise Distrust("xfs is mounted or was not cleanly unmounted (its log needs recovery)")
    free: list[tuple[int, int]] = []
    for ag in range(agcount):
        ag_off = ag * agblocks * bs
        agf = read(ag_off + sectsize, sectsize)
        if len(agf) < 64 or agf[:4] != _XFS_AGF_MAGIC or _be32(agf, 8) != ag:
            raise Distrust(f"xfs AG {ag} has no valid AGF header")
        ag_len, root, level, freeblks = (_be32(agf, 12), _be32(agf, 16), _be32(agf, 28),
                                         _be32(agf, 52))
        if ag_len > agblocks or not 1 <= level <= _XFS_MAX_DEPTH or not 0 < root < ag_len:
            raise Distrust(f"xfs AG {ag} header is inconsistent")
        recs: list[tuple[int, int]] = []
        _xfs_walk(read, ag_off, bs, ag_len, root, level - 1, recs, set())
        if sum(n for _s, n in recs) != freeblks:
            raise Distrust(f"xfs AG {ag}'s free-space tree does not match its free count")
        free += [(ag_off + s * bs, n * bs) for s, n in recs]
    return "xfs", dblocks * bs, sorted(free)


_BB = 512  # the log's basic block
_XLOG_MAGIC = 0xFEEDBABE
_XLOG_CYCLE_SIZE = 32768  # bytes of a record one header block's cycle table covers
_XLOG_UNMOUNT_TRANS = 0x20


def _xfs_log_clean(read: ReadFn, sb: bytes, bs: int, agblocks: int) -> bool:
    """Whether the internal log ends with an unmount record, found as the kernel finds it:
    the head is where the blocks' cycle numbers drop, and the record just before it must be
    a one-operation unmount record that ends exactly at the head."""
    logstart = int(struct.unpack_from(">Q", sb, 48)[0])
    logblocks, agblklog = _be32(sb, 96), sb[124]
    if not logstart:
        raise Distrust("xfs has an external log, which cannot be checked here")
    log_off = ((logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))) * bs
    nbb = logblocks * bs // _BB
    if nbb < 2:
        raise Distrust("xfs log is too small")

    def block(b: int) -> bytes:
        data = read(log_off + (b % nbb) * _BB, _BB)
        if len(data) != _BB:
            raise Distrust("xfs log is cut short")
        return data

    def cycle(b: int) -> int:
        data = block(b)
        return _be32(data, 4) if _be32(data, 0) == _XLOG_MAGIC else _be32(data, 0)

    first, last = cycle(0), cycle(nbb - 1)
    if first == last:
        head = nbb  # the newest cycle fills the whole log: the head is at its start
    else:  # the first block of the last cycle: the write head
        lo, hi = 0, nbb - 1  # cycle(lo) == first, cycle(hi) == last
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cycle(mid) == first:
                lo = mid
            else:
                hi = mid
        head = hi
    for back in range(1, min(nbb, 1 << 16)):  # the newest record header before the head
        rb = (head - back) % nbb
        rec = block(rb)
        if _be32(rec, 0) != _XLOG_MAGIC:
            continue
        version, length, size = _be32(rec, 8), _be32(rec, 12), _be32(rec, 320)
        hblks = -(-size // _XLOG_CYCLE_SIZE) if version & 2 and size > _XLOG_CYCLE_SIZE else 1
        end = (rb + hblks + -(-length // _BB)) % nbb
        if end != head % nbb or _be32(rec, 40) != 1:
            return False
        return bool(block(rb + hblks)[9] & _XLOG_UNMOUNT_TRANS)
    return False


def _xfs_walk(read: ReadFn, ag_off: int, bs: int, ag_len: int, block: int, level: int,
              recs: list[tuple[int, int]], seen: set[int]) -> None:
    if block in seen or not 0 < block < ag_len or len(seen) > ag_len:
        raise Distrust("xfs free-space tree is damaged (a loop or a pointer out of the AG)")
    seen.add(block)
    data = read(ag_off + block * bs, bs)
    hdr = _XFS_BNO_MAGICS.get(data[:4])
    if hdr is None or len(data) != bs:
        raise Distrust("xfs free-space tree block has a wrong magic number")
    blevel, numrecs = struct.unpack_from(">HH", data, 4)
    if blevel != level:
        raise Distrust("xfs free-space tree levels are inconsistent")
    if level == 0:
        if hdr + numrecs * 8 > bs:
            raise Distrust("xfs free-space tree block holds too many records")
        for i in range(numrecs):
            start, count = struct.unpack_from(">II", data, hdr + 8 * i)
            if not count or start + count > ag_len:
                raise Distrust("xfs free-space record lies outside its AG")
            recs.append((start, count))
        return
    maxrecs = (bs - hdr) // 12
    if numrecs > maxrecs:
        raise Distrust("xfs free-space tree node holds too many pointers")
    for i in range(numrecs):
        child = _be32(data, hdr + maxrecs * 8 + 4 * i)
        _xfs_walk(read, ag_off, bs, ag_len, child, level - 1, recs, seen)
