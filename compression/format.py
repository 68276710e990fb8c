"""The on-disk structures of a diskrsync image, encoded and decoded without I/O.

See docs/format.md for the layout. Everything here takes and returns bytes; ``image.py`` does the
reading, writing, locking and fsync.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import blake3

from diskrsync.base.errors import DataError, FormatVersionError
from diskrsync.compression.codec import Kind

MAGIC = b"DSKRSYNC"
FORMAT_VERSION = 1
ENCRYPTED_VERSION = 2  # an encrypted image: readers before encryption refuse it, never write it
VERSIONS = (FORMAT_VERSION, ENCRYPTED_VERSION)
SUPERBLOCK_SLOTS = (0, 4096)
SLOT_SIZE = 4096
WRITER_SLOT = 8192  # informational: who holds the writer lock (for the "busy" message)
DATA_START = 12288  # chunks, pages and generation tables live from here on
CHECKSUM_SIZE = 16
SECTOR = 4096  # a generation table copy owns whole sectors: one bad sector never hits both
# superblock flag: this commit was written to both slots, each naming its own table copy
# (older diskrsync versions ignore flags, so the images stay readable and writable by them)
FLAG_MIRRORED = 1

# u16 version, u16 flags, u32 chunk size, u32 fanout, u32 reserved, u64 commit counter,
# u64 table offset, u32 table length, 16-byte table checksum
_SB = struct.Struct("<8sHHIIIQQI16s")
PAGE_MAGIC = b"DRPG"
_PAGE_HEAD = struct.Struct("<4sBBHQ")  # magic, level, reserved, count, reserved
ENTRY = struct.Struct("<32sQIB3x")  # hash, offset, stored length, kind
ENTRY_SIZE = ENTRY.size  # 48

MIN_CHUNK = 16 * 1024
MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_CHUNK = 128 * 1024
DEFAULT_FANOUT = 128


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """Integrity checksum of a metadata block (truncated BLAKE3)."""
    return blake3.blake3(data).digest(length=CHECKSUM_SIZE)


@dataclass(frozen=True)
class Superblock:
    """One of the two roots of the file; the valid one with the higher counter wins."""

    chunk_size: int
    fanout: int
    counter: int
    table_offset: int
    table_length: int
    table_checksum: bytes
    flags: int = 0
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        body = _SB.pack(
            MAGIC, self.version, self.flags, self.chunk_size, self.fanout, 0, self.counter,
            self.table_offset, self.table_length, self.table_checksum,
        )
        return (body + checksum(body)).ljust(SLOT_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> Superblock:
        """Parse a slot; DataError says why it is not a valid superblock."""
        if len(raw) < _SB.size + CHECKSUM_SIZE:
            raise DataError("superblock truncated")
        body = raw[: _SB.size]
        magic, version, flags, cs, fanout, _r, counter, toff, tlen, tsum = _SB.unpack(body)
        if magic != MAGIC:
            raise DataError("no diskrsync image magic")
        if raw[_SB.size : _SB.size + CHECKSUM_SIZE] != checksum(body):
            raise DataError("superblock checksum mismatch")
        if version not in VERSIONS:
            raise FormatVersionError(
                f"image format version {version} is not supported "
                f"(this diskrsync reads versions {', '.join(map(str, VERSIONS))})"
            )
        if not (MIN_CHUNK <= cs <= MAX_CHUNK and cs & (cs - 1) == 0) or not 2 <= fanout <= 4096:
            raise DataError(f"superblock has impossible geometry (chunk {cs}, fanout {fanout})")
        return cls(cs, fanout, counter, toff, tlen, tsum, flags, version)


@dataclass(frozen=True)
class Entry:
    """One slot of an index page: a chunk (level-1 pages) or a child page (higher levels)."""

    hash: bytes
    offset: int
    length: int
    kind: Kind


def encode_page(level: int, entries: bytes | bytearray) -> bytes:
    """An index page: header, packed entries, checksum. ``entries`` is ENTRY-packed."""
    count, rest = divmod(len(entries), ENTRY_SIZE)
    assert rest == 0
    body = _PAGE_HEAD.pack(PAGE_MAGIC, level, 0, count, 0) + bytes(entries)
    return body + checksum(body)


def page_length(count: int) -> int:
    return _PAGE_HEAD.size + count * ENTRY_SIZE + CHECKSUM_SIZE


def decode_page(raw: bytes, *, level: int, count: int) -> bytes:
    """Check a page read from disk and return its packed entries; DataError if damaged."""
    if len(raw) != page_length(count):
        raise DataError(f"index page has {len(raw)} bytes, expected {page_length(count)}")
    body = raw[:-CHECKSUM_SIZE]
    if checksum(body) != raw[-CHECKSUM_SIZE:]:
        raise DataError("index page checksum mismatch")
    magic, lvl, _r, cnt, _r2 = _PAGE_HEAD.unpack_from(body)
    if magic != PAGE_MAGIC or lvl != level or cnt != count:
        raise DataError(f"index page header wrong (level {lvl}/{level}, count {cnt}/{count})")
    return body[_PAGE_HEAD.size :]


def pack_entry(hash_: bytes, offset: int, length: int, kind: int) -> bytes:
    return ENTRY.pack(hash_, offset, length, kind)


def unpack_entry(entries: bytes | bytearray, k: int) -> Entry:
    h, off, ln, kind = ENTRY.unpack_from(entries, k * ENTRY_SIZE)
    try:
        return Entry(h, off, ln, Kind(kind))
    except ValueError:
        raise DataError(f"index entry has unknown kind {kind}") from None


def entry_hash(entries: bytes | bytearray, k: int) -> bytes:
    return bytes(entries[k * ENTRY_SIZE : k * ENTRY_SIZE + 32])


@lru_cache(maxsize=16)
def _digests_struct(count: int) -> struct.Struct:
    return struct.Struct("<" + "32s16x" * count)


def entry_digests(entries: bytes | bytearray) -> bytes:
    """The entries' hashes laid end to end: what a node's Merkle digest is computed over."""
    count = len(entries) // ENTRY_SIZE
    return b"".join(_digests_struct(count).unpack_from(entries)) if count else b""


def iter_entries(entries: bytes | bytearray) -> Iterator[tuple[bytes, int, int, int]]:
    """(hash, offset, length, kind) of every entry, without building objects (hot loops)."""
    return ENTRY.iter_unpack(entries)


@dataclass(frozen=True)
class TreeRef:
    """Where one tree's top page is, and what its digest must be."""

    size: int
    offset: int = 0
    length: int = 0
    hash: bytes = b""  # digest of the top node (b"" for an empty disk)


@dataclass(frozen=True)
class GenRecord:
    """A committed generation (or the pending checkpoint) as kept in the generation table."""

    number: int
    time: float
    tree: TreeRef
    root_hash: bytes
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    #: encrypted images: the client's record of this generation, sealed (crypto.py)
    seal: str = ""


@dataclass(frozen=True)
class GenTable:
    """All that a superblock commits to besides geometry."""

    generations: tuple[GenRecord, ...] = ()  # retained, oldest first
    zombies: tuple[GenRecord, ...] = ()  # pruned but maybe still pinned by a reader
    checkpoint: GenRecord | None = None  # pending generation a killed push resumes from
    next_number: int = 1
    #: encrypted images: {"key_id", "cipher", "envelope" (the wrapped key, or None)}
    encryption: dict[str, Any] | None = None

    @cached_property
    def by_number(self) -> dict[int, GenRecord]:
        """The retained generations by number: a lookup per generation (pinning each, as the
        mount does) must not search the whole history each time."""
        return {r.number: r for r in self.generations}

    @property
    def version(self) -> int:
        """The format version a superblock naming this table carries."""
        return ENCRYPTED_VERSION if self.encryption is not None else FORMAT_VERSION

    def encode(self) -> bytes:
        def rec(r: GenRecord) -> dict[str, Any]:
            # by hand, not dataclasses.asdict: that deep-copies every record's metadata, a
            # quarter of a commit's time at 1,000 generations
            t = r.tree
            d = {"number": r.number, "time": r.time,
                 "tree": {"size": t.size, "offset": t.offset, "length": t.length,
                          "hash": t.hash.hex()},
                 "root_hash": r.root_hash.hex(), "source": r.source, "meta": r.meta}
            if r.seal:
                d["seal"] = r.seal
            return d

        doc = {
            "generations": [rec(r) for r in self.generations],
            "zombies": [rec(r) for r in self.zombies],
            "checkpoint": rec(self.checkpoint) if self.checkpoint else None,
            "next_number": self.next_number,
        }
        if self.encryption is not None:
            doc["encryption"] = self.encryption
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> GenTable:
        try:
            doc = json.loads(raw)

            def rec(d: dict[str, Any]) -> GenRecord:
                t = d["tree"]
                tree = TreeRef(t["size"], t["offset"], t["length"], bytes.fromhex(t["hash"]))
                return GenRecord(
                    d["number"], d["time"], tree, bytes.fromhex(d["root_hash"]),
                    d.get("source", ""), d.get("meta", {}), d.get("seal", ""),
                )

            cp = doc.get("checkpoint")
            return cls(
                tuple(rec(r) for r in doc["generations"]),
                tuple(rec(r) for r in doc.get("zombies", [])),
                rec(cp) if cp else None,
                doc["next_number"],
                check_encryption_entry(doc.get("encryption")),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"generation table unreadable: {e}") from None


def check_encryption_entry(doc: Any) -> dict[str, Any] | None:
    """A table's (or a peer's) encryption entry, checked for shape (ValueError); the
    envelope itself is checked when it is used."""
    if doc is None:
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("key_id"), str)
            and len(doc["key_id"]) == 32 and isinstance(doc.get("cipher"), str)
            and (doc.get("envelope") is None or isinstance(doc["envelope"], dict))):
        raise ValueError("its encryption entry is malformed")
    bytes.fromhex(doc["key_id"])
    return doc
