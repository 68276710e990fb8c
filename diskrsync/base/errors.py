"""One error hierarchy for the whole project.

Every error a user can meet is a ``DiskrsyncError``: a one-line message and an exit code. The
subclasses say who is at fault, so callers can react by kind: ``UsageError`` (the user's input),
``LocalError`` (our side: I/O, space, permissions), ``PeerError`` (the other end of a push),
``DataError`` (stored data that fails its checks). The CLI turns them into exit codes, the mount
into errno values; nothing else does.
"""

from __future__ import annotations

import errno
import os


class DiskrsyncError(Exception):
    """Base of every error diskrsync reports to a user."""

    exit_code = 1
    #: True when the other end of a push raised this and reported it to us (see
    #: ``reported_error``): where both ends run in one process, the original is preferred.
    relayed = False

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(DiskrsyncError):
    """The user asked for something that cannot be done as asked (bad path, wrong option)."""

    exit_code = 2


class LocalError(DiskrsyncError):
    """Our side failed: an I/O error, no space, no permission, a lock held by someone else."""

    exit_code = 3


class ReadError(LocalError):
    """Bytes of a source disk cannot be read (an I/O error, e.g. a bad sector at ``offset``);
    a push narrows it down to sectors and, with --ignore-read-errors, reads them as zeros."""

    def __init__(self, path: str, offset: int, code: int) -> None:
        super().__init__(f"read error in {path} at offset {offset}: {os.strerror(code)}")
        self.offset = offset
        self.errno = code


class BusyError(LocalError):
    """Another process holds the lock we need (a second writer of one image)."""

    exit_code = 4


class PeerError(DiskrsyncError):
    """The other end of a push misbehaved: garbage, an early close, an incompatible version."""

    exit_code = 5


class DataError(DiskrsyncError):
    """Stored data failed its checks: not an image, unsupported version, damaged metadata."""

    exit_code = 6


class CorruptChunkError(DataError):
    """A chunk's bytes do not match its recorded content hash; never served as data."""

    def __init__(self, chunk: int, offset: int, detail: str = "content hash mismatch") -> None:
        super().__init__(f"corrupt chunk {chunk} at offset {offset}: {detail}")
        self.chunk = chunk
        self.offset = offset


# Exit codes that are not errors in the usual sense: the push finished and committed,
# but the user must look (kept distinct so scripts can tell them apart).
EXIT_SOURCE_CHANGED = 10
EXIT_READ_ERRORS_IGNORED = 11
# verify: every generation is intact, but a superblock or generation table copy is damaged
EXIT_REDUNDANCY_LOST = 12


def from_oserror(exc: OSError, what: str) -> DiskrsyncError:
    """A one-line error for an OSError met while doing ``what`` (e.g. "opening /x.spgz").

    The class follows who can fix it: a missing path or a directory is the user's input, the
    rest (space, permission, I/O) is our side's environment.
    """
    code = exc.errno or 0
    reason = os.strerror(code) if code else str(exc)
    msg = f"{what}: {reason}"
    if code in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
        return UsageError(msg)
    if code == errno.ENOSPC:
        return LocalError(f"{what}: no space left on device")
    return LocalError(msg)


def reported_error(kind: str, message: str) -> DiskrsyncError:
    """The error the other end of a push reported (by its class name), classed by who can fix
    it: a bad path or option is still the user's (exit 2), a lock held elsewhere is busy
    (4), damaged stored data is data (6); anything else is the peer's (5)."""

    def find(cls: type[DiskrsyncError]) -> type[DiskrsyncError] | None:
        if cls.__name__ == kind:
            return cls
        for sub in cls.__subclasses__():
            found = find(sub)
            if found is not None:
                return found
        return None

    cls = find(DiskrsyncError)
    err: DiskrsyncError = PeerError(message)
    for category in (UsageError, BusyError, DataError):
        if cls is not None and issubclass(cls, category):
            err = category(message)
            break
    err.relayed = True
    return err


def stat_or_none(path: str, what: str) -> os.stat_result | None:
    """``os.stat(path)``, None when nothing is there yet, a clear error for anything else."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise from_oserror(e, f"{what} {path}") from None
