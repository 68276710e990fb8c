"""A one-file FUSE file system whose reads fail at chosen bytes, like a disk with bad sectors.

    python baddisk.py BACKING BAD_JSON MOUNTPOINT READY_FD

``MOUNTPOINT/disk`` serves the bytes of the regular file BACKING (its size and content are
read on every request, so a test can change them between pushes). BAD_JSON names a file
holding ``[[offset, length], ...]``, also re-read on every request: a read that starts on a bad
byte fails with EIO, and one that reaches a bad byte returns the bytes before it, a short
read, which is how the kernel reports a bad sector inside a large read. The file is opened
with ``direct_io``, so every read reaches this server at the offset the reader asked for
(no page cache rounding it to 4 KiB pages). Writes fail with EROFS.

Writes ``READY`` to READY_FD once mounted; ``fusermount3 -u -z MOUNTPOINT`` ends it. Tests use
``BadDisk``, which runs this in a child process and always unmounts and reaps it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import pyfuse3
import trio

DISK_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"disk"


class BadDiskOps(pyfuse3.Operations):
    def __init__(self, backing: str, bad_json: str) -> None:
        super().__init__()
        self.backing = backing
        self.bad_json = bad_json

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
        elif inode == DISK_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = os.stat(self.backing).st_size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_blksize = 512
        attr.st_blocks = (attr.st_size + 511) // 512
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(DISK_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(DISK_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
                   ) -> pyfuse3.FileInfo:
        if inode != DISK_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with open(self.bad_json) as f:
            bad = json.load(f)
        for start, length in bad:
            if start <= off < start + length:
                raise pyfuse3.FUSEError(errno.EIO)
            if off < start < off + size:
                size = start - off  # the bytes before the bad one: a short read
        fd = os.open(self.backing, os.O_RDONLY)
        try:
            return os.pread(fd, size, off)
        finally:
            os.close(fd)

    async def release(self, fh: int) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None


class BadDisk:
    """``baddisk.py`` mounted in a child process: ``path`` reads ``backing`` with ``bad``
    ranges failing. ``close`` (or leaving the ``with``) unmounts and reaps the child."""

    def __init__(self, work: Path, data: bytes, bad: list[tuple[int, int]]) -> None:
        if not os.path.exists("/dev/fuse"):
            raise RuntimeError("/dev/fuse is missing")
        self.backing = work / "backing.raw"
        self.bad_json = work / "bad.json"
        self.mountpoint = work / "baddisk"
        self.mountpoint.mkdir()
        self.path = self.mountpoint / NAME.decode()
        self.write(data)
        self.set_bad(bad)
        self.log = work / "baddisk.log"
        rfd, wfd = os.pipe()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.bad_json),
                 str(self.mountpoint), str(wfd)],
                pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as ready:
            line = ready.readline()
        if not line.startswith(b"READY"):
            self.close()
            raise RuntimeError(f"baddisk did not mount: {self.log.read_text()[-2000:]}")

    def write(self, data: bytes) -> None:
        """Serve ``data`` from now on (also kept as ``self.data``)."""
        self.data = data
        self.backing.write_bytes(data)

    def set_bad(self, bad: list[tuple[int, int]]) -> None:
        tmp = self.bad_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(bad))
        tmp.replace(self.bad_json)  # the server never reads half a list

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True,
                       check=False)
        if self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> BadDisk:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def main(argv: list[str]) -> int:
    backing, bad_json, mountpoint, ready_fd = argv[0], argv[1], argv[2], int(argv[3])
    options = set(pyfuse3.default_options)
    options.add("fsname=baddisk")
    options.add("ro")
    pyfuse3.init(BadDiskOps(backing, bad_json), mountpoint, options)
    try:
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)  # the test unmounts (fusermount3 -u -z) to end us
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
