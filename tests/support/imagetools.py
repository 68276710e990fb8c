"""Small helpers for the image damage and fuzz tests: build multi-generation images, find and
damage their metadata copies, and turn an image back into the one-slot-per-commit layout that
diskrsync wrote before both superblocks were written per commit."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable

from diskrsync.base.errors import DataError
from diskrsync.compression.format import (
    FLAG_MIRRORED,
    SLOT_SIZE,
    SUPERBLOCK_SLOTS,
    GenTable,
    Superblock,
)
from diskrsync.compression.image import Image

CS = 16 * 1024


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "diskrsync.cli", *args], capture_output=True, timeout=timeout
    )


def disk(seed: int, chunks: int) -> bytes:
    """Random, compressible and zero chunks."""
    rnd = random.Random(seed)
    parts = []
    for c in range(chunks):
        if c % 3 == 0:
            parts.append(rnd.randbytes(CS))
        elif c % 3 == 1:
            parts.append((f"{seed} chunk {c} ".encode() * CS)[:CS])
        else:
            parts.append(bytes(CS))
    return b"".join(parts)


def commit(path: str, data: bytes, *, chunks: range | list[int] | None = None,
           keep: int = 3) -> int:
    """Commit ``data`` writing only ``chunks`` (default all); returns the generation number."""
    with Image.open(path) as img:
        tx = img.begin()
    try:
        tx.resize(len(data))
        for c in range(-(-len(data) // CS)) if chunks is None else chunks:
            tx.write_chunk(c, data[c * CS : (c + 1) * CS])
        return tx.commit(keep=keep).number
    finally:
        tx.close()


def generations(path: str, count: int = 3, chunks: int = 12) -> list[bytes]:
    """An image with ``count`` generations (each rewrites a few chunks); their bytes."""
    Image.create(path, chunk_size=CS, fanout=4).close()
    model = bytearray(disk(1, chunks))
    out = []
    for g in range(count):
        if g:
            for c in (g, chunks - 1 - g):
                model[c * CS : (c + 1) * CS] = random.Random(100 * g + c).randbytes(CS)
        commit(path, bytes(model), chunks=None if g == 0 else [g, chunks - 1 - g], keep=count)
        out.append(bytes(model))
    return out


def content(path: str, number: int | None = None) -> tuple[int, bytes]:
    """(generation number, bytes) that a reader is served."""
    with Image.open(path) as img, img.snapshot(number) as snap:
        return snap.record.number, snap.read(0, snap.size)


def superblocks(path: str) -> list[Superblock | None]:
    with open(path, "rb") as f:
        head = f.read(2 * SLOT_SIZE)
    out: list[Superblock | None] = []
    for off in SUPERBLOCK_SLOTS:
        try:
            out.append(Superblock.decode(head[off : off + SLOT_SIZE]))
        except DataError:
            out.append(None)
    return out


def write_slot(path: str, slot: int, sb: Superblock) -> None:
    with open(path, "r+b") as f:
        f.seek(SUPERBLOCK_SLOTS[slot])
        f.write(sb.encode())


def flip(path: str, offset: int, count: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def one_slot_image(path: str, count: int = 3) -> list[bytes]:
    """An image as the one-slot-per-commit writer left it: the newest commit in one slot only
    (no FLAG_MIRRORED), the other slot holding the commit before."""
    gens = generations(path, count - 1)
    previous = superblocks(path)[1]
    assert previous is not None
    model = bytearray(gens[-1])
    model[0:CS] = random.Random(999).randbytes(CS)
    commit(path, bytes(model), chunks=[0], keep=count)
    gens.append(bytes(model))
    newest = superblocks(path)[0]
    assert newest is not None and newest.counter == previous.counter + 1
    # the old writer put counter c into slot c % 2
    for sb in (previous, newest):
        write_slot(path, sb.counter % 2, Superblock(
            sb.chunk_size, sb.fanout, sb.counter, sb.table_offset, sb.table_length,
            sb.table_checksum, sb.flags & ~FLAG_MIRRORED))
    return gens


def publish_forged(image: str, forge: Callable[[GenTable], GenTable]) -> None:
    """What a host with write access to an image can do without its key: rewrite the
    generation table (valid checksums) through the image code."""
    with Image.open(image) as opened:
        tx = opened.begin(what="attack")
        try:
            tx.publish(forge(tx.table))
        finally:
            tx.close()
