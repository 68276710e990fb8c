"""What a mounted image looks like: a tree of read-only nodes with inode numbers.

No pyfuse3 here (the adapter in ``fuse.py`` translates); no trio either (the async chunk reads
live in ``reader.py``). The layout::

    /disk.raw                      the top-level generation's disk (the newest, or --generation G)
    /partitions/p1, p2, ...        byte ranges of that disk, one per partition
    /partitions/by-label/<label>   symlinks "../pN" (file system labels: ext2/3/4, XFS, Btrfs, FAT)
    /partitions/by-partlabel/<n>   symlinks "../pN" (GPT partition names), as udev names both;
                                   each directory only when some partition has such a label
    /generations/<N>-<UTC time>/   every retained generation, e.g. 000007-2026-11-26T13-05-00Z/
        disk.raw                   (N zero-padded to 6 digits, so names sort in number order)
        partitions/...             as above
    /generations/latest, oldest    symlinks to the newest and the oldest retained generation

The top-level ``disk.raw`` and ``partitions/p*`` are the same inodes as those in the generation's
own directory (hard links), so the kernel page cache is shared. Every generation's content is
immutable, so a file inode never changes; when a newer generation is committed the top-level
names point at new inodes, and files that were open keep reading the generation they opened.

A generation is pinned (``DiskImage.snapshot``) while it is listed. When the image prunes it, it
stays listed until no file of it is open (a loop device counts), then leaves the tree and its
snapshot is closed; one that was shown at the top level stays one refresh longer, so a path the
kernel resolved just before the switch still opens. Inode numbers are never reused within a
mount.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from diskrsync.base.errors import DataError
from diskrsync.compression.api import DiskImage, DiskSnapshot, GenerationInfo
from diskrsync.compression.partitions import (
    NO_TABLE,
    PartitionTable,
    filesystem_label,
    label_entries,
    read_partition_table,
)

log = logging.getLogger(__name__)

ROOT_INODE = 1  # equals pyfuse3.ROOT_INODE (checked in fuse.py)

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777

# Names and attributes inside a generation never change, and removals are invalidated explicitly,
# so they can be cached long; names whose meaning moves (the top-level view, the generation list)
# are cached briefly, in case an invalidation is lost.
STABLE_TIMEOUT = 300.0
VOLATILE_TIMEOUT = 1.0

DISK_NAME = "disk.raw"
PARTITIONS_NAME = "partitions"
GENERATIONS_NAME = "generations"
BY_LABEL_NAME = "by-label"
BY_PARTLABEL_NAME = "by-partlabel"
LATEST_NAME = "latest"
OLDEST_NAME = "oldest"


class VfsError(Exception):
    """Base of the outcomes the adapter turns into errno values."""


class NoSuchEntry(VfsError):
    """ENOENT: no such name, or an inode the mount no longer knows."""


class NotADirectory(VfsError):
    """ENOTDIR."""


class IsADirectory(VfsError):
    """EISDIR."""


class ReadOnly(VfsError):
    """EROFS: anything that would change the mount."""


class BadHandle(VfsError):
    """EBADF: a file or directory handle that is not open."""


class NotALink(VfsError):
    """EINVAL from readlink."""


def generation_dir_name(info: GenerationInfo) -> str:
    """``<N>-<UTC commit time>``, e.g. ``000007-2026-11-26T13-05-00Z``: the number first
    and zero-padded, so that names sort in commit order (``ls``, shell globs) whatever the
    clock did; no colons (scp/SMB friendly). A generation's name never changes."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(info.commit_time))
    return f"{info.number:06d}-{stamp}"


def chunk_ranges(
    offset: int, length: int, chunk_size: int, size: int
) -> list[tuple[int, int, int]]:
    """Map bytes [offset, offset+length) of a disk (clipped to ``size``) onto its chunks.

    Returns ``(chunk index, start in chunk, end in chunk)`` triples in order.
    """
    end = min(offset + length, size)
    out: list[tuple[int, int, int]] = []
    pos = max(offset, 0)
    while pos < end:
        index = pos // chunk_size
        base = index * chunk_size
        stop = min(end - base, chunk_size)
        out.append((index, pos - base, stop))
        pos = base + stop
    return out


@dataclass(frozen=True)
class Attributes:
    """What ``stat`` shows of a node, plus how long the kernel may cache it."""

    inode: int
    mode: int
    size: int
    nlink: int
    mtime_ns: int
    uid: int
    gid: int
    blksize: int
    blocks: int
    entry_timeout: float
    attr_timeout: float


class GenerationView:
    """One pinned generation: its snapshot, partition table and how many files of it are open."""

    def __init__(self, snapshot: DiskSnapshot, table: PartitionTable) -> None:
        self.snapshot = snapshot
        self.info: GenerationInfo = snapshot.info
        self.table = table
        self.open_count = 0
        self.removed = False  # pruned from the image (still listed while files are open)
        self.closed = False
        self.dir_name = generation_dir_name(self.info)

    @property
    def number(self) -> int:
        return self.info.number

    @property
    def size(self) -> int:
        return self.snapshot.size

    @property
    def chunk_size(self) -> int:
        return self.snapshot.chunk_size

    @property
    def mtime_ns(self) -> int:
        return int(self.info.commit_time * 1e9)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.snapshot.close()


def load_generation(image: DiskImage, number: int) -> GenerationView:
    """Pin generation ``number`` and read its partition table (blocking: may read chunks)."""
    snapshot = image.snapshot(number)
    try:
        try:
            table = read_partition_table(snapshot.read, snapshot.size)
        except DataError as exc:  # a damaged table area: still show the whole disk
            log.warning("generation %d: partition table unreadable (%s)", number, exc)
            table = NO_TABLE
        table = _with_fs_labels(table, snapshot, number)
    except BaseException:
        snapshot.close()
        raise
    return GenerationView(snapshot, table)


def _with_fs_labels(table: PartitionTable, snapshot: DiskSnapshot, number: int) -> PartitionTable:
    """The table with each partition's file system label (for by-label); a damaged
    superblock area only leaves that partition out of by-label."""
    parts = []
    for part in table.partitions:
        try:
            label = filesystem_label(snapshot.read, part.start, part.size)
        except DataError as exc:
            log.warning("generation %d: p%d: file system label unreadable (%s)", number,
                        part.number, exc)
            label = ""
        parts.append(replace(part, fs_label=label))
    return replace(table, partitions=tuple(parts))


@dataclass(eq=False)
class Node:
    inode: int
    path: str  # for log lines only
    mtime_ns: int
    entry_timeout: float
    attr_timeout: float


@dataclass(eq=False)
class DirNode(Node):
    children: dict[str, Node] = field(default_factory=dict)


@dataclass(eq=False)
class FileNode(Node):
    view: GenerationView | None = None
    start: int = 0  # byte offset of this file in the generation's disk
    size: int = 0


@dataclass(eq=False)
class LinkNode(Node):
    target: bytes = b""


@dataclass(eq=False)
class FileHandle:
    """An open file: its range of a pinned disk, and how it has been read (for read-ahead)."""

    fh: int
    node: FileNode
    view: GenerationView
    start: int
    size: int
    last_chunk: int = -2  # last disk chunk index this handle read
    streak: int = 0  # consecutive sequential reads
    readahead_until: int = 0  # chunk index (exclusive) up to which read-ahead was started


@dataclass(frozen=True)
class DirEntry:
    name: str
    attributes: Attributes
    next_id: int


@dataclass
class Changes:
    """What a refresh or release changed: names to invalidate in the kernel, dropped generations."""

    invalidate: list[tuple[int, str]] = field(default_factory=list)  # (parent inode, name)
    dropped: list[int] = field(default_factory=list)

    def extend(self, other: Changes) -> None:
        self.invalidate.extend(other.invalidate)
        self.dropped.extend(other.dropped)


@dataclass
class _GenerationNodes:
    view: GenerationView
    directory: DirNode
    disk: FileNode
    partition_children: dict[str, Node]


class MountVFS:
    """The mount's tree; all methods are synchronous and cheap (no chunk I/O)."""

    def __init__(
        self, *, generation: int | None = None, uid: int | None = None, gid: int | None = None,
    ) -> None:
        self.pinned_generation = generation
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._next_inode = ROOT_INODE
        self._next_fh = 1
        self._nodes: dict[int, Node] = {}
        self._gens: dict[int, _GenerationNodes] = {}
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, list[tuple[str, Node]]] = {}
        self._top: int | None = None
        self._grace: set[int] = set()  # removed former tops kept until the next refresh
        now = time.time_ns()
        self.root = self._dir("/", now, VOLATILE_TIMEOUT, VOLATILE_TIMEOUT)
        assert self.root.inode == ROOT_INODE
        self.generations_dir = self._dir(
            "/" + GENERATIONS_NAME, now, VOLATILE_TIMEOUT, VOLATILE_TIMEOUT
        )
        self.root.children[GENERATIONS_NAME] = self.generations_dir

    # --- building -------------------------------------------------------------------------

    def _inode(self) -> int:
        inode = self._next_inode
        self._next_inode += 1
        return inode

    def _dir(self, path: str, mtime_ns: int, entry_timeout: float, attr_timeout: float) -> DirNode:
        node = DirNode(self._inode(), path, mtime_ns, entry_timeout, attr_timeout)
        self._nodes[node.inode] = node
        return node

    def _build(self, view: GenerationView) -> _GenerationNodes:
        base = f"/{GENERATIONS_NAME}/{view.dir_name}"
        mtime = view.mtime_ns
        directory = self._dir(base, mtime, STABLE_TIMEOUT, STABLE_TIMEOUT)
        disk = FileNode(
            self._inode(), f"{base}/{DISK_NAME}", mtime, STABLE_TIMEOUT, STABLE_TIMEOUT,
            view, 0, view.size,
        )
        self._nodes[disk.inode] = disk
        children: dict[str, Node] = {}
        for part in view.table.partitions:
            name = f"p{part.number}"
            node = FileNode(
                self._inode(), f"{base}/{PARTITIONS_NAME}/{name}", mtime, STABLE_TIMEOUT,
                STABLE_TIMEOUT, view, part.start, part.size,
            )
            self._nodes[node.inode] = node
            children[name] = node
        for dir_name, filesystem in ((BY_LABEL_NAME, True), (BY_PARTLABEL_NAME, False)):
            labels = label_entries(view.table.partitions, filesystem=filesystem)
            if not labels:
                continue
            by_label = self._dir(
                f"{base}/{PARTITIONS_NAME}/{dir_name}", mtime, STABLE_TIMEOUT, STABLE_TIMEOUT
            )
            for label, part in labels.items():
                link = LinkNode(
                    self._inode(), f"{by_label.path}/{label}", mtime, STABLE_TIMEOUT,
                    STABLE_TIMEOUT, f"../p{part.number}".encode(),
                )
                self._nodes[link.inode] = link
                by_label.children[label] = link
            children[dir_name] = by_label
        directory.children[DISK_NAME] = disk
        partitions = self._dir(f"{base}/{PARTITIONS_NAME}", mtime, STABLE_TIMEOUT, STABLE_TIMEOUT)
        partitions.children.update(children)
        directory.children[PARTITIONS_NAME] = partitions
        return _GenerationNodes(view, directory, disk, children)

    def _partitions_dir(
        self, path: str, mtime_ns: int, children: Mapping[str, Node], timeout: float
    ) -> DirNode:
        # by-label and by-partlabel are directories, and a directory inode must have one
        # parent: give each partitions/ directory its own copies whose links are shared.
        node = self._dir(path, mtime_ns, timeout, STABLE_TIMEOUT)
        for name, child in children.items():
            if isinstance(child, DirNode):
                copy = self._dir(f"{path}/{name}", child.mtime_ns, timeout, STABLE_TIMEOUT)
                copy.children.update(child.children)
                child = copy
            node.children[name] = child
        return node

    # --- generations ----------------------------------------------------------------------

    def generation_numbers(self) -> set[int]:
        return set(self._gens)

    def views(self) -> list[GenerationView]:
        return [g.view for g in sorted(self._gens.values(), key=lambda g: g.view.number)]

    def view(self, number: int) -> GenerationView:
        return self._gens[number].view

    @property
    def top_generation(self) -> int | None:
        return self._top

    def apply_generations(
        self, infos: Iterable[GenerationInfo], loaded: Mapping[int, GenerationView]
    ) -> Changes:
        """Bring the tree in line with the image's retained generations.

        ``loaded`` holds freshly pinned views for numbers not yet in the tree (see
        ``load_generation``); views it holds that are not used are closed here.
        """
        changes = Changes()
        retained = {info.number for info in infos}
        # Generations that left the top at the previous refresh, unused since: go now.
        for number in sorted(self._grace):
            gen = self._gens.get(number)
            if gen is not None and gen.view.removed and gen.view.open_count == 0:
                changes.extend(self._drop(number))
        self._grace.clear()
        for number, view in loaded.items():
            if number in self._gens or number not in retained:
                view.close()
                continue
            gen = self._build(view)
            self._gens[number] = gen
            self.generations_dir.children[view.dir_name] = gen.directory
            self._touch(self.generations_dir)
        for number, gen in list(self._gens.items()):
            if number not in retained and not gen.view.removed:
                gen.view.removed = True
                if gen.view.open_count == 0 and number == self._top:
                    # The kernel may hold top-level names resolved to it a moment ago (their
                    # invalidation is asynchronous): keep it one more refresh so that an open
                    # racing with the switch still gets the generation it looked up.
                    self._grace.add(number)
                elif gen.view.open_count == 0:
                    changes.extend(self._drop(number))
        changes.extend(self._choose_top())
        changes.extend(self._point_links())
        return changes

    def _point_links(self) -> Changes:
        """``generations/latest`` and ``oldest``: symlinks to the newest and the oldest
        retained generation (none while none is). A link whose target changes is a new
        inode, the old name invalidated: one inode never changes its target."""
        changes = Changes()
        live = sorted(n for n, g in self._gens.items() if not g.view.removed)
        folder = self.generations_dir
        for name, number in ((LATEST_NAME, live[-1] if live else None),
                             (OLDEST_NAME, live[0] if live else None)):
            target = self._gens[number].view.dir_name.encode() if number is not None else None
            old = folder.children.get(name)
            if isinstance(old, LinkNode) and old.target == target:
                continue
            if old is not None:
                del folder.children[name]
                changes.invalidate.append((folder.inode, name))
            if target is not None:
                link = LinkNode(self._inode(), f"{folder.path}/{name}", time.time_ns(),
                                VOLATILE_TIMEOUT, VOLATILE_TIMEOUT, target)
                self._nodes[link.inode] = link
                folder.children[name] = link
            self._touch(folder)
        return changes

    def _touch(self, node: DirNode) -> None:
        node.mtime_ns = time.time_ns()

    def _drop(self, number: int) -> Changes:
        gen = self._gens.pop(number)
        gen.view.close()
        self.generations_dir.children.pop(gen.view.dir_name, None)
        self._touch(self.generations_dir)
        changes = Changes([(self.generations_dir.inode, gen.view.dir_name)], [number])
        if self._top == number:
            changes.extend(self._choose_top())
        return changes

    def _choose_top(self) -> Changes:
        live = [n for n, g in self._gens.items() if not g.view.removed or n == self._top]
        if self.pinned_generation is not None:
            want = self.pinned_generation if self.pinned_generation in self._gens else None
        else:
            fresh = [n for n, g in self._gens.items() if not g.view.removed]
            want = max(fresh) if fresh else (max(live) if live else None)
        if want == self._top and (want is None or DISK_NAME in self.root.children):
            return Changes()
        self._top = want
        changes = Changes()
        for name in (DISK_NAME, PARTITIONS_NAME):
            if self.root.children.pop(name, None) is not None:
                changes.invalidate.append((self.root.inode, name))
        if want is not None:
            gen = self._gens[want]
            self.root.children[DISK_NAME] = gen.disk
            self.root.children[PARTITIONS_NAME] = self._partitions_dir(
                "/" + PARTITIONS_NAME, gen.view.mtime_ns, gen.partition_children,
                VOLATILE_TIMEOUT,
            )
        self._touch(self.root)
        return changes

    # --- lookups --------------------------------------------------------------------------

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NoSuchEntry(f"inode {inode}") from None

    def lookup(self, parent_inode: int, name: str) -> Node:
        parent = self.node(parent_inode)
        if not isinstance(parent, DirNode):
            raise NotADirectory(parent.path)
        if name == ".":
            return parent
        try:
            return parent.children[name]
        except KeyError:
            raise NoSuchEntry(f"{parent.path.rstrip('/')}/{name}") from None

    def resolve(self, path: str) -> Node:
        """The node at an absolute path (no symlinks followed): for tests and tools."""
        node: Node = self.root
        for part in path.strip("/").split("/"):
            if part:
                node = self.lookup(node.inode, part)
        return node

    def attributes(self, node: Node) -> Attributes:
        blksize = 128 * 1024
        if isinstance(node, DirNode):
            subdirs = sum(isinstance(c, DirNode) for c in node.children.values())
            return Attributes(
                node.inode, DIR_MODE, 0, 2 + subdirs, node.mtime_ns, self.uid, self.gid, blksize,
                0, node.entry_timeout, node.attr_timeout,
            )
        if isinstance(node, FileNode):
            assert node.view is not None
            # st_blksize is the preferred I/O size: a power of two (SPGZ0001 blocks are
            # 131071 bytes), at least a page, at most 1 MiB.
            blksize = 1 << max(12, min(node.view.chunk_size.bit_length() - 1, 20))
            return Attributes(
                node.inode, FILE_MODE, node.size, 1, node.mtime_ns, self.uid, self.gid, blksize,
                math.ceil(node.size / 512), node.entry_timeout, node.attr_timeout,
            )
        assert isinstance(node, LinkNode)
        return Attributes(
            node.inode, LINK_MODE, len(node.target), 1, node.mtime_ns, self.uid, self.gid,
            blksize, 0, node.entry_timeout, node.attr_timeout,
        )

    def getattr(self, inode: int) -> Attributes:
        return self.attributes(self.node(inode))

    def readlink(self, inode: int) -> bytes:
        node = self.node(inode)
        if not isinstance(node, LinkNode):
            raise NotALink(node.path)
        return node.target

    # --- directories ----------------------------------------------------------------------

    def opendir(self, inode: int) -> int:
        node = self.node(inode)
        if not isinstance(node, DirNode):
            raise NotADirectory(node.path)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = list(node.children.items())  # a stable listing for this handle
        return fh

    def readdir(self, fh: int, start_id: int) -> Iterator[DirEntry]:
        """The entries from ``start_id`` on, made as they are taken: the kernel takes a
        bufferful per call, so making them all (from the first) each time was quadratic in a
        directory's size (generations/ of 1,000 generations: issue 16)."""
        try:
            entries = self._dirs[fh]
        except KeyError:
            raise BadHandle(f"directory handle {fh}") from None
        return (DirEntry(entries[i][0], self.attributes(entries[i][1]), i + 1)
                for i in range(max(start_id, 0), len(entries)))

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- files ----------------------------------------------------------------------------

    def open(self, inode: int, *, write: bool = False) -> FileHandle:
        node = self.node(inode)
        if isinstance(node, DirNode):
            raise IsADirectory(node.path)
        if write:
            raise ReadOnly(node.path)
        if not isinstance(node, FileNode) or node.view is None:
            raise NoSuchEntry(node.path)
        if node.view.closed:
            raise NoSuchEntry(f"{node.path} (generation {node.view.number} was pruned)")
        fh = self._next_fh
        self._next_fh += 1
        handle = FileHandle(fh, node, node.view, node.start, node.size)
        node.view.open_count += 1
        self._files[fh] = handle
        return handle

    def handle(self, fh: int) -> FileHandle:
        try:
            return self._files[fh]
        except KeyError:
            raise BadHandle(f"file handle {fh}") from None

    def release(self, fh: int) -> Changes:
        handle = self._files.pop(fh, None)
        if handle is None:
            return Changes()
        view = handle.view
        view.open_count -= 1
        if (
            view.open_count == 0 and view.removed and view.number in self._gens
            and view.number not in self._grace
        ):
            return self._drop(view.number)
        return Changes()

    def open_handles(self) -> int:
        return len(self._files)

    def close(self) -> None:
        """Unpin every generation (at unmount)."""
        for gen in self._gens.values():
            gen.view.close()
        self._gens.clear()
        self._files.clear()
        self._dirs.clear()
