"""The Merkle tree both the image index and the sync protocol are built on (pure, no I/O).

Shape is a function of (size, chunk_size, fanout) alone, so two ends that agree on those three
numbers agree on every node without exchanging structure:

* level 0 holds one leaf per chunk: ``n = ceil(size / chunk_size)`` chunks, the last one short
  when the size is not a multiple of the chunk size;
* level ``l >= 1`` node ``j`` has as children level ``l-1`` nodes ``[j*F, (j+1)*F)`` (the last
  node of a level may have fewer), so it covers chunks ``[j*F**l, (j+1)*F**l)`` clipped to ``n``;
* levels are added until a level has exactly one node, and there is always at least level 1
  when ``n > 0``. That node is the top; an empty disk has no nodes.

Hashes are BLAKE3 (32 bytes). A leaf is the plain hash of the chunk's bytes (a raw target can
compute it with one call). An inner node is ``BLAKE3(0x01 || child digests)``. The root hash that
names a generation binds the geometry too: ``BLAKE3("diskrsync-root-v1" || u64 size ||
u32 chunk_size || u32 fanout || top digest)``, so equal roots mean equal bytes and equal size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import blake3

HASH_SIZE = 32
NODE_PREFIX = b"\x01"
ROOT_PREFIX = b"diskrsync-root-v1"


def leaf_hash(data: bytes | bytearray | memoryview) -> bytes:
    """Hash of one chunk's bytes."""
    return blake3.blake3(data).digest()


def node_hash(children: Iterable[bytes]) -> bytes:
    """Hash of an inner node from its children's digests, in order."""
    h = blake3.blake3(NODE_PREFIX)
    for c in children:
        h.update(c)
    return h.digest()


def node_hash_packed(digests: bytes | bytearray | memoryview) -> bytes:
    """``node_hash`` over digests already laid end to end (saves a join on hot paths)."""
    h = blake3.blake3(NODE_PREFIX)
    h.update(digests)
    return h.digest()


@lru_cache(maxsize=64)
def zero_hash(length: int) -> bytes:
    """Leaf hash of ``length`` zero bytes (cached: every sparse disk asks for it)."""
    return leaf_hash(bytes(length))


def root_hash(size: int, chunk_size: int, fanout: int, top: bytes) -> bytes:
    """The name of a whole disk version; ``top`` is b"" for an empty disk."""
    h = blake3.blake3(ROOT_PREFIX)
    h.update(struct.pack("<QII", size, chunk_size, fanout))
    h.update(top)
    return h.digest()


@dataclass(frozen=True)
class Shape:
    """Geometry of one tree: which nodes exist at which level."""

    size: int
    chunk_size: int
    fanout: int

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk size must be a power of two, not {self.chunk_size}")
        if self.fanout < 2:
            raise ValueError(f"fanout must be at least 2, not {self.fanout}")
        if self.size < 0:
            raise ValueError("size must not be negative")

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def level_counts(self) -> tuple[int, ...]:
        """Node count per level, level 0 (chunks) first; () for an empty disk."""
        return _level_counts(self.chunks, self.fanout)

    @property
    def top_level(self) -> int:
        """Level of the single top node; 0 for an empty disk."""
        return max(len(self.level_counts) - 1, 0)

    def count(self, level: int) -> int:
        counts = self.level_counts
        return counts[level] if level < len(counts) else 0

    def chunk_length(self, index: int) -> int:
        """Bytes in chunk ``index`` (the last may be short)."""
        start = index * self.chunk_size
        if not 0 <= index < self.chunks:
            raise IndexError(f"chunk {index} outside 0..{self.chunks - 1}")
        return min(self.chunk_size, self.size - start)

    def chunk_range(self, level: int, index: int) -> tuple[int, int]:
        """Chunks ``[start, stop)`` covered by node ``index`` of ``level``."""
        span = self.fanout**level
        return index * span, min((index + 1) * span, self.chunks)

    def children(self, level: int, index: int) -> range:
        """Indices at ``level - 1`` of the children of a node."""
        return range(index * self.fanout, min((index + 1) * self.fanout, self.count(level - 1)))


@lru_cache(maxsize=256)
def _level_counts(chunks: int, fanout: int) -> tuple[int, ...]:
    if chunks == 0:
        return ()
    counts = [chunks]
    while True:
        counts.append(-(-counts[-1] // fanout))
        if counts[-1] == 1:
            return tuple(counts)


def root_from_leaves(shape: Shape, leaves: bytes | bytearray | memoryview) -> bytes:
    """Root hash from every chunk digest laid end to end (what a source or a raw target
    holds in memory), computing only the inner nodes."""
    return root_from_pages(shape, [
        node_hash_packed(leaves[a * HASH_SIZE : b * HASH_SIZE])
        for a, b in (shape.chunk_range(1, j) for j in range(shape.count(1)))
    ])


def root_from_pages(shape: Shape, pages: list[bytes]) -> bytes:
    """Root hash from every level-1 digest (a source that took some pages' digests from the
    target, without their leaves)."""
    level = pages
    while len(level) > 1:
        f = shape.fanout
        level = [node_hash_packed(b"".join(level[i : i + f])) for i in range(0, len(level), f)]
    return root_hash(shape.size, shape.chunk_size, shape.fanout, level[0] if level else b"")


def tree_hashes(leaves: list[bytes], fanout: int) -> list[list[bytes]]:
    """Every level's digests from the leaves up (reference implementation for tests and raw
    targets that hold all leaf hashes in memory)."""
    if not leaves:
        return []
    levels = [leaves]
    while True:
        below = levels[-1]
        groups = range(0, len(below), fanout)
        levels.append([node_hash_packed(b"".join(below[i : i + fanout])) for i in groups])
        if len(levels[-1]) == 1:
            return levels


def tree_root(size: int, chunk_size: int, fanout: int, leaves: list[bytes]) -> bytes:
    """Root hash from all leaf hashes (reference implementation)."""
    levels = tree_hashes(leaves, fanout)
    return root_hash(size, chunk_size, fanout, levels[-1][0] if levels else b"")


class PageFolder:
    """A tree's level-1 digests in (in any order, each once), its root out, holding only the
    groups not complete yet: a node's children are folded into it as soon as the last one
    arrives. A source settles its pages nearly in order, so this holds a few groups per level
    (issue 16: every page digest was 32 bytes per page, 4 MiB per TiB of 128 KiB chunks)."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        # per level >= 1: parent index -> (children's digests, which of them are set)
        self._open: list[dict[int, tuple[bytearray, bytearray]]] = [
            {} for _ in range(shape.top_level + 1)]
        self._top: bytes | None = None

    def add(self, index: int, digest: bytes, level: int = 1) -> None:
        """Node ``index`` of ``level`` has ``digest``; folds upwards what this completes."""
        shape = self.shape
        while True:
            if not 1 <= level <= shape.top_level or not 0 <= index < shape.count(level):
                raise IndexError(f"node ({level},{index}) outside the tree")
            if level == shape.top_level:
                assert self._top is None, "the top set twice"
                self._top = digest
                return
            f = shape.fanout
            parent, k = divmod(index, f)
            group = self._open[level].get(parent)
            if group is None:
                assert not self.known(parent, level + 1), f"node ({level},{index}) set twice"
                n = len(shape.children(level + 1, parent))
                group = self._open[level][parent] = (bytearray(n * HASH_SIZE), bytearray(n))
            digests, have = group
            assert not have[k], f"node ({level},{index}) set twice"
            digests[k * HASH_SIZE : (k + 1) * HASH_SIZE] = digest
            have[k] = 1
            if 0 in have:
                return
            del self._open[level][parent]
            index, digest, level = parent, node_hash_packed(digests), level + 1

    def known(self, index: int, level: int = 1) -> bool:
        """Whether node ``index`` of ``level`` was added (or folded into one that was)."""
        shape = self.shape
        while level < shape.top_level:
            group = self._open[level].get(index // shape.fanout)
            if group is not None:
                return bool(group[1][index % shape.fanout])
            index, level = index // shape.fanout, level + 1
        return level == shape.top_level and self._top is not None

    @property
    def held(self) -> int:
        """Groups not complete (what the memory is)."""
        return sum(len(d) for d in self._open)

    def root(self) -> bytes:
        """The root hash; every page must have been added."""
        if self.shape.chunks and self._top is None:
            raise ValueError("not every page digest is known")
        return root_hash(self.shape.size, self.shape.chunk_size, self.shape.fanout,
                         self._top or b"")
