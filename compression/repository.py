"""Deduplicating repositories on an object store (docs/repository.md is the specification).

Many disks, each with generations; every distinct chunk stored once (content-addressed
blobs in immutable 16 MiB packs, located through index objects); a generation is a Merkle
tree of content ids whose pages are blobs too, made visible by a manifest written last.
Writers and readers hold leases (``locks/``) instead of relying on conditional writes,
which not every S3 service has.

What is here: creating and opening a repository (plain or encrypted, the codec and seals of
``crypto.py``), writing a generation of a disk from chunks (:class:`GenerationWriter`),
listing disks and generations, and reading a generation back chunk by chunk, verified
(:class:`RepoSnapshot`), over any :class:`~diskrsync.compression.objstore.ObjectStore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import blake3

from diskrsync.base import merkle
from diskrsync.base.errors import (
    BusyError,
    CorruptChunkError,
    DataError,
    FormatVersionError,
    ObjectMissing,
    UsageError,
)
from diskrsync.base.merkle import HASH_SIZE, Shape, node_hash_packed, root_hash
from diskrsync.compression.api import GenerationInfo as ApiGeneration
from diskrsync.compression.blobcache import BlobCache
from diskrsync.compression.codec import STANDARD, ChunkAt, ChunkCodec, Kind, is_zero
from diskrsync.compression.crypto import (
    ContentSealedCodec,
    Envelope,
    Keyring,
    MasterKey,
    SeenGenerations,
)
from diskrsync.compression.format import DEFAULT_CHUNK, DEFAULT_FANOUT, MAX_CHUNK, MIN_CHUNK
from diskrsync.compression.objstore import ObjectStore
from diskrsync.compression.sources import SourceReader

VERSION = 1
PACK_SIZE = 16 << 20  # measured: docs/benchmarks.md, "Object storage"
PACKS_PER_INDEX = 64  # an index object per 1 GiB of packs: what a killed push keeps
LEASE = 600.0  # seconds a lock lives without a refresh
GRACE = 3600.0  # seconds a condemned pack waits before prune may delete it

CHUNK, PAGE = 0, 1  # blob types
_ENTRY = struct.Struct("<32sBBIII")  # id, type, kind, offset, stored length, length
_PACK_HEAD = struct.Struct("<32sII")  # pack id, pack length, entry count
PACK_MAGIC = b"DRPK"
INDEX_MAGIC = b"DRIX"
PLAIN, SEALED = b"DRO1", b"DRO2"
_DISK = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}")
_MANIFEST = re.compile(r"(\d{10})-([0-9a-f]{16})")


def check_disk_name(name: str) -> str:
    if not _DISK.fullmatch(name):
        raise UsageError(f"bad disk name {name!r}: 1-128 of A-Z a-z 0-9 . _ -, not starting "
                         f"with a dot")
    return name


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


def _check(body: dict[str, Any]) -> str:
    return blake3.blake3(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


class Loc(NamedTuple):
    """Where a blob is: its pack, byte range there, codec kind, decoded length, type."""

    pack: bytes
    offset: int
    stored: int
    kind: int
    length: int
    type: int


# -- index bodies ---------------------------------------------------------------------------


def encode_index(packs: Iterable[tuple[bytes, int, list[tuple[bytes, Loc]]]]) -> bytes:
    parts = []
    count = 0
    for pack_id, pack_len, entries in packs:
        count += 1
        parts.append(_PACK_HEAD.pack(pack_id, pack_len, len(entries)))
        parts.extend(_ENTRY.pack(bid, loc.type, loc.kind, loc.offset, loc.stored, loc.length)
                     for bid, loc in entries)
    return INDEX_MAGIC + struct.pack("<I", count) + b"".join(parts)


def decode_index(body: bytes, what: str) -> list[tuple[bytes, int, list[tuple[bytes, Loc]]]]:
    """Parse an index body, checking every number against the body's own size before
    allocating anything for it."""
    try:
        if body[:4] != INDEX_MAGIC:
            raise ValueError("not an index")
        (count,), pos = struct.unpack_from("<I", body, 4), 8
        if count > (len(body) - pos) // _PACK_HEAD.size:
            raise ValueError(f"{count} packs cannot fit")
        out = []
        for _ in range(count):
            pack_id, pack_len, n = _PACK_HEAD.unpack_from(body, pos)
            pos += _PACK_HEAD.size
            if n > (len(body) - pos) // _ENTRY.size:
                raise ValueError(f"{n} entries cannot fit")
            entries = []
            for _ in range(n):
                bid, typ, kind, off, stored, length = _ENTRY.unpack_from(body, pos)
                pos += _ENTRY.size
                if typ not in (CHUNK, PAGE) or kind not in (Kind.RAW, Kind.ZSTD) or \
                        off + stored > pack_len or length > MAX_CHUNK:
                    raise ValueError("impossible entry")
                entries.append((bid, Loc(pack_id, off, stored, kind, length, typ)))
            out.append((pack_id, pack_len, entries))
        if pos != len(body):
            raise ValueError("trailing bytes")
        return out
    except (ValueError, struct.error) as e:
        raise DataError(f"{what} is damaged: {e}") from None


# -- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoConfig:
    id: str
    chunk_size: int = DEFAULT_CHUNK
    fanout: int = DEFAULT_FANOUT
    pack_size: int = PACK_SIZE
    encryption: dict[str, Any] | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"version": VERSION, "id": self.id, "chunk_size": self.chunk_size,
                                "fanout": self.fanout, "pack_size": self.pack_size,
                                "encryption": self.encryption}
        body["check"] = _check(body)
        return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def decode(cls, raw: bytes, what: str) -> RepoConfig:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            # a newer version may check itself differently: the version first
            if doc.get("version") != VERSION:
                raise FormatVersionError(f"{what}: repository version "
                                         f"{doc.get('version')!r}, this diskrsync reads "
                                         f"version {VERSION}")
            if doc.get("check") != _check({k: v for k, v in doc.items() if k != "check"}):
                raise ValueError("its checksum does not match")
        except ValueError as e:
            raise DataError(f"{what} is damaged: {e}") from None
        cfg = cls(str(doc["id"]), int(doc["chunk_size"]), int(doc["fanout"]),
                  int(doc["pack_size"]), doc.get("encryption"))
        if not (MIN_CHUNK <= cfg.chunk_size <= MAX_CHUNK
                and cfg.chunk_size & (cfg.chunk_size - 1) == 0 and 2 <= cfg.fanout <= 1024
                and cfg.chunk_size <= cfg.pack_size <= 1 << 30):
            raise DataError(f"{what} has impossible parameters (chunk size {cfg.chunk_size}, "
                            f"fanout {cfg.fanout}, pack size {cfg.pack_size})")
        return cfg


# -- locks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockInfo:
    key: str
    kind: str  # write, read, prune
    disk: str | None
    host: str
    pid: int
    created: float
    refreshed: float
    lease: float
    started: int = 0  # the owner's start time (/proc/PID/stat), against PID reuse

    def stale(self, now: float) -> bool:
        """Not refreshed within its lease, or held by a process of this machine that no
        longer runs (a killed push: the next one need not wait out the lease)."""
        if now - self.refreshed > self.lease:
            return True
        return self.host == socket.gethostname() and process_start(self.pid) != self.started

    def conflicts(self, other: LockInfo) -> bool:
        if "prune" in (self.kind, other.kind):
            return "write" in (self.kind, other.kind) or self.kind == other.kind == "prune"
        return self.kind == other.kind == "write" and self.disk == other.disk

    def older_than(self, other: LockInfo) -> bool:
        return (self.created, self.key) < (other.created, other.key)

    def describe(self, now: float) -> str:
        what = f"{self.kind} lock" + (f" on disk {self.disk}" if self.disk else "")
        return f"{what} held by pid {self.pid} on {self.host} for {now - self.created:.0f} s"


def process_start(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot), or -1 when it does not run
    (a zombie, waiting to be reaped, does not run either)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return -1
    fields = stat[stat.rindex(")") + 2 :].split()
    return -1 if fields[0] in ("Z", "X") else int(fields[19])


class Lease:
    """A lock object, refreshed on a thread while held (docs/repository.md, Locking)."""

    def __init__(self, store: ObjectStore, kind: str, disk: str | None, *,
                 lease: float = LEASE, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        now = clock()
        self.info = LockInfo(f"locks/{os.urandom(8).hex()}", kind, disk, socket.gethostname(),
                             os.getpid(), now, now, lease, process_start(os.getpid()))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the last refresh failed, if it did

    def _write(self, info: LockInfo | None = None) -> None:
        i = info or self.info
        self.store.put(i.key, json.dumps({
            "kind": i.kind, "disk": i.disk, "host": i.host, "pid": i.pid,
            "created": i.created, "refreshed": i.refreshed, "lease": i.lease,
            "started": i.started}).encode())

    def acquire(self) -> Lease:
        self._write()
        try:
            self.check()
        except BaseException:
            with contextlib.suppress(Exception):
                self.store.delete(self.info.key)
            raise
        self._thread = threading.Thread(target=self._refresh, daemon=True,
                                        name="diskrsync-lease")
        self._thread.start()
        return self

    def check(self) -> None:
        """BusyError when an older live lock conflicts with ours, or ours went stale."""
        now = self.clock()
        if self.info.stale(now):  # refreshed is only advanced by a write that succeeded
            raise BusyError(f"lost the repository lock ({self.lost or 'not refreshed in time'})")
        for other in list_locks(self.store):
            if other.key == self.info.key:
                continue
            if other.stale(now):
                with contextlib.suppress(Exception):
                    self.store.delete(other.key)
                continue
            if self.info.conflicts(other) and other.older_than(self.info):
                raise BusyError(f"{self.store.url} is busy: {other.describe(now)}")

    def _refresh(self) -> None:
        while not self._stop.wait(self.info.lease / 5):
            info = dataclasses.replace(self.info, refreshed=self.clock())
            try:
                self._write(info)
            except Exception as e:  # a blip is harmless; check() refuses once it expired
                self.lost = f"refreshing it failed: {e}"
            else:
                self.info, self.lost = info, None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            self.store.delete(self.info.key)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def list_locks(store: ObjectStore) -> list[LockInfo]:
    out = []
    for obj in store.list("locks/"):
        if obj.size > 4096:
            continue  # not one of ours; a stale-looking stranger is left alone
        try:
            doc = json.loads(store.get(obj.key))
            out.append(LockInfo(obj.key, str(doc["kind"]), doc.get("disk"), str(doc["host"]),
                                int(doc["pid"]), float(doc["created"]),
                                float(doc["refreshed"]), float(doc["lease"]),
                                int(doc.get("started", 0))))
        except ObjectMissing:
            continue  # released meanwhile
        except (ValueError, KeyError, TypeError):
            continue  # damaged: cannot hold anything
    return out


# -- the repository ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationInfo:
    disk: str
    number: int
    session: str
    key: str


@dataclass
class Manifest:
    disk: str
    number: int
    session: str
    time: float
    size: int
    chunk_size: int
    fanout: int
    top: bytes
    root: bytes
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return manifest_key(self.disk, self.number, self.session)

    def encode(self) -> bytes:
        return json.dumps({
            "version": VERSION, "disk": self.disk, "number": self.number,
            "session": self.session, "time": self.time, "size": self.size,
            "chunk_size": self.chunk_size, "fanout": self.fanout, "top": self.top.hex(),
            "root": self.root.hex(), "source": self.source, "meta": self.meta},
            sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes, info: GenerationInfo) -> Manifest:
        what = f"generation {info.number} of disk {info.disk}"
        try:
            d = json.loads(body)
            m = cls(str(d["disk"]), int(d["number"]), str(d["session"]), float(d["time"]),
                    int(d["size"]), int(d["chunk_size"]), int(d["fanout"]),
                    bytes.fromhex(d["top"]), bytes.fromhex(d["root"]), str(d["source"]),
                    dict(d["meta"]))
            if d.get("version") != VERSION:
                raise ValueError(f"version {d.get('version')!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{what}: manifest damaged: {e}") from None
        if (m.disk, m.number, m.session) != (info.disk, info.number, info.session):
            raise DataError(f"{what}: manifest names another generation")
        shape = Shape(m.size, m.chunk_size, m.fanout)
        if root_hash(m.size, m.chunk_size, m.fanout, m.top) != m.root or \
                len(m.top) != (HASH_SIZE if shape.chunks else 0):
            raise DataError(f"{what}: manifest's root does not match its tree")
        return m


def manifest_key(disk: str, number: int, session: str) -> str:
    return f"disks/{disk}/{number:010d}-{session}"


class Repository:
    """An opened repository: its config, codec, store, and (loaded on demand) its index."""

    def __init__(self, store: ObjectStore, config: RepoConfig, codec: ChunkCodec) -> None:
        self.store = store
        self.config = config
        self.codec = codec
        self._index: dict[bytes, Loc] | None = None
        self._index_keys: set[str] = set()
        self._index_lock = threading.Lock()
        #: stored blobs on local disk (mounts, restores); set by the caller
        self.cache: BlobCache | None = None
        #: rollback memory (encrypted repositories only, as for images: format.md, Security)
        self.seen = SeenGenerations() if isinstance(codec, ContentSealedCodec) else None

    # -- creating and opening --

    @classmethod
    def init(cls, store: ObjectStore, *, chunk_size: int = DEFAULT_CHUNK,
             fanout: int = DEFAULT_FANOUT, pack_size: int = PACK_SIZE,
             key: MasterKey | None = None, envelope: Envelope | None = None) -> Repository:
        """Create a repository in an empty store (UsageError if one is there already)."""
        store.check()
        if store.head("config") is not None:
            raise UsageError(f"{store.url} already holds a repository")
        encryption = None
        if key is not None:
            encryption = {"key_id": key.key_id.hex(), "cipher": key.cipher,
                          "envelope": envelope.to_json() if envelope is not None else None}
        config = RepoConfig(os.urandom(8).hex(), chunk_size, fanout, pack_size, encryption)
        RepoConfig.decode(config.encode(), "new config")  # the same checks as on open
        store.put("config", config.encode())
        return cls(store, config, ContentSealedCodec(key) if key is not None else STANDARD)

    @staticmethod
    def read_config(store: ObjectStore) -> RepoConfig:
        """The repository's parameters, and its key's public facts, without the key."""
        store.check()
        try:
            raw = store.get("config")
        except ObjectMissing:
            raise UsageError(f"{store.url} is not a diskrsync repository (no config)") from None
        return RepoConfig.decode(raw, f"{store.url}/config")

    @classmethod
    def open(cls, store: ObjectStore, keyring: Keyring | None = None) -> Repository:
        config = cls.read_config(store)
        codec: ChunkCodec = STANDARD
        enc = config.encryption
        if enc is not None:
            if keyring is None:
                raise UsageError(f"{store.url} is encrypted: reading or writing it needs its "
                                 f"key")
            try:
                key_id = bytes.fromhex(enc["key_id"])
                envelope = (Envelope.from_json(enc["envelope"])
                            if enc.get("envelope") is not None else None)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{store.url}/config: encryption entry damaged: {e}") from None
            codec = ContentSealedCodec(keyring.unlock(key_id, envelope, store.url))
        return cls(store, config, codec)

    # -- framing --

    def frame(self, name: str, body: bytes) -> bytes:
        if isinstance(self.codec, ContentSealedCodec):
            return SEALED + self.codec.seal_object(name, body)
        return PLAIN + body + blake3.blake3(b"diskrsync-repo-object-v1" + name.encode()
                                            + body).digest()

    def unframe(self, name: str, data: bytes, what: str) -> bytes:
        magic, rest = data[:4], data[4:]
        sealed = isinstance(self.codec, ContentSealedCodec)
        if magic != (SEALED if sealed else PLAIN):
            raise DataError(f"{what} is damaged (not a {'sealed' if sealed else 'plain'} "
                            f"object of this repository)")
        if sealed:
            assert isinstance(self.codec, ContentSealedCodec)
            try:
                return self.codec.open_object(name, rest)
            except ValueError as e:
                raise DataError(f"{what} {e}") from None
        body, check = rest[:-HASH_SIZE], rest[-HASH_SIZE:]
        if len(rest) < HASH_SIZE or blake3.blake3(
                b"diskrsync-repo-object-v1" + name.encode() + body).digest() != check:
            raise DataError(f"{what} is damaged (checksum mismatch)")
        return body

    # -- the index --

    def index(self, refresh: bool = False) -> dict[bytes, Loc]:
        """Every blob's location, from every index object: loaded once, and with
        ``refresh`` completed by the index objects written since (a long-lived reader
        meeting a generation newer than its index)."""
        with self._index_lock:
            if self._index is None or refresh:
                found = self._index if self._index is not None else {}
                keys = [o.key for o in self.store.list("index/")
                        if o.key not in self._index_keys]
                with ThreadPoolExecutor(8) as pool:
                    for key, raw in zip(keys, pool.map(self._get_index, keys), strict=True):
                        if raw is None:
                            continue  # pruned meanwhile: a later refresh finds its successor
                        body = self.unframe(key, raw, f"index object {key}")
                        for _pack, _len, entries in decode_index(body, key):
                            found.update(entries)
                        self._index_keys.add(key)
                self._index = found
            return self._index

    def _get_index(self, key: str) -> bytes | None:
        try:
            return self.store.get(key)
        except ObjectMissing:
            return None

    def learn(self, entries: Iterable[tuple[bytes, Loc]]) -> None:
        index = self.index()
        with self._index_lock:
            index.update(entries)

    # -- disks and generations --

    def disks(self) -> list[str]:
        names = {o.key.split("/")[1] for o in self.store.list("disks/") if o.key.count("/") == 2}
        return sorted(n for n in names if _DISK.fullmatch(n))

    def generations(self, disk: str) -> list[GenerationInfo]:
        """The disk's generations, oldest first (equal numbers: smaller session first)."""
        check_disk_name(disk)
        out = []
        for o in self.store.list(f"disks/{disk}/"):
            m = _MANIFEST.fullmatch(o.key.rsplit("/", 1)[1])
            if m:
                out.append(GenerationInfo(disk, int(m.group(1)), m.group(2), o.key))
        return sorted(out, key=lambda g: (g.number, g.session))

    def manifest(self, info: GenerationInfo) -> Manifest:
        what = f"generation {info.number} of disk {info.disk}"
        try:
            raw = self.store.get(info.key)
        except ObjectMissing:
            raise DataError(f"{what}: its manifest vanished (pruned meanwhile?)") from None
        m = Manifest.decode(self.unframe(info.key, raw, f"{what}'s manifest"), info)
        if (m.chunk_size, m.fanout) != (self.config.chunk_size, self.config.fanout):
            raise DataError(f"{what}: geometry differs from the repository's")
        return m

    def generation(self, disk: str, number: int | None = None) -> Manifest:
        """Generation ``number`` of ``disk`` (the newest when None)."""
        gens = self.generations(disk)
        if number is not None:
            gens = [g for g in gens if g.number == number]
        if not gens:
            what = f"generation {number} of disk {disk}" if number is not None else \
                f"disk {disk}"
            raise UsageError(f"{self.store.url}: no {what}")
        chosen = self.manifest(gens[-1] if number is None else gens[0])
        self.check_rollback(disk, chosen)
        return chosen

    def _place(self, disk: str) -> str:
        return f"{self.store.url}#{disk}"

    def check_rollback(self, disk: str, chosen: Manifest | None = None) -> None:
        """In an encrypted repository: DataError when the disk's newest generation is older
        than one this client has seen (the store dropped manifests, or serves an old copy),
        or a generation's root differs from what it saw; then remember the newest."""
        if self.seen is None:
            return
        assert isinstance(self.codec, ContentSealedCodec)
        gens = self.generations(disk)
        newest = self.manifest(gens[-1]) if gens else None
        roots = {m.number: m.root for m in (newest, chosen) if m is not None}
        key_id = self.codec.key.key_id
        self.seen.check(key_id, self._place(disk),
                        (newest.number, newest.root) if newest else None, roots,
                        f"disk {disk} of {self.store.url}")
        if newest is not None:
            self.seen.record(key_id, self._place(disk), newest.number, newest.root)

    def remember(self, manifest: Manifest) -> None:
        """A generation this client committed: the newest it has seen of that disk."""
        if self.seen is not None:
            assert isinstance(self.codec, ContentSealedCodec)
            self.seen.record(self.codec.key.key_id, self._place(manifest.disk), manifest.number,
                             manifest.root)

    def snapshot(self, disk: str, number: int | None = None) -> RepoSnapshot:
        """A generation without a read lease: for callers that hold another lock (prune,
        a writer's base) or accept that prune may remove what it reads."""
        return RepoSnapshot(self, self.generation(disk, number))

    def pin(self, disk: str, number: int | None = None, *,
            lease: float = LEASE) -> RepoSnapshot:
        """A generation pinned by a read lease, taken *before* its manifest is read, so
        that no prune deletes a pack it needs until it is closed (docs/repository.md,
        Garbage collection). Use as a context manager."""
        held = Lease(self.store, "read", check_disk_name(disk), lease=lease).acquire()
        try:
            snap = self.snapshot(disk, number)
        except BaseException:
            held.release()
            raise
        snap.lease = held
        return snap

    # -- blobs --

    def read_blobs(self, ids: list[bytes], *, what: Callable[[bytes], str],
                   gap: int = 64 << 10, span: int = 4 << 20,
                   cached: bool = True) -> dict[bytes, bytes]:
        """The stored bytes of blobs, from the cache or fetched in as few ranged GETs as
        adjacency allows (ranges up to ``span`` bytes, skipping gaps up to ``gap``); not
        yet decoded: a caller whose check fails calls ``refetch``."""
        index = self.index()
        out: dict[bytes, bytes] = {}
        cache = self.cache if cached else None
        if cache is not None:
            for bid in dict.fromkeys(ids):
                data = cache.get(bid)
                if data is not None:
                    out[bid] = data
        by_pack: dict[bytes, list[tuple[bytes, Loc]]] = {}
        if any(b not in index and b not in out for b in ids):
            index = self.index(refresh=True)  # newer than what this reader loaded?
        for bid in dict.fromkeys(b for b in ids if b not in out):
            loc = index.get(bid)
            if loc is None:
                raise DataError(f"{what(bid)}: blob {bid.hex()[:16]}… is in no pack")
            by_pack.setdefault(loc.pack, []).append((bid, loc))
        ranges: list[tuple[bytes, int, int, list[tuple[bytes, Loc]]]] = []
        for pack, blobs in by_pack.items():
            blobs.sort(key=lambda b: b[1].offset)
            cur: list[tuple[bytes, Loc]] = []
            for b in blobs:
                if cur and (b[1].offset - (cur[-1][1].offset + cur[-1][1].stored) > gap
                            or b[1].offset + b[1].stored - cur[0][1].offset > span):
                    ranges.append((pack, cur[0][1].offset, cur[-1][1].offset
                                   + cur[-1][1].stored - cur[0][1].offset, cur))
                    cur = []
                cur.append(b)
            if cur:
                ranges.append((pack, cur[0][1].offset,
                               cur[-1][1].offset + cur[-1][1].stored - cur[0][1].offset, cur))

        def fetch(r: tuple[bytes, int, int, list[tuple[bytes, Loc]]]) -> dict[bytes, bytes]:
            pack, start, length, blobs = r
            try:
                data = self.store.get_range(pack_key(pack), start, length)
            except ObjectMissing:
                raise DataError(f"{what(blobs[0][0])}: pack {pack.hex()[:16]}… is missing"
                                ) from None
            except DataError as e:
                raise DataError(f"{what(blobs[0][0])}: pack {pack.hex()[:16]}…: {e.message}"
                                ) from None
            return {bid: data[loc.offset - start : loc.offset - start + loc.stored]
                    for bid, loc in blobs}

        fetched: dict[bytes, bytes] = {}
        if len(ranges) == 1:
            fetched.update(fetch(ranges[0]))
        elif ranges:
            with ThreadPoolExecutor(min(8, len(ranges))) as pool:
                for part in pool.map(fetch, ranges):
                    fetched.update(part)
        if self.cache is not None:
            for bid, data in fetched.items():
                self.cache.put(bid, data)
        out.update(fetched)
        return out

    def refetch(self, bid: bytes, what: str) -> bytes:
        """A blob's stored bytes from the store again, after they failed their check (a
        damaged cache file is dropped; damage in the store fails again, as it should)."""
        if self.cache is not None:
            self.cache.drop(bid)
        return self.read_blobs([bid], what=lambda b: what, cached=False)[bid]

    def decode_page(self, bid: bytes, stored: bytes, what: str) -> bytes:
        loc = self.index()[bid]
        try:
            page = self.codec.decode(loc.kind, stored, loc.length, ChunkAt(0, bid))
        except ValueError as e:
            raise DataError(f"{what}: index page {bid.hex()[:16]}… {e}") from None
        if loc.type != PAGE or node_hash_packed(page) != bid or len(page) % HASH_SIZE:
            raise DataError(f"{what}: index page {bid.hex()[:16]}… does not match its id")
        return page

    def writer(self, disk: str, *, lease: float = LEASE) -> GenerationWriter:
        return GenerationWriter(self, check_disk_name(disk), lease=lease)


class RepoSnapshot:
    """One generation of a disk, read chunk by chunk; every chunk checked against its
    content id before it is returned."""

    def __init__(self, repo: Repository, manifest: Manifest) -> None:
        self.repo = repo
        self.manifest = manifest
        self.shape = Shape(manifest.size, manifest.chunk_size, manifest.fanout)
        self.size = manifest.size
        self.chunk_size = manifest.chunk_size
        self._leaves: bytes | None = None
        self.pages: list[bytes] = []  # every page id of the tree, once walked
        self.lease: Lease | None = None  # a read lease, when pinned (Repository.pin)

    @property
    def what(self) -> str:
        return f"disk {self.manifest.disk} generation {self.manifest.number}"

    # -- api.DiskSnapshot: what the mount, restore and verify read through --

    @property
    def info(self) -> ApiGeneration:
        return _api_info(self.manifest)

    @property
    def chunk_count(self) -> int:
        return self.shape.chunks

    def chunk_is_zero(self, index: int) -> bool:
        return self.leaf(index) == merkle.zero_hash(self.shape.chunk_length(index))

    def leaves(self) -> bytes:
        """Every chunk's content id laid end to end (the tree walked from the top, each page
        checked against the id its parent names and against the shape)."""
        if self._leaves is None:
            ids = [self.manifest.top] if self.shape.chunks else []
            for level in range(self.shape.top_level, 0, -1):
                pages = self.repo.read_blobs(ids, what=lambda b: self.what)
                self.pages.extend(ids)
                below: list[bytes] = []
                for j, bid in enumerate(ids):
                    try:
                        page = self.repo.decode_page(bid, pages[bid], self.what)
                    except DataError:
                        if self.repo.cache is None:
                            raise
                        pages[bid] = self.repo.refetch(bid, self.what)
                        page = self.repo.decode_page(bid, pages[bid], self.what)
                    if len(page) != len(self.shape.children(level, j)) * HASH_SIZE:
                        raise DataError(f"{self.what}: index page {bid.hex()[:16]}… has "
                                        f"{len(page) // HASH_SIZE} entries, its place needs "
                                        f"{len(self.shape.children(level, j))}")
                    below.extend(page[i : i + HASH_SIZE] for i in range(0, len(page),
                                                                        HASH_SIZE))
                ids = below
            self._leaves = b"".join(ids)
        return self._leaves

    def blob_ids(self) -> set[bytes]:
        """Every blob this generation needs: its pages and its stored chunks."""
        leaves = self.leaves()
        zeros = {merkle.zero_hash(self.chunk_size)}
        if self.shape.chunks:
            zeros.add(merkle.zero_hash(self.shape.chunk_length(self.shape.chunks - 1)))
        ids = {leaves[i : i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)}
        return (ids - zeros) | set(self.pages)

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __enter__(self) -> RepoSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def leaf(self, index: int) -> bytes:
        return self.leaves()[index * HASH_SIZE : (index + 1) * HASH_SIZE]

    def read_chunks(self, indices: list[int]) -> dict[int, bytes]:
        """Chunks by index, checked; adjacent ones fetched in one ranged GET."""
        length = self.shape.chunk_length
        ids = {i: self.leaf(i) for i in indices}
        stored_ids = [bid for i, bid in ids.items() if bid != merkle.zero_hash(length(i))]
        stored = self.repo.read_blobs(stored_ids, what=lambda b: self.what) if stored_ids \
            else {}
        out: dict[int, bytes] = {}
        for i, bid in ids.items():
            n = length(i)
            if bid == merkle.zero_hash(n):
                out[i] = bytes(n)
                continue
            for attempt in (1, 2):
                try:
                    out[i] = self._decode(i, bid, n, stored[bid])
                    break
                except ValueError as e:
                    if attempt == 2 or self.repo.cache is None:
                        raise CorruptChunkError(i, i * self.chunk_size,
                                                f"{self.what}, blob {bid.hex()[:16]}…: {e}"
                                                ) from None
                    stored[bid] = self.repo.refetch(bid, self.what)  # a damaged cache file
        return out

    def _decode(self, i: int, bid: bytes, n: int, stored: bytes) -> bytes:
        loc = self.repo.index()[bid]
        if loc.type != CHUNK or loc.length != n:
            raise ValueError(f"blob {bid.hex()[:16]}… is not a chunk of {n} bytes")
        data = self.repo.codec.decode(loc.kind, stored, n, ChunkAt(i, bid))
        if self.repo.codec.leaf_hash(data, i) != bid:
            raise ValueError("content hash mismatch")
        return data

    def read_chunk(self, index: int) -> bytes:
        return self.read_chunks([index])[index]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the disk (clipped to its size)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        chunks = self.read_chunks(list(range(first, last + 1)))
        data = b"".join(chunks[i] for i in range(first, last + 1))
        start = offset - first * self.chunk_size
        return data[start : start + end - offset]


# -- writing -----------------------------------------------------------------------------------


class Packer:
    """Blobs into packs: closed at the pack size, uploaded on a bounded pool (at most
    ``2 * uploads`` packs in memory), an index object written every ``packs_per_index``
    packs and by ``finish``. Stored bytes go in as the codec made them: a blob's seal binds
    its id, not its place, so prune can move blobs between packs without the key."""

    def __init__(self, repo: Repository, *, uploads: int = 4) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        self._pack: list[tuple[bytes, Loc, bytes]] = []  # id, where (pack unknown), stored
        self._pack_bytes = 0
        self._pool = ThreadPoolExecutor(uploads, thread_name_prefix="diskrsync-upload")
        self._slots = threading.BoundedSemaphore(uploads * 2)
        self._uploads: list[Future[None]] = []
        self._written: list[tuple[bytes, int, list[tuple[bytes, Loc]]]] = []  # not indexed
        self.packs_per_index = PACKS_PER_INDEX
        self.packs = 0
        self.bytes = 0

    def append(self, bid: bytes, typ: int, kind: int, length: int, stored: bytes) -> None:
        full = None
        with self._lock:
            self._pack.append((bid, Loc(b"", self._pack_bytes, len(stored), kind, length, typ),
                               stored))
            self._pack_bytes += len(stored)
            self.bytes += len(stored)
            if self._pack_bytes >= self.repo.config.pack_size:
                full, self._pack, self._pack_bytes = self._pack, [], 0
        if full:
            self._close(full)

    def _close(self, blobs: list[tuple[bytes, Loc, bytes]]) -> None:
        """Hand a full pack to an upload thread, which assembles (one copy), hashes and
        stores it: the caller goes back to encoding at once."""
        self._slots.acquire()

        def upload() -> None:
            try:
                size = sum(len(b[2]) for b in blobs)
                trailer = self.repo.frame("pack", encode_index(
                    [(bytes(HASH_SIZE), size, [(bid, loc) for bid, loc, _ in blobs])]))
                pack = b"".join([*(b[2] for b in blobs), trailer,
                                 struct.pack("<I", len(trailer)), PACK_MAGIC])
                pack_id = blake3.blake3(pack).digest()
                self.repo.store.put(pack_key(pack_id), pack)
            finally:
                self._slots.release()
            located = [(bid, loc._replace(pack=pack_id)) for bid, loc, _ in blobs]
            with self._lock:
                self._written.append((pack_id, len(pack), located))
                self.packs += 1
                flush = len(self._written) >= self.packs_per_index
            if flush:
                self._write_index()

        self._uploads.append(self._pool.submit(upload))

    def _write_index(self) -> None:
        with self._lock:
            packs, self._written = self._written, []
        if packs:
            write_index(self.repo, packs)
            self.repo.learn(e for _p, _n, entries in packs for e in entries)

    def wait(self) -> None:
        """Every pack closed so far is stored (an upload's error is raised here)."""
        for f in list(self._uploads):
            f.result()

    def finish(self) -> None:
        """Close the open pack, wait for every upload, index what is not indexed yet."""
        with self._lock:
            last, self._pack, self._pack_bytes = self._pack, [], 0
        if last:
            self._close(last)
        self.wait()
        self._write_index()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_index(repo: Repository, packs: list[tuple[bytes, int, list[tuple[bytes, Loc]]]]
                ) -> str:
    """Store one index object for ``packs``; its key."""
    body = encode_index(packs)
    key = f"index/{blake3.blake3(body).hexdigest()}"
    repo.store.put(key, repo.frame(key, body))
    return key


class GenerationWriter:
    """One writer session of one disk: stores new blobs in packs, builds the tree, commits
    the manifest last (docs/repository.md, "Writing a generation").

    ``begin(size, base)`` sets the disk's size and starts from ``base``'s chunks (a previous
    generation; else all zeros); ``put_chunk`` replaces chunks; ``commit`` makes the
    generation visible and returns its manifest. Use as a context manager: the lease is
    taken on entry and dropped on exit; leaving without a commit stores nothing visible."""

    def __init__(self, repo: Repository, disk: str, *, lease: float = LEASE,
                 uploads: int = 4) -> None:
        self.repo = repo
        self.disk = disk
        self.session = os.urandom(8).hex()
        self.lease = Lease(repo.store, "write", disk, lease=lease)
        self.packer = Packer(repo, uploads=uploads)
        self._lock = threading.Lock()
        self._session_ids: set[bytes] = set()
        self.shape: Shape | None = None
        self._leaves = bytearray()
        self.counts = {"chunks_stored": 0, "chunks_deduplicated": 0}

    @property
    def stats(self) -> dict[str, int]:
        return {**self.counts, "bytes_stored": self.packer.bytes, "packs": self.packer.packs}

    def __enter__(self) -> GenerationWriter:
        self.lease.acquire()
        try:
            self.repo.index()
        except BaseException:
            self.lease.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.packer.close()
        finally:
            self.lease.release()

    def begin(self, size: int, base: RepoSnapshot | None = None) -> None:
        cfg = self.repo.config
        self.shape = Shape(size, cfg.chunk_size, cfg.fanout)
        leaves = bytearray()
        old = base.leaves() if base is not None else b""
        for i in range(self.shape.chunks):
            n = self.shape.chunk_length(i)
            if base is not None and i < base.shape.chunks and base.shape.chunk_length(i) == n:
                leaves += old[i * HASH_SIZE : (i + 1) * HASH_SIZE]
            else:  # beyond the base's end, or its short last chunk grown: zeros
                leaves += merkle.zero_hash(n)
        self._leaves = leaves

    def put_chunk(self, index: int, data: bytes) -> None:
        """Set chunk ``index`` to ``data`` (thread-safe); stored unless the repository has it."""
        shape = self.shape
        if shape is None:
            raise ValueError("begin() first")  # a caller's bug
        if len(data) != shape.chunk_length(index):
            raise ValueError(f"chunk {index} of {len(data)} bytes, expected "
                             f"{shape.chunk_length(index)}")
        if is_zero(data):
            bid = merkle.zero_hash(len(data))
        else:
            bid = self.repo.codec.leaf_hash(data, index)
            self._add(bid, CHUNK, data, index)
        self._leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE] = bid

    def knows(self, bid: bytes) -> bool:
        """Whether the repository (or this session) already stores blob ``bid``."""
        return bid in self._session_ids or bid in self.repo.index()

    def put_stored(self, index: int, bid: bytes, kind: int, stored: bytes, length: int) -> None:
        """Set chunk ``index`` to the chunk with content id ``bid``, already encoded by the
        repository's codec (by a worker thread); stored unless the repository has it."""
        with self._lock:
            new = not self.knows(bid)
            if new:
                self._session_ids.add(bid)
            self.counts["chunks_stored" if new else "chunks_deduplicated"] += 1
        if new:
            self.packer.append(bid, CHUNK, kind, length, stored)
        self._leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE] = bid

    def put_blob(self, bid: bytes, typ: int, kind: int, length: int, stored: bytes) -> bool:
        """Store a blob as another repository with the same codec stored it (a copy);
        False when this one has it already."""
        with self._lock:
            if self.knows(bid):
                return False
            self._session_ids.add(bid)
            self.counts["chunks_stored"] += typ == CHUNK
        self.packer.append(bid, typ, kind, length, stored)
        return True

    def set_leaves(self, leaves: bytes) -> None:
        """Every chunk's content id at once (a copy of a generation of this geometry)."""
        if self.shape is None or len(leaves) != self.shape.chunks * HASH_SIZE:
            raise ValueError("leaves of another shape")  # a caller's bug
        self._leaves = bytearray(leaves)

    def set_leaf(self, index: int, bid: bytes) -> None:
        """Set chunk ``index`` to a chunk the repository already has (or zeros)."""
        self._leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE] = bid

    def leaf(self, index: int) -> bytes:
        return bytes(self._leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _add(self, bid: bytes, typ: int, data: bytes, index: int) -> None:
        with self._lock:
            if bid in self._session_ids or bid in self.repo.index():
                self.counts["chunks_deduplicated"] += typ == CHUNK
                return
            self._session_ids.add(bid)
            self.counts["chunks_stored"] += typ == CHUNK
        kind, stored = self.repo.codec.encode(data, ChunkAt(index, bid))
        self.packer.append(bid, typ, int(kind), len(data), stored)

    def _tree(self) -> bytes:
        """Store every page of the tree not yet present; the top's id (b"" when empty)."""
        assert self.shape is not None
        ids = [bytes(self._leaves[i : i + HASH_SIZE])
               for i in range(0, len(self._leaves), HASH_SIZE)]
        for level in range(1, self.shape.top_level + 1):
            above = []
            for j in range(self.shape.count(level)):
                kids = self.shape.children(level, j)
                page = b"".join(ids[kids.start : kids.stop])
                bid = node_hash_packed(page)
                self._add(bid, PAGE, page, j)
                above.append(bid)
            ids = above
        return ids[0] if ids else b""

    def root(self) -> bytes:
        """The root the generation will have (its pages stored as commit stores them): a
        writer compares it with the newest generation's to make no generation for equal
        content."""
        assert self.shape is not None
        cfg = self.repo.config
        return root_hash(self.shape.size, cfg.chunk_size, cfg.fanout, self._tree())

    def commit(self, *, source: str = "", meta: dict[str, Any] | None = None,
               now: Callable[[], float] = time.time,
               expect_root: bytes | None = None) -> Manifest:
        """Make the generation visible. ``expect_root``: the root the source computed; a
        tree that disagrees is refused (DataError) before anything is visible."""
        if self.shape is None:
            raise ValueError("begin() first")
        top = self._tree()
        if expect_root is not None:
            cfg = self.repo.config
            mine = root_hash(self.shape.size, cfg.chunk_size, cfg.fanout, top)
            if mine != expect_root:
                raise DataError(f"the new generation of disk {self.disk} has root "
                                f"{mine.hex()[:16]}…, the source computed "
                                f"{expect_root.hex()[:16]}…: not committed")
        self.packer.finish()  # an upload's error fails the commit: nothing is visible yet
        cfg = self.repo.config
        manifest = Manifest(self.disk, 0, self.session, now(), self.shape.size,
                            cfg.chunk_size, cfg.fanout, top,
                            root_hash(self.shape.size, cfg.chunk_size, cfg.fanout, top),
                            source, meta or {})
        self.lease.check()
        number = max((g.number for g in self.repo.generations(self.disk)), default=0) + 1
        old = None
        while True:
            manifest.number = number
            self.repo.store.put(manifest.key, self.repo.frame(manifest.key, manifest.encode()))
            if old is not None:
                self.repo.store.delete(old)
            gens = self.repo.generations(self.disk)
            if not any(g.number == number and g.session < self.session for g in gens):
                self.repo.remember(manifest)
                return manifest
            # a lost lease let another writer commit this number first: both generations
            # stay, ours under the next free number (docs/repository.md, Locking)
            old, number = manifest.key, max(g.number for g in gens) + 1


class RepoSource(SourceReader):
    """A repository generation as the source of a push, a copy into an image, or a
    restore: every chunk checked before it leaves; ``extents`` are its non-zero chunks, so
    a scan never reads what the repository knows to be zeros. Closing it closes the
    snapshot (and its read lease, when pinned)."""

    def __init__(self, snap: RepoSnapshot) -> None:
        self.snap = snap
        self.size = snap.size
        m = snap.manifest
        self.description = f"{snap.repo.store.url} disk {m.disk} generation {m.number}"

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at {offset} past the end of "
                             f"{self.description} ({self.size} bytes)")
        return self.snap.read(offset, length)

    def extents(self) -> Iterator[tuple[int, int]]:
        shape, leaves = self.snap.shape, self.snap.leaves()
        start = None
        for i in range(shape.chunks + 1):
            zero = i == shape.chunks or leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE] == \
                merkle.zero_hash(shape.chunk_length(i))
            if zero and start is not None:
                end = min(i * shape.chunk_size, self.size)
                yield start * shape.chunk_size, end - start * shape.chunk_size
                start = None
            elif not zero and start is None:
                start = i

    def close(self) -> None:
        self.snap.close()


def _api_info(m: Manifest) -> ApiGeneration:
    return ApiGeneration(m.number, m.time, m.size, m.root, m.source, dict(m.meta))


class RepoDisk:
    """One disk of a repository as an ``api.DiskImage`` (what the mount and the read-side
    commands open): its generations, and snapshots pinned by read leases."""

    def __init__(self, repo: Repository, disk: str, *, lease: float = LEASE) -> None:
        self.repo = repo
        self.disk = check_disk_name(disk)
        self.lease = lease
        self._gens: list[ApiGeneration] | None = None

    def generations(self) -> list[ApiGeneration]:
        if self._gens is None:
            self._gens = [_api_info(self.repo.manifest(g))
                          for g in self.repo.generations(self.disk)]
        return self._gens

    def refresh(self) -> None:
        self._gens = None

    def snapshot(self, number: int | None = None) -> RepoSnapshot:
        return self.repo.pin(self.disk, number, lease=self.lease)

    def close(self) -> None:
        pass
