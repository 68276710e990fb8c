"""Sans-I/O implementation of the original Go diskrsync wire protocol ``BSNC0002``.

Design note
-----------
This module lets diskrsync talk to (and stand in for) the original Go tool, byte for byte. It does
no I/O of its own, in the style of h11: each role is a state machine that is fed the bytes read
from the peer (``receive_data``) and hands back the bytes to write (``data_to_send``). Storage is
reached only through the small :class:`LegacyTargetStore` / :class:`LegacySourceReader` protocols,
and leaf hashing can be supplied from outside (``leaf_hashes=``) so a caller may hash in threads.

The protocol logic of each role is written as a private generator that mirrors the Go code's
sequential shape (read header, walk the tree depth first, stream the tail). The generator yields
how many peer bytes it needs next; the public methods drive it. Hence the code reads like the Go
source while the public surface stays push-based and transport-agnostic.

Protocol facts, from dop251/diskrsync ``sync.go`` (BSNC0002 versions) and checked against the
recorded transcripts in ``/work/shared/vectors``:

* Each side first sends ``b"BSNC0002"`` + its size as 8 bytes little endian; the target does so
  without waiting for the source. common = min(sizes).
* If common > 0 both build the tree of :func:`go_tree_shape` over bytes ``[0, common)``. A leaf's
  digest is BLAKE2b-512 of its bytes; an inner node's is BLAKE2b-512 of its children's digests
  concatenated. Child ``i`` of a node covering ``[off, off+len)`` ends at
  ``off + len*(i+1)//order``.
* The target walks depth first: it sends a node's 64-byte digest and reads one command byte:
  ``2`` equal (skip the subtree); ``3`` not equal (inner: descend; leaf: exactly the leaf's bytes
  follow, unframed); ``0`` hole (leaf only: the source's leaf is all zeros, nothing follows).
* If the source is larger it then streams the tail, chunked every 128 KiB from ``common``: a
  chunk that is not all zeros goes as ``1`` + the chunk (the last one may be short); a run of
  all-zero chunks as ``0`` + the run's length as int64 LE. The Go target finds the end of a short
  block and of the stream by EOF, so the source must close its side when done.
* If the source is smaller the target truncates to the source's size.

Deliberate differences from the Go target, all of which only reject peers the Go source never
imitates: an unknown command byte, a hole command for an inner node, a tail that does not end
exactly at the announced size, and bytes after the end raise :class:`PeerError` (Go would ignore
them or silently leave a short file).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from diskrsync.base.errors import LocalError, PeerError, UsageError
from diskrsync.synccore.protocol import DEFAULT_MAX_SIZE

__all__ = [
    "CMD_BLOCK",
    "CMD_EQUAL",
    "CMD_HOLE",
    "CMD_NOT_EQUAL",
    "DEF_TARGET_BLOCK_SIZE",
    "HASH_SIZE",
    "MAGIC",
    "TAIL_BLOCK_SIZE",
    "GoRemoteRequest",
    "HeaderExchanged",
    "LeafHashProvider",
    "LegacyEvent",
    "LegacySource",
    "LegacySourceReader",
    "LegacyTarget",
    "LegacyTargetStore",
    "ProgressLineWriter",
    "RangeSynced",
    "SyncFinished",
    "TreeShape",
    "compute_leaf_hashes",
    "format_progress_start",
    "format_progress_update",
    "go_tree_shape",
    "leaf_hash",
    "node_hash",
    "parse_go_remote_args",
    "tree_digests",
]

MAGIC: Final = b"BSNC0002"
HASH_SIZE: Final = 64
#: ``DefTargetBlockSize`` in sync.go: the nominal leaf size and the tail chunk size.
DEF_TARGET_BLOCK_SIZE: Final = 128 * 1024
TAIL_BLOCK_SIZE: Final = DEF_TARGET_BLOCK_SIZE

# Command bytes (sync.go: cmdHole, cmdBlock, cmdEqual, cmdNotEqual = iota).
CMD_HOLE: Final = 0
CMD_BLOCK: Final = 1
CMD_EQUAL: Final = 2
CMD_NOT_EQUAL: Final = 3

_HEADER = struct.Struct("<8sQ")
_INT64 = struct.Struct("<q")
_INT64_MAX: Final = (1 << 63) - 1


# --------------------------------------------------------------------------------------------
# Tree shape and hashing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeShape:
    """The Merkle tree both Go peers build over the common size; must match theirs exactly.

    ``leaf_size`` is Go's nominal block size (what ``--verbose`` logs); real leaves differ by a
    few bytes because of the integer split, see :meth:`leaf_range`.
    """

    size: int
    levels: int
    order: int
    target_block_size: int
    leaf_size: int

    @property
    def leaf_count(self) -> int:
        """Number of leaves: ``order ** (levels - 1)``."""
        return int(self.order ** (self.levels - 1))

    def node_count(self, depth: int) -> int:
        """Number of nodes at ``depth`` (0 = root)."""
        return int(self.order**depth)

    def node_range(self, depth: int, index: int) -> tuple[int, int]:
        """(offset, length) of node ``index`` at ``depth``, split exactly like Go's ``build``."""
        offset, length = 0, self.size
        order = self.order
        for level in range(depth):
            digit = (index // order ** (depth - 1 - level)) % order
            start = offset + length * digit // order
            end = offset + length * (digit + 1) // order
            offset, length = start, end - start
        return offset, length

    def leaf_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of leaf ``index``."""
        return self.node_range(self.levels - 1, index)

    def iter_leaf_ranges(self) -> Iterator[tuple[int, int]]:
        """All leaves in order as (offset, length); cheap, for callers that hash in parallel."""

        def walk(offset: int, length: int, depth: int) -> Iterator[tuple[int, int]]:
            if depth == self.levels - 1:
                yield offset, length
                return
            start = offset
            for i in range(self.order):
                end = offset + length * (i + 1) // self.order
                yield from walk(start, end - start, depth + 1)
                start = end

        return walk(0, self.size, 0)


def go_tree_shape(size: int) -> TreeShape:
    """Tree shape for ``size`` common bytes, as ``(*tree).calc`` in sync.go derives it.

    The block size starts at 128 KiB and doubles while ``size / block > 1048576``. With
    ``blocks = size // block``: if ``blocks == 0`` the tree is a single leaf. Otherwise
    ``levels = 8`` and the order grows from 1 while ``size // (order+1)**7 >= block/2`` and the
    distance ``|block - size // (order+1)**7|`` keeps shrinking. If that leaves order 1 (exactly
    when ``size // 128 < block/2``, i.e. size < 8 MiB at the default block), the tree becomes
    binary with ``levels = floor(log2(blocks)) + 1``.
    """
    if size <= 0:
        raise ValueError("the Go tree is only built for a positive common size")
    target = DEF_TARGET_BLOCK_SIZE
    while size // target > 1048576:
        target <<= 1
    blocks = size // target
    levels, order = 8, 1
    if blocks > 0:
        best = -1
        while True:
            nominal = size // (order + 1) ** 7
            if nominal < target // 2:
                break
            distance = abs(target - nominal)
            if best != -1 and distance > best:
                break
            best = distance
            order += 1
        if order < 2:
            order = 2
            levels = blocks.bit_length()  # == int(math.Log2(blocks)) + 1, exactly
    else:
        levels, order = 1, 1
    leaf_size = int(float(size) / float(order ** (levels - 1)))
    return TreeShape(size, levels, order, target, leaf_size)


def leaf_hash(data: bytes | bytearray | memoryview) -> bytes:
    """Digest of a leaf: BLAKE2b-512 of its bytes."""
    return hashlib.blake2b(data, digest_size=HASH_SIZE).digest()


def node_hash(children: Sequence[bytes]) -> bytes:
    """Digest of an inner node: BLAKE2b-512 of its children's digests, concatenated."""
    h = hashlib.blake2b(digest_size=HASH_SIZE)
    for child in children:
        h.update(child)
    return h.digest()


#: Given the tree shape, returns the digests of all leaves in order. Lets a caller hash with
#: threads (hashlib releases the GIL) or reuse hashes it already has.
LeafHashProvider = Callable[[TreeShape], Sequence[bytes]]


def compute_leaf_hashes(shape: TreeShape, read: Callable[[int, int], bytes]) -> list[bytes]:
    """Hash every leaf sequentially through ``read(offset, length)``; the default provider."""
    hashes = []
    for offset, length in shape.iter_leaf_ranges():
        data = read(offset, length)
        if len(data) != length:
            raise LocalError(
                f"short read while hashing: expected {length} bytes at offset {offset}, "
                f"got {len(data)}"
            )
        hashes.append(leaf_hash(data))
    return hashes


def tree_digests(shape: TreeShape, leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Digests of every node, ``result[depth][index]``, built bottom-up from the leaf digests."""
    if len(leaf_hashes) != shape.leaf_count:
        raise ValueError(f"expected {shape.leaf_count} leaf hashes, got {len(leaf_hashes)}")
    for digest in leaf_hashes:
        if len(digest) != HASH_SIZE:
            raise ValueError(f"a leaf hash must be {HASH_SIZE} bytes, got {len(digest)}")
    levels = [list(leaf_hashes)]
    order = shape.order
    while len(levels[0]) > 1:
        below = levels[0]
        levels.insert(0, [node_hash(below[i : i + order]) for i in range(0, len(below), order)])
    return levels


# --------------------------------------------------------------------------------------------
# Storage interfaces and events
# --------------------------------------------------------------------------------------------


class LegacyTargetStore(Protocol):
    """What the target role needs from the image it updates."""

    @property
    def size(self) -> int:
        """Current size of the target."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the current target, to hash its leaves."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` (may extend the target)."""
        ...

    def write_zeros(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros; may punch a hole or extend."""
        ...

    def truncate(self, size: int) -> None:
        """Set the size: shrink, or grow with zeros."""
        ...


class LegacySourceReader(Protocol):
    """What the source role needs from the disk or image it sends."""

    @property
    def size(self) -> int:
        """Size of the source."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (inside ``[0, size)``)."""
        ...


@dataclass(frozen=True)
class HeaderExchanged:
    """The peer's header arrived: sizes are known and so is the tree (None if common is 0)."""

    local_size: int
    peer_size: int
    shape: TreeShape | None


@dataclass(frozen=True)
class RangeSynced:
    """A range of the result is settled: ``kind`` says how (for progress and statistics)."""

    offset: int
    length: int
    kind: Literal["equal", "data", "hole"]


@dataclass(frozen=True)
class SyncFinished:
    """The exchange is complete; ``final_size`` is the source's size."""

    final_size: int


LegacyEvent = HeaderExchanged | RangeSynced | SyncFinished

# What a role's generator yields: the number of peer bytes it needs next, or None for "my output
# is ready, resume me when the caller asks for more" (the source's tail is produced on demand).
_Step = Generator[int | None, bytes, None]


class _Machine:
    """Drives a protocol generator from push-style ``receive_data`` / ``data_to_send`` calls."""

    def __init__(self, role: str) -> None:
        self._role = role
        self._peer_size: int | None = None
        self._position = 0
        self._out = bytearray()
        self._in = bytearray()
        self._eof = False
        self._done = False
        self._failed: Exception | None = None  # a failed exchange stays failed
        self._events: list[LegacyEvent] = []
        self._want: int | None = None
        self._what = "the peer's header"
        self._gen = self._run()
        self._want = next(self._gen)

    @property
    def peer_size(self) -> int | None:
        """The other side's size, once its header arrived."""
        return self._peer_size

    @property
    def position(self) -> int:
        """Bytes settled so far (for ``Update:`` progress lines)."""
        return self._position

    def _settle(self, offset: int, length: int, kind: Literal["equal", "data", "hole"]) -> None:
        self._position = offset + length
        self._events.append(RangeSynced(offset, length, kind))

    def _header_and_tree(self) -> Generator[int | None, bytes, tuple[int, int]]:
        """Both roles open the same way: swap headers, then walk the tree over the common
        size (each role walks its side of it). Returns (peer size, common size)."""
        self._out += _HEADER.pack(MAGIC, self._local_size)
        peer = yield from self._read_header()
        self._check_peer_size(peer)
        self._peer_size = peer
        common = min(peer, self._local_size)
        shape = go_tree_shape(common) if common > 0 else None
        self._events.append(HeaderExchanged(self._local_size, peer, shape))
        if shape is not None:
            digests = tree_digests(shape, self._leaf_hashes(shape))
            yield from self._walk(shape, digests, 0, 0)
        return peer, common

    # -- subclass hooks ---------------------------------------------------------------------
    _local_size: int
    _leaf_hashes: LeafHashProvider

    def _check_peer_size(self, size: int) -> None:
        """Refuse a peer size before anything is built for it (the target has a limit)."""

    def _walk(
        self, shape: TreeShape, digests: list[list[bytes]], depth: int, index: int
    ) -> Generator[int | None, bytes, None]:
        raise NotImplementedError

    def _run(self) -> _Step:
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once this side has nothing more to receive or send (then close the stream)."""
        return self._done and not self._out

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (possibly empty)."""
        self._check_failed()
        if not self._out and self._want is None and not self._done:
            self._resume(b"")
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer, split anyhow; ``b""`` means the peer closed."""
        self._check_failed()
        if not data:
            self._eof = True
        else:
            if self._done or self._want is None:
                self._fail(f"unexpected {len(data)} bytes from the peer after {self._what}")
            self._in += data
        self._pump()

    def next_events(self) -> list[LegacyEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # -- generator helpers ------------------------------------------------------------------
    def _read(self, n: int, what: str) -> Generator[int | None, bytes, bytes]:
        """Wait for exactly ``n`` peer bytes; ``what`` names them in error messages."""
        self._what = what
        data = yield n
        return data

    def _pump(self) -> None:
        while self._want is not None and len(self._in) >= self._want:
            n = self._want
            chunk = bytes(self._in[:n])
            del self._in[:n]
            self._resume(chunk)
        if self._done and self._in:
            self._fail(f"unexpected {len(self._in)} bytes from the peer after the end")
        if self._eof and self._want is not None:
            self._fail(
                f"peer closed the connection early: expected {self._want} bytes of "
                f"{self._what}, received {len(self._in)}"
            )

    def _resume(self, value: bytes) -> None:
        try:
            self._want = self._gen.send(value)
        except StopIteration:
            self._want = None
            self._done = True
        except Exception as exc:  # the generator is dead now: never report it as done
            self._failed = exc
            raise

    def _fail(self, message: str) -> None:
        self._failed = PeerError(f"{self._role}: {message}")
        raise self._failed

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _read_header(self) -> Generator[int | None, bytes, int]:
        raw = yield from self._read(_HEADER.size, "the peer's header")
        magic, size = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise PeerError(
                f"{self._role}: bad protocol magic: expected {MAGIC!r}, received {magic!r}"
            )
        if size > _INT64_MAX:
            raise PeerError(f"{self._role}: peer announced a negative size ({size - (1 << 64)})")
        return int(size)


# --------------------------------------------------------------------------------------------
# Target role
# --------------------------------------------------------------------------------------------


class LegacyTarget(_Machine):
    """The receiving end (``diskrsync --target PATH``): updates ``store`` to equal the source.

    Call ``data_to_send()`` after construction and after every ``receive_data()``. ``done``
    turns true once the result is complete (the target then closes its side, as Go does).
    ``leaf_hashes`` is called once with the tree shape when the peer's size is known; by default
    leaves are read through ``store.read`` and hashed in this thread.
    """

    def __init__(
        self, store: LegacyTargetStore, *, leaf_hashes: LeafHashProvider | None = None,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self._store = store
        self._local_size = store.size
        self._max_size = max_size
        self._leaf_hashes = leaf_hashes or (lambda shape: compute_leaf_hashes(shape, store.read))
        super().__init__("legacy target")

    def _check_peer_size(self, size: int) -> None:
        if size > self._max_size:
            raise PeerError(f"legacy target: the source has {size} bytes, more than the "
                            f"{self._max_size} this end accepts (--max-size)")

    def _run(self) -> _Step:
        peer, common = yield from self._header_and_tree()
        if peer > self._local_size:
            yield from self._tail(common, peer)
        elif peer < self._local_size:
            self._store.truncate(peer)
        self._position = peer
        self._events.append(SyncFinished(peer))

    def _walk(
        self, shape: TreeShape, digests: list[list[bytes]], depth: int, index: int
    ) -> Generator[int | None, bytes, None]:
        offset, length = shape.node_range(depth, index)
        self._out += digests[depth][index]
        cmd = (yield from self._read(1, f"the command for the node at offset {offset}"))[0]
        if cmd == CMD_EQUAL:
            self._settle(offset, length, "equal")
            return
        leaf = depth == shape.levels - 1
        if cmd == CMD_NOT_EQUAL and leaf:
            data = yield from self._read(length, f"the {length}-byte block at offset {offset}")
            self._store.write(offset, data)
            self._settle(offset, length, "data")
        elif cmd == CMD_HOLE and leaf:
            self._store.write_zeros(offset, length)
            self._settle(offset, length, "hole")
        elif cmd == CMD_NOT_EQUAL:
            for child in range(shape.order):
                yield from self._walk(shape, digests, depth + 1, index * shape.order + child)
        else:
            where = "leaf" if leaf else "inner node"
            raise PeerError(
                f"legacy target: expected command 0, 2 or 3 for the {where} at offset {offset} "
                f"(0 only for a leaf), received {cmd}"
            )

    def _tail(self, pos: int, end: int) -> Generator[int | None, bytes, None]:
        while pos < end:
            cmd = (yield from self._read(1, f"the tail command at offset {pos}"))[0]
            if cmd == CMD_BLOCK:
                n = min(TAIL_BLOCK_SIZE, end - pos)
                data = yield from self._read(n, f"the {n}-byte tail block at offset {pos}")
                self._store.write(pos, data)
                self._settle(pos, n, "data")
            elif cmd == CMD_HOLE:
                raw = yield from self._read(8, f"the zero-run length at offset {pos}")
                (n,) = _INT64.unpack(raw)
                if not 0 < n <= end - pos:
                    raise PeerError(
                        f"legacy target: expected a zero run of 1..{end - pos} bytes at offset "
                        f"{pos}, received {n}"
                    )
                self._store.write_zeros(pos, n)
                self._settle(pos, n, "hole")
            else:
                raise PeerError(
                    f"legacy target: expected tail command 0 or 1 at offset {pos}, received {cmd}"
                )
            pos = self._position
        if self._store.size != end:
            self._store.truncate(end)


# --------------------------------------------------------------------------------------------
# Source role
# --------------------------------------------------------------------------------------------


class LegacySource(_Machine):
    """The sending end (``diskrsync --source PATH``): answers the target's digests.

    Call ``data_to_send()`` after construction, after every ``receive_data()``, and repeatedly
    while streaming the tail (it then returns up to about ``max_send`` bytes per call). When
    ``done`` turns true the caller must close its write side: a Go target only sees the end of a
    short last block, and of the stream, by EOF.
    """

    def __init__(
        self,
        reader: LegacySourceReader,
        *,
        leaf_hashes: LeafHashProvider | None = None,
        max_send: int = 1 << 20,
    ) -> None:
        self._reader = reader
        self._local_size = reader.size
        self._leaf_hashes = leaf_hashes or (lambda shape: compute_leaf_hashes(shape, reader.read))
        self._max_send = max(max_send, TAIL_BLOCK_SIZE + 1)
        super().__init__("legacy source")

    def _read_local(self, offset: int, length: int) -> bytes:
        data = self._reader.read(offset, length)
        if len(data) != length:
            raise LocalError(
                f"short read from the source: expected {length} bytes at offset {offset}, "
                f"got {len(data)}"
            )
        return data

    def _run(self) -> _Step:
        _peer, common = yield from self._header_and_tree()
        if self._local_size > common:
            yield from self._tail(common, self._local_size)
        self._position = self._local_size
        self._events.append(SyncFinished(self._local_size))

    def _walk(
        self, shape: TreeShape, digests: list[list[bytes]], depth: int, index: int
    ) -> Generator[int | None, bytes, None]:
        offset, length = shape.node_range(depth, index)
        remote = yield from self._read(HASH_SIZE, f"the digest of the node at offset {offset}")
        if remote == digests[depth][index]:
            self._out.append(CMD_EQUAL)
            self._settle(offset, length, "equal")
        elif depth == shape.levels - 1:
            data = self._read_local(offset, length)
            if data.count(0) == length:
                self._out.append(CMD_HOLE)
                self._settle(offset, length, "hole")
            else:
                self._out.append(CMD_NOT_EQUAL)
                self._out += data
                self._settle(offset, length, "data")
        else:
            self._out.append(CMD_NOT_EQUAL)
            for child in range(shape.order):
                yield from self._walk(shape, digests, depth + 1, index * shape.order + child)

    def _tail(self, pos: int, end: int) -> Generator[int | None, bytes, None]:
        self._what = "the end of the exchange"
        hole_start = -1
        while pos < end:
            n = min(TAIL_BLOCK_SIZE, end - pos)
            chunk = self._read_local(pos, n)
            if chunk.count(0) == n:
                if hole_start == -1:
                    hole_start = pos
            else:
                if hole_start != -1:
                    self._out.append(CMD_HOLE)
                    self._out += _INT64.pack(pos - hole_start)
                    self._settle(hole_start, pos - hole_start, "hole")
                    hole_start = -1
                self._out.append(CMD_BLOCK)
                self._out += chunk
                self._settle(pos, n, "data")
            pos += n
            if len(self._out) >= self._max_send - TAIL_BLOCK_SIZE:
                yield None
        if hole_start != -1:
            self._out.append(CMD_HOLE)
            self._out += _INT64.pack(pos - hole_start)
            self._settle(hole_start, pos - hole_start, "hole")


# --------------------------------------------------------------------------------------------
# Progress lines on stderr (--calc-progress / --sync-progress)
# --------------------------------------------------------------------------------------------


def format_progress_start(name: Literal["calc", "sync"], size: int) -> str:
    """The lines a Go remote writes when a phase starts: ``"[Start NAME]\\nSize: N\\n"``.

    From ``progressWriter.Start`` in diskrsync/progress.go; the Go client's ``readStart`` takes
    the text between ``"[Start "`` and ``"]\\n"`` as the phase name ("calc" or "sync").
    """
    return f"[Start {name}]\nSize: {size}\n"


def format_progress_update(position: int) -> str:
    """One progress line: ``"Update: N\\n"`` (``progressWriter.Update`` in progress.go).

    The Go client reads updates until one reaches the size, so a phase must end with
    ``Update: <size>``; lines that do not parse are echoed to the user's stderr.
    """
    return f"Update: {position}\n"


class ProgressLineWriter:
    """The Go ``progressWriter`` throttle, with time passed in so it stays pure.

    An update is written when it reaches the size or 250 ms after the last line; none at all
    when the size is 0 or less.
    """

    INTERVAL: Final = 0.25

    def __init__(self, name: Literal["calc", "sync"]) -> None:
        self.name: Literal["calc", "sync"] = name
        self._size = 0
        self._last = 0.0

    def start(self, size: int, now: float) -> str:
        """Start the phase; returns the lines to write."""
        self._size = size
        self._last = now
        return format_progress_start(self.name, size)

    def update(self, position: int, now: float) -> str:
        """Returns the line to write for ``position``, or ``""`` when throttled."""
        if self._size <= 0:
            return ""
        if position >= self._size or now - self._last >= self.INTERVAL:
            self._last = now
            return format_progress_update(position)
        return ""


# --------------------------------------------------------------------------------------------
# Remote command words
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoRemoteRequest:
    """What a Go client asked the remote end (started over SSH) to do."""

    mode: Literal["source", "target"]
    path: str
    no_compress: bool = False
    calc_progress: bool = False
    sync_progress: bool = False
    verbose: bool = False
    program: str | None = None


# The Go client appends " --no-compress" and " --verbose" with a leading space inside the word;
# after ssh joins and the remote shell re-splits they arrive without it.
_FLAG_WORDS: Final = {
    "--no-compress": "no_compress",
    " --no-compress": "no_compress",
    "--verbose": "verbose",
    " --verbose": "verbose",
    "--calc-progress": "calc_progress",
    "--sync-progress": "sync_progress",
}


def parse_go_remote_args(argv: list[str]) -> GoRemoteRequest:
    """Parse the words of a Go client's remote command (``remoteProc.Start`` in main.go).

    Accepts ``[PROGRAM] --source|--target [FLAG...] PATH`` where the flags are those the Go
    client sends: ``--no-compress`` (target only), ``--verbose``, ``--calc-progress`` and
    ``--sync-progress`` (only with ``--calc-progress``), each at most once, in any order (the
    Go remote's pflag accepts any order; the client sends them in the order listed). The first
    word is taken as the program if it does not start with ``-``. A path the shell split at a
    space, or one starting with ``-``, is refused rather than guessed at.
    """
    words = list(argv)
    program = None
    if words and not words[0].startswith("-"):
        program = words.pop(0)
    if not words or words[0] not in ("--source", "--target"):
        got = repr(words[0]) if words else "nothing"
        raise UsageError(f"remote command: expected --source or --target, got {got}")
    mode: Literal["source", "target"] = "source" if words[0] == "--source" else "target"
    if len(words) < 2:
        raise UsageError(f"remote command: --{mode} needs a PATH")
    *flag_words, path = words[1:]
    flags: dict[str, bool] = {}
    for word in flag_words:
        name = _FLAG_WORDS.get(word)
        if name is None:
            raise UsageError(f"remote command: unexpected argument {word!r}")
        if name in flags:
            raise UsageError(f"remote command: {word.strip()} given twice")
        flags[name] = True
    if flags.get("no_compress") and mode != "target":
        raise UsageError("remote command: --no-compress only applies to --target")
    if flags.get("sync_progress") and not flags.get("calc_progress"):
        raise UsageError("remote command: --sync-progress comes only with --calc-progress")
    if not path or path.startswith("-"):
        raise UsageError(f"remote command: expected a PATH last, got {path!r}")
    return GoRemoteRequest(mode=mode, path=path, program=program, **flags)
