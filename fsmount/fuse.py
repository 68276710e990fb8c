"""The pyfuse3 adapter: translates inodes, attributes and errors, and calls ``vfs``/``reader``.

This is the only place where errors become errno values:

* ``vfs`` outcomes: ENOENT, ENOTDIR, EISDIR, EROFS, EBADF, EINVAL;
* ``CorruptChunkError`` -> EIO, with one log line naming the file, generation, chunk and offset
  (the chunk is never served; the rest of the file stays readable);
* any other ``DiskrsyncError`` or unexpected exception -> EIO, logged;
* everything that would write -> EROFS (the mount is also made with ``-o ro``).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyfuse3
import trio

from diskrsync.base.errors import CorruptChunkError, DiskrsyncError
from diskrsync.compression.api import DiskImage, GenerationInfo
from diskrsync.compression.image import GenerationGoneError
from diskrsync.fsmount.reader import ChunkReader
from diskrsync.fsmount.vfs import (
    ROOT_INODE,
    Attributes,
    BadHandle,
    Changes,
    GenerationView,
    IsADirectory,
    MountVFS,
    NoSuchEntry,
    NotADirectory,
    NotALink,
    ReadOnly,
    load_generation,
)

log = logging.getLogger(__name__)

assert ROOT_INODE == pyfuse3.ROOT_INODE

REFRESH_INTERVAL = 2.0

_ERRNO: tuple[tuple[type[Exception], int], ...] = (
    (NoSuchEntry, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (ReadOnly, errno.EROFS),
    (BadHandle, errno.EBADF),
    (NotALink, errno.EINVAL),
)


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


class DiskOperations(pyfuse3.Operations):
    """Read-only file system operations over a ``MountVFS``."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, image: DiskImage, vfs: MountVFS, reader: ChunkReader) -> None:
        super().__init__()
        self.image = image
        self.vfs = vfs
        self.reader = reader
        # Set once the file system is mounted: kernel notifications need a live session.
        self.notify = False
        self.invalidated: list[tuple[int, str]] = []  # every invalidation asked for (tests)

    # --- helpers ----------------------------------------------------------------------------

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except pyfuse3.FUSEError:
            raise
        except CorruptChunkError as exc:
            log.error(
                "%s: corrupt chunk %d at offset %d (%s); answered EIO", what, exc.chunk,
                exc.offset, exc,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None
        except DiskrsyncError as exc:
            log.error("%s: %s; answered EIO", what, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            log.error("%s: %s", what, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            for kind, code in _ERRNO:
                if isinstance(exc, kind):
                    raise pyfuse3.FUSEError(code) from None
            log.exception("%s: unexpected error; answered EIO", what)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @staticmethod
    def _entry(attr: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.inode
        entry.generation = 0
        entry.entry_timeout = attr.entry_timeout
        entry.attr_timeout = attr.attr_timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = 0
        entry.st_size = attr.size
        entry.st_blksize = attr.blksize
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.mtime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.mtime_ns
        return entry

    def apply_changes(self, changes: Changes) -> None:
        """Tell the kernel about removed names; forget dropped generations' cached chunks."""
        for number in changes.dropped:
            self.reader.cache.discard_generation(number)
            log.info("generation %d left the mount", number)
        for parent, name in changes.invalidate:
            self.invalidated.append((parent, name))
            if self.notify:
                pyfuse3.invalidate_entry_async(parent, name.encode(), ignore_enoent=True)

    # --- generations ------------------------------------------------------------------------

    async def refresh(self) -> Changes:
        """Re-read the image (in a thread) and add/remove generations in the tree."""
        known = self.vfs.generation_numbers()
        image = self.image

        def work() -> tuple[list[GenerationInfo], dict[int, GenerationView]]:
            image.refresh()
            infos = image.generations()
            loaded: dict[int, GenerationView] = {}
            try:
                for info in infos:
                    if info.number not in known:
                        try:
                            loaded[info.number] = load_generation(image, info.number)
                        except GenerationGoneError:
                            # pruned by a push since the listing (a writer with --keep 1 can
                            # do that within a second)
                            log.info("generation %d was pruned before it could be shown",
                                     info.number)
            except BaseException:
                for view in loaded.values():
                    view.close()
                raise
            return infos, loaded

        infos, loaded = await trio.to_thread.run_sync(work)
        for number in loaded:
            log.info("generation %d appeared", number)
        changes = self.vfs.apply_generations(infos, loaded)
        self.apply_changes(changes)
        return changes

    async def refresh_loop(self, interval: float = REFRESH_INTERVAL) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("refreshing the image failed (will retry): %s", exc)

    # --- reading ----------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        with self._errors("lookup"):
            node = self.vfs.lookup(parent_inode, os.fsdecode(name))
            return self._entry(self.vfs.attributes(node))

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        with self._errors("getattr"):
            return self._entry(self.vfs.getattr(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        with self._errors("readlink"):
            return self.vfs.readlink(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        with self._errors("opendir"):
            return self.vfs.opendir(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        with self._errors("readdir"):
            for entry in self.vfs.readdir(fh, start_id):
                if not pyfuse3.readdir_reply(
                    token, os.fsencode(entry.name), self._entry(entry.attributes), entry.next_id
                ):
                    break

    async def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_TRUNC | os.O_APPEND))
        with self._errors("open"):
            handle = self.vfs.open(inode, write=write)
        # A pinned generation never changes: the kernel may keep its pages across opens.
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True, direct_io=False)

    # pyfuse3 replies with any buffer (PyObject_GetBuffer), though its stub says bytes: a view
    # of a cached span saves a copy of every sequential request.
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        with self._errors("read"):
            handle = self.vfs.handle(fh)
        with self._errors(f"read {handle.node.path} (generation {handle.view.number})"):
            return await self.reader.read(handle, off, size)

    async def release(self, fh: int) -> None:
        self.apply_changes(self.vfs.release(fh))

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # nodes are kept for the mount's lifetime (a few per generation)

    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        stat = pyfuse3.StatvfsData()
        stat.f_bsize = 4096
        stat.f_frsize = 4096
        stat.f_blocks = sum(view.size for view in self.vfs.views()) // 4096
        stat.f_bfree = stat.f_bavail = 0
        stat.f_files = len(self.vfs.views()) * 4 + 2
        stat.f_ffree = stat.f_favail = 0
        stat.f_namemax = 255
        return stat

    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> Sequence[bytes]:
        return []

    async def access(
        self, inode: int, mode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> bool:
        if mode & os.W_OK:
            raise _erofs()
        return True

    # --- everything that writes: EROFS ------------------------------------------------------

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise _erofs()

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _erofs()

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise _erofs()

    async def rmdir(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise _erofs()

    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: pyfuse3.RequestContext | None = None,
    ) -> None:
        raise _erofs()

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise _erofs()

    async def removexattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise _erofs()
