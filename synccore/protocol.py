"""The diskrsync sync protocol, version 1: messages and their framing, without I/O.

Each side opens with an 8-byte preamble, ``DRSYNC`` and a big-endian u16 protocol version, then
sends frames: ``u32 length | u8 type | payload`` (length counts type and payload). The frame
decoder is fed bytes in any split and yields messages, like h11. See docs/protocol.md for the
conversation; in short the source says Hello, the target answers Hello and the digests of its
level-1 tree nodes (PageHashes), the source asks for the leaf digests of pages that differ
(NeedLeaves/Leaves), streams differing chunks (Chunk), and ends with Done carrying its root
hash; the target commits only when its new root equals it and answers Committed.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from diskrsync.base.errors import PeerError
from diskrsync.compression.codec import Kind
from diskrsync.compression.format import MAX_CHUNK, MIN_CHUNK, check_encryption_entry
from diskrsync.compression.targets import DEFAULT_MAX_SIZE  # noqa: F401  (`--max-size`)

PROTOCOL_VERSION = 1
PREAMBLE = b"DRSYNC"
PREAMBLE_SIZE = len(PREAMBLE) + 2
GO_MAGIC = b"BSNC0002"  # what the original Go diskrsync sends first
MAX_FRAME = 16 << 20  # bounds memory: a chunk is at most 4 MiB plus a header
MAX_JSON = 1 << 20  # a JSON message (Hello, Done, Committed, Error) is small
MAX_JSON_DEPTH = 16
MAX_FANOUT = 4096
MAX_DISK_SIZE = (1 << 63) - 1  # what an off_t and the formats' u64 fields hold
HASH_SIZE = 32
HASH = "blake3"
# What this release can do; each side lists them in its Hello and checks the other's.
CAPABILITIES = ("zstd", "dry-run", "resume", "alive", "encryption", "page-window")
MAX_SEAL_HEX = 2 * 64 * 1024  # a sealed generation record (crypto.MAX_SEAL bytes, in hex)


def check_peer(hello: Hello, needed: tuple[str, ...]) -> None:
    """Refuse a peer that hashes differently or lacks a capability this push needs."""
    who = f"the {hello.role} ({hello.software or 'unknown software'})"
    if hello.info.get("hash") != HASH:
        raise PeerError(f"{who} uses hash {hello.info.get('hash')!r}, this diskrsync uses {HASH}")
    caps = set(hello.info.get("caps", ()))  # a list of strings: the decoder checked
    missing = [c for c in needed if c not in caps]
    if missing:
        raise PeerError(f"{who} cannot do {', '.join(missing)}: install the same diskrsync "
                        f"release on both ends")

_FRAME = struct.Struct("<IB")
_CHUNK = struct.Struct("<QB32s")
_PAGE = struct.Struct("<Q")


def preamble() -> bytes:
    return PREAMBLE + struct.pack(">H", PROTOCOL_VERSION)


@dataclass(frozen=True)
class Hello:
    """First frame of each side: who it is and what it has."""

    role: str  # "source" or "target"
    size: int  # source: bytes it will send; target: size of what it compares against
    chunk_size: int  # source: preferred; target: the one both must use
    fanout: int
    software: str = ""  # e.g. "diskrsync 0.1.0"
    info: dict[str, Any] = field(default_factory=dict)  # options, descriptions, resume state


@dataclass(frozen=True)
class PageHashes:
    """Target → source: digests of level-1 nodes ``start, start+1, ...`` of the target tree."""

    start: int
    hashes: bytes  # 32 bytes each


@dataclass(frozen=True)
class NeedLeaves:
    """Source → target: send the chunk digests under level-1 node ``page``."""

    page: int


@dataclass(frozen=True)
class WantPages:
    """Source → target, to a target whose Hello lists "page-window": send your page digests
    up to page ``upto`` (exclusive). Such a target sends none before the first, so the
    source holds a window of them at a time, not one per page of the disk (issue 16)."""

    upto: int


@dataclass(frozen=True)
class Leaves:
    page: int
    hashes: bytes


@dataclass(frozen=True)
class Chunk:
    """Source → target: one chunk's new content. ``kind`` as in the image (0 zero, 1 raw,
    2 zstd); ``digest`` is the BLAKE3 of the uncompressed bytes."""

    index: int
    kind: int
    digest: bytes
    payload: bytes


@dataclass(frozen=True)
class Done:
    """Source → target: everything is sent; commit if your root equals ``root``."""

    root: bytes
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Committed:
    generation: int
    root: bytes
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Error:
    """Either side: I am stopping because of this. ``kind`` names the error class."""

    kind: str
    message: str


@dataclass(frozen=True)
class Estimate:
    """Source → target, once, before any Chunk, when the target's Hello asked for it
    (``space_check``: a first push): what the push will store (``stored``, ``raw``,
    ``sampled``: bytes), so a target that cannot hold it refuses before writing."""

    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Alive:
    """Either side, after a quiet spell, to peers whose Hello lists the "alive" capability:
    I am still here (so the peer's ``--timeout`` measures a frozen peer, not a long scan of
    unchanged data). Channels consume it; the conversation never sees it."""


Message = (Hello | PageHashes | NeedLeaves | Leaves | Chunk | Done | Committed | Error | Alive
           | Estimate | WantPages)

_TYPES: dict[type, int] = {
    Hello: 1, PageHashes: 2, NeedLeaves: 3, Leaves: 4, Chunk: 5, Done: 6, Committed: 7, Error: 8,
    Alive: 9, Estimate: 10, WantPages: 11,
}


def encode(msg: Message) -> bytes:
    """One frame for ``msg``."""
    t = _TYPES[type(msg)]
    if isinstance(msg, Chunk):  # the bulk of a push: its payload is copied once
        head = _FRAME.pack(_CHUNK.size + len(msg.payload) + 1, t)
        return b"".join((head, _CHUNK.pack(msg.index, msg.kind, msg.digest), msg.payload))
    if isinstance(msg, (PageHashes, Leaves)):
        first = msg.start if isinstance(msg, PageHashes) else msg.page
        payload = _PAGE.pack(first) + msg.hashes
    elif isinstance(msg, NeedLeaves):
        payload = _PAGE.pack(msg.page)
    elif isinstance(msg, WantPages):
        payload = _PAGE.pack(msg.upto)
    elif isinstance(msg, Alive):
        payload = b""
    else:
        payload = json.dumps(_to_json(msg), separators=(",", ":")).encode()
    return _FRAME.pack(len(payload) + 1, t) + payload


def wire_size(msg: Message) -> int:
    """Bytes ``msg`` takes on the wire (cheap for the bulky kinds)."""
    if isinstance(msg, Chunk):
        return _FRAME.size + _CHUNK.size + len(msg.payload)
    if isinstance(msg, (PageHashes, Leaves)):
        return _FRAME.size + _PAGE.size + len(msg.hashes)
    return len(encode(msg))


def _to_json(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Hello):
        return {"role": msg.role, "size": msg.size, "chunk_size": msg.chunk_size,
                "fanout": msg.fanout, "software": msg.software, "info": msg.info}
    if isinstance(msg, Done):
        return {"root": msg.root.hex(), "info": msg.info}
    if isinstance(msg, Committed):
        return {"generation": msg.generation, "root": msg.root.hex(), "info": msg.info}
    if isinstance(msg, Error):
        return {"kind": msg.kind, "message": msg.message}
    if isinstance(msg, Estimate):
        return {"info": msg.info}
    raise TypeError(msg)


class _Malformed(ValueError):
    """A JSON message that parses but has the wrong shape (turned into a PeerError)."""


def _no_constant(name: str) -> Any:
    raise _Malformed(f"{name} is not a number")


def _check_json(value: Any, depth: int = 0) -> None:
    """Bounded nesting, no NUL in any string or key (names end up in paths and metadata)."""
    if depth > MAX_JSON_DEPTH:
        raise _Malformed(f"nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, str):
        if "\0" in value:
            raise _Malformed("a string holds a NUL character")
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, depth + 1)
            _check_json(v, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _Malformed("a number is not finite")


def _field(d: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    v = d.get(name, default)
    # bool is an int to Python, never to us; a float is not an integer even when whole
    if v is None or not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise _Malformed(f"{name!r} must be {kind.__name__}, not {type(v).__name__}")
    return v


def _int(d: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v: int = _field(d, name, int)
    if not lo <= v <= hi:
        raise _Malformed(f"{name!r} is {v}, outside {lo}..{hi}")
    return v


def _line(text: str, limit: int) -> str:
    """Peer text a user will read: one line of printable characters, not too long."""
    text = "".join(c if c.isprintable() else " " for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _digest(d: dict[str, Any], name: str) -> bytes:
    text: str = _field(d, name, str)
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise _Malformed(f"{name!r} is not a {HASH_SIZE}-byte hex digest")
    return bytes.fromhex(text)


def _hello(d: dict[str, Any]) -> Hello:
    role = _field(d, "role", str)
    if role not in ("source", "target"):
        raise _Malformed(f"role {role!r} is neither source nor target")
    size = _int(d, "size", 0, MAX_DISK_SIZE)
    cs = _int(d, "chunk_size", 0, MAX_CHUNK)  # a source's wish (0: none) the target checks
    if role == "target" and not (cs >= MIN_CHUNK and cs & (cs - 1) == 0):
        raise _Malformed(f"chunk size {cs} is not a power of two from {MIN_CHUNK} to "
                         f"{MAX_CHUNK}")
    fanout = _int(d, "fanout", 2, MAX_FANOUT)
    info: dict[str, Any] = _field(d, "info", dict, {})
    caps = info.get("caps", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise _Malformed("'caps' must be a list of strings")
    if not isinstance(info.get("hash", ""), str):
        raise _Malformed("'hash' must be a string")
    if "generation" in info:
        _int(info, "generation", 0, 1 << 63)
    if not isinstance(info.get("change_base", {}), dict):
        raise _Malformed("'change_base' must be an object")
    for name in ("encrypt", "encryption"):  # a new image's key / the target image's
        try:
            check_encryption_entry(info.get(name))
        except ValueError as e:
            raise _Malformed(f"{name!r}: {e}") from None
    return Hello(role, size, cs, fanout, _line(_field(d, "software", str, ""), 200), info)


def _done_info(info: dict[str, Any]) -> dict[str, Any]:
    """The counts and byte ranges a Done may carry (a pull's summary adds them up)."""
    for name in ("source_changed_chunks", "chunks_differing", "chunk_bytes_differing"):
        if name in info:
            _int(info, name, 0, MAX_DISK_SIZE)
    source = info.get("source", "")
    if not isinstance(source, str) or len(source) > 4096:
        raise _Malformed("'source' must be a string of at most 4096 characters")
    if source:
        info["source"] = _line(source, 4096)  # recorded, and shown to users later
    if not isinstance(info.get("new_generation", False), bool):
        raise _Malformed("'new_generation' must be true or false")
    seal = info.get("seal", "")
    if not isinstance(seal, str) or len(seal) > MAX_SEAL_HEX \
            or not re.fullmatch(r"(?:[0-9a-f]{2})*", seal):
        raise _Malformed("'seal' must be a hex string of a sealed record")
    for name in ("read_errors", "differing_ranges"):
        ranges = info.get(name, [])
        if not isinstance(ranges, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(
                    type(n) is int and 0 <= n <= MAX_DISK_SIZE for n in r) for r in ranges):
            raise _Malformed(f"{name!r} must be a list of [offset, length] pairs")
    for name in ("map", "map_fallback"):
        if not isinstance(info.get(name, ""), str):
            raise _Malformed(f"{name!r} must be a string")
    if "map_warnings" in info:
        notes = info["map_warnings"]
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise _Malformed("'map_warnings' must be a list of strings")
        info["map_warnings"] = [_line(n, 500) for n in notes[:20]]
    if not isinstance(info.get("change_base") or {}, dict):
        raise _Malformed("'change_base' must be an object")
    return info


def _from_json(t: int, payload: bytes) -> Message:
    """Decode and check a JSON message: one that decodes is well-formed (types, ranges)."""
    try:
        if len(payload) > MAX_JSON:
            raise _Malformed(f"{len(payload)} bytes of JSON, at most {MAX_JSON}")
        d = json.loads(payload, parse_constant=_no_constant)
        if not isinstance(d, dict):
            raise _Malformed("not a JSON object")
        _check_json(d)
        if t == 1:
            return _hello(d)
        if t == 6:
            return Done(_digest(d, "root"), _done_info(_field(d, "info", dict, {})))
        if t == 10:
            info = _field(d, "info", dict, {})
            for name in ("stored", "raw", "sampled"):
                _int(info, name, 0, MAX_DISK_SIZE)
            return Estimate(info)
        if t == 7:
            return Committed(_int(d, "generation", 0, 1 << 63), _digest(d, "root"),
                             _field(d, "info", dict, {}))
        kind = _field(d, "kind", str)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", kind):
            raise _Malformed(f"error kind {kind[:64]!r} is not a class name")
        return Error(kind, _line(_field(d, "message", str), 4000))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError too
        raise PeerError(f"peer sent a malformed message (type {t}): {e}") from None


class Decoder:
    """Turns the peer's byte stream into messages; feed with ``feed``, drain with ``next``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._greeted = False

    def feed(self, data: bytes) -> None:
        if self._pos > 1 << 20 and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        if not self._greeted:
            if len(buf) - pos < PREAMBLE_SIZE:
                if len(buf) - pos >= 4 and not GO_MAGIC.startswith(bytes(buf[pos : pos + 4])) \
                        and not PREAMBLE.startswith(bytes(buf[pos : pos + 4])):
                    raise ForeignPeer(bytes(buf[pos : pos + 80]))
                return None
            head = bytes(buf[pos : pos + PREAMBLE_SIZE])
            if head != GO_MAGIC and not head.startswith(PREAMBLE):
                raise ForeignPeer(bytes(buf[pos : pos + 80]))  # all we have of its words
            check_preamble(head)
            self._pos = pos = pos + PREAMBLE_SIZE
            self._greeted = True
        if len(buf) - pos < _FRAME.size:
            return None
        length, t = _FRAME.unpack_from(buf, pos)
        if not 1 <= length <= MAX_FRAME or t not in _TYPE_BY_ID:
            raise PeerError(f"peer sent garbage (frame length {length}, type {t})")
        end = pos + 4 + length
        if len(buf) < end:
            return None
        self._pos = end
        with memoryview(buf) as view:  # released at once: feed() resizes the buffer
            if t == _CHUNK_TYPE and length - 1 >= _CHUNK.size:
                # the bulk of a push: its header read in place, its payload copied once
                index, kind, digest = _CHUNK.unpack_from(buf, pos + _FRAME.size)
                return _chunk(index, kind, digest, bytes(view[pos + _FRAME.size
                                                             + _CHUNK.size : end]))
            payload = bytes(view[pos + _FRAME.size : end])
        return _decode(t, payload)

    @property
    def pending(self) -> int:
        """Bytes received but not yet a whole message (non-zero at EOF means a cut stream)."""
        return len(self._buf) - self._pos


class ForeignPeer(PeerError):
    """The peer's first bytes are neither our preamble nor the Go tool's: another program
    answered (a shell's or a program's text, usually). ``head`` holds those bytes."""

    def __init__(self, head: bytes) -> None:
        super().__init__(f"peer does not speak the diskrsync protocol (it sent "
                         f"{describe_bytes(head)})")
        self.head = head


def describe_bytes(data: bytes) -> str:
    """A peer's bytes for a message: quoted text when they are printable, else hex (never a
    Python bytes repr)."""
    text = data.decode("ascii", "replace")
    if all(c.isprintable() or c in "\t\r\n" for c in text) and "\ufffd" not in text:
        shown = text.replace("\r", "").replace("\n", " ").replace("\t", " ").strip()
        return f'text "{shown}..."' if shown else "blank lines"
    return f"bytes {data.hex(' ')}"


def check_preamble(head: bytes) -> None:
    """Accept our preamble at our version; name what the peer is otherwise."""
    if head == GO_MAGIC:
        raise PeerError(
            "the peer is the original Go diskrsync (it speaks BSNC0002): use --legacy"
        )
    if not head.startswith(PREAMBLE):
        raise ForeignPeer(head)
    (version,) = struct.unpack(">H", head[len(PREAMBLE) :])
    if version != PROTOCOL_VERSION:
        raise PeerError(
            f"peer speaks diskrsync protocol version {version}, this diskrsync speaks "
            f"version {PROTOCOL_VERSION}: install the same diskrsync release on both ends"
        )


_TYPE_BY_ID = {v: k for k, v in _TYPES.items()}
_CHUNK_TYPE = _TYPES[Chunk]


def _chunk(index: int, kind: int, digest: bytes, data: bytes) -> Chunk:
    if kind not in (Kind.ZERO, Kind.RAW, Kind.ZSTD) or (kind == Kind.ZERO and data) \
            or (kind == Kind.RAW and len(data) > MAX_CHUNK):
        raise PeerError(f"peer sent a malformed chunk frame (chunk {index}, kind {kind}, "
                        f"{len(data)} bytes)")
    return Chunk(index, kind, digest, data)


def _decode(t: int, payload: bytes) -> Message:
    cls = _TYPE_BY_ID[t]
    if cls is Alive:
        if payload:
            raise PeerError("peer sent a malformed alive frame")
        return Alive()
    if cls is Chunk:
        if len(payload) < _CHUNK.size:
            raise PeerError("peer sent a truncated chunk frame")
        index, kind, digest = _CHUNK.unpack_from(payload)
        return _chunk(index, kind, digest, payload[_CHUNK.size :])
    if cls in (PageHashes, Leaves, NeedLeaves, WantPages):
        if len(payload) < _PAGE.size or (cls in (NeedLeaves, WantPages)
                                          and len(payload) != _PAGE.size) \
                or (len(payload) - _PAGE.size) % HASH_SIZE:
            raise PeerError("peer sent a malformed hash frame")
        (first,) = _PAGE.unpack_from(payload)
        if cls is NeedLeaves:
            return NeedLeaves(first)
        if cls is WantPages:
            return WantPages(first)
        rest = payload[_PAGE.size :]
        return PageHashes(first, rest) if cls is PageHashes else Leaves(first, rest)
    return _from_json(t, payload)
