"""pyfuse3's own ceiling: one file served from memory, mounted the way ``diskrsync mount`` is.

Run as its own process (``bench_mount.py`` starts it)::

    .venv/bin/python tests/bench/pyfuse3_ceiling.py MOUNTPOINT [--size BYTES]

The mount point shows one file, ``data``, of ``--size`` bytes: a 1 MiB block of random bytes
repeated. Each read is answered with a ``memoryview`` of that block (no copy in Python, one
trio task per request), so what is measured is pyfuse3 and the kernel alone: request dispatch on
the trio loop, the reply's copy into the kernel and the page cache. The mount options, the
open flags (``keep_cache``) and the raised ``read_ahead_kb`` are those of ``diskrsync mount``
(imported from ``diskrsync.fsmount``), so ``dd`` of ``data`` against ``dd`` of ``disk.raw`` is a
fair ratio. Prints "mounted on MOUNTPOINT (read_ahead_kb N)" on stderr when ready, unmounts
on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

from diskrsync.fsmount.mount import READ_AHEAD_KB, mount_options, raise_read_ahead

BLOCK = 1024 * 1024
FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"data"


class MemoryFile(pyfuse3.Operations):
    """One read-only file whose bytes are a repeated block held in memory."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        # Twice the block, so any request of up to one block is one slice (no join).
        block = os.urandom(BLOCK)
        self.data = memoryview(block + block)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = entry.attr_timeout = 300
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o555
            entry.st_nlink = 2
        else:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            entry.st_size = self.size
            entry.st_blocks = (self.size + 511) // 512
        entry.st_blksize = 128 * 1024
        return entry

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INODE), 1)

    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        size = max(0, min(size, self.size - off, BLOCK))
        start = off % BLOCK
        return self.data[start : start + size]


async def serve(mountpoint: str, size: int) -> None:
    pyfuse3.init(MemoryFile(size), mountpoint, mount_options(allow_other=False))
    try:
        async with trio.open_nursery() as nursery:

            async def ready() -> None:
                await trio.to_thread.run_sync(os.stat, mountpoint)
                raised = raise_read_ahead(mountpoint)
                print(f"mounted on {mountpoint} (read_ahead_kb "
                      f"{READ_AHEAD_KB if raised else 'unchanged'})", file=sys.stderr, flush=True)

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                    async for _ in received:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(ready)
            nursery.start_soon(signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--size", type=int, default=2 * 1024**3)
    args = parser.parse_args()
    trio.run(serve, os.path.abspath(args.mountpoint), args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
