"""Opening what a push or a restore writes into, without harming what is already there.

A destination is a regular file (new or existing) or a block device; a restore also streams into
a character device or a FIFO. Anything else (a socket, and for a push a character device or a
FIFO, also behind a symlink) is refused before it is opened, and the decision is checked again
on the opened descriptor, since the path may change in between. Nothing here unlinks or
replaces a path: an existing file keeps its inode, owner and mode, and a new one is created
with ``O_EXCL`` and mode 0o666 less the umask, like any file a shell redirection makes.

Block devices are opened for writing with ``O_EXCL``: Linux then refuses (``EBUSY``) a device
whose filesystem is mounted or that another program holds exclusively (a RAID member, an LVM
volume in use, a device another writer opened the same way).
"""

from __future__ import annotations

import errno
import os
import stat

from diskrsync.base.errors import BusyError, UsageError, from_oserror, stat_or_none

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, in words ("a FIFO")."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a special file"


def _writable(mode: int, streams: bool) -> bool:
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return True
    return streams and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode))


def check_push_target(path: str, st: os.stat_result | None) -> None:
    """Refuse a push into anything but a regular file or a block device (or nothing yet)."""
    if st is not None and not _writable(st.st_mode, streams=False):
        raise UsageError(f"{path} is {kind_of(st.st_mode)}: a push target is a regular file, "
                         f"a directory or a block device; refusing to touch it")


def open_dest(path: str, *, write: bool = True, create: bool = True,
              streams: bool = False, nofollow: bool = False
              ) -> tuple[int, os.stat_result, bool]:
    """Open ``path`` as a destination: (fd, its fstat, whether this call created it).

    ``write=False`` opens read-only (a dry run); ``create`` makes a missing file (``O_EXCL``:
    a file that appears meanwhile is not ours, so it is refused); ``streams`` admits a
    character device or a FIFO, opened write-only and blocking (a FIFO waits for its reader);
    ``nofollow`` refuses a symlink as the final component (ELOOP), for ``serve --restrict-to``.
    """
    st = stat_or_none(path, "cannot open")
    if st is not None and not _writable(st.st_mode, streams):
        if streams:
            raise UsageError(f"{path} is {kind_of(st.st_mode)}: cannot write a disk into it")
        check_push_target(path, st)
    flags = os.O_CLOEXEC | os.O_NOCTTY
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        flags |= os.O_WRONLY  # a stream: blocking, like a shell redirection
    else:
        # O_NONBLOCK: a FIFO swapped in after the stat must not hang the open (fstat refuses it)
        flags |= (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK
        if st is None and create and write:
            flags |= os.O_CREAT | os.O_EXCL
        elif st is not None and stat.S_ISBLK(st.st_mode) and write:
            flags |= os.O_EXCL  # without O_CREAT: EBUSY when mounted or claimed
    flags |= os.O_NOFOLLOW if nofollow else 0
    try:
        fd = os.open(path, flags, 0o666)
    except FileExistsError:
        what = "is a symlink to nothing" if os.path.islink(path) else "appeared meanwhile"
        raise UsageError(f"{path} {what}; not creating it") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise BusyError(f"{path} is mounted or in use by another program (the kernel "
                            f"refuses to open it exclusively); unmount it first") from None
        raise from_oserror(e, f"cannot open {path}") from None
    try:
        now = os.fstat(fd)
        want = stat.S_IFMT(st.st_mode) if st is not None else stat.S_IFREG
        if stat.S_IFMT(now.st_mode) != want:
            raise UsageError(f"{path} changed while it was opened (it is now "
                             f"{kind_of(now.st_mode)}); not touching it")
        if flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, now, st is None
