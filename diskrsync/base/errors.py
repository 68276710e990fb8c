"""One error hierarchy for the whole project.

Every error a user can meet is a ``DiskrsyncError``: a one-line message and an exit code. The
subclasses say who is at fault, so callers can react by kind: ``UsageError`` (the user's input),
``LocalError`` (our side: I/O, space, permissions), ``PeerError`` (the other end of a push),
``DataError`` (stored data that fails its checks). The CLI turns them into exit codes (in
``cli/main.py``'s ``_run``), the mount into errno values (``fsmount/fuse.py``); nothing else
does. Every exit code diskrsync can end with is named in this module, and docs/user-guide.md's
table lists them (tests/test_exit_codes.py holds the two together).

Callers react to the kind of an error, never to its text: a subclass or an attribute says
what happened (``FormatVersionError``, ``ConnectionClosed``, ``RemoteCommandError.exit_status``
in the SSH layer). An error the other end reported over the wire comes back through
``error_from_wire``, which keeps its category.
"""

from __future__ import annotations

import errno
import os


class DiskrsyncError(Exception):
    """Base of every error diskrsync reports to a user."""

    exit_code = 1
    #: True when the other end of a push raised this and reported it to us (see
    #: ``error_from_wire``): where both ends run in one process, the original is preferred.
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


class ConnectionClosed(PeerError):
    """The other end closed the connection (or the pipe broke) before the conversation
    ended: no complaint about what it said, only that it stopped saying it."""


class DataError(DiskrsyncError):
    """Stored data failed its checks: not an image, unsupported version, damaged metadata."""

    exit_code = 6


class FormatVersionError(DataError):
    """The stored data is of a format version this release does not read (a newer one, or
    an unknown one): no other copy of it can be better, unlike a damaged superblock."""


class CorruptChunkError(DataError):
    """A chunk's bytes do not match its recorded content hash; never served as data."""

    def __init__(self, chunk: int, offset: int, detail: str = "content hash mismatch") -> None:
        super().__init__(f"corrupt chunk {chunk} at offset {offset}: {detail}")
        self.chunk = chunk
        self.offset = offset


class ObjectMissing(DataError):
    """An object a repository needs is not in its object store (deleted behind our back, or
    never written by a writer that died): data damage, unless the caller expected it."""

    def __init__(self, url: str) -> None:
        super().__init__(f"{url}: object missing")
        self.url = url


# Exit codes that are not errors in the usual sense: the push finished and committed,
# but the user must look (kept distinct so scripts can tell them apart).
EXIT_SOURCE_CHANGED = 10
EXIT_READ_ERRORS_IGNORED = 11
# verify: every generation is intact, but a superblock or generation table copy is damaged
EXIT_REDUNDANCY_LOST = 12

# Ends by a signal, as a shell reports them (128 + the signal's number).
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_BROKEN_PIPE = 141  # SIGPIPE: the reader of our stdout went away
EXIT_TERMINATED = 143  # SIGTERM


#: Every exit status with what it means, in order: the one table ``--help``, the man page,
#: docs/cli.md and ``--json`` error objects are made from (the user guide's table is checked
#: against the same numbers by tests/test_exit_codes.py).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (UsageError.exit_code, "usage: bad arguments, a missing file, a path that cannot be used "
                           "as asked"),
    (LocalError.exit_code, "local failure: I/O error, no space left, no permission, a stale "
                           "mount"),
    (BusyError.exit_code, "busy: another process is writing the image"),
    (PeerError.exit_code, "the other end failed: SSH connection, host key, remote command "
                          "missing, remote error"),
    (DataError.exit_code, "data: not an image, damaged metadata, a corrupt chunk, verify "
                          "found problems"),
    (EXIT_SOURCE_CHANGED, "push committed, but the source changed while it was read (use a "
                          "snapshot)"),
    (EXIT_READ_ERRORS_IGNORED, "push committed with --ignore-read-errors and some source "
                               "sectors were unreadable (stored as zeros)"),
    (EXIT_REDUNDANCY_LOST, "verify: every generation is intact, but a superblock or "
                           "generation table copy is damaged (verify --repair)"),
    (EXIT_INTERRUPTED, "interrupted (SIGINT); a push keeps a checkpoint"),
    (EXIT_TERMINATED, "terminated (SIGTERM); a push keeps a checkpoint"),
    (EXIT_BROKEN_PIPE, "the reader of stdout went away (e.g. `restore IMAGE - | head`)"),
)


class Terminated(BaseException):
    """SIGTERM arrived: stop like on Ctrl-C (a push keeps a checkpoint), exit 143.

    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` swallows it.
    """


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


#: The categories an error keeps across the wire, most specific first.
_CATEGORIES: tuple[type[DiskrsyncError], ...] = (
    UsageError, BusyError, LocalError, PeerError, DataError,
)


def category(err: DiskrsyncError) -> str:
    """The category of ``err`` as a word (``usage``, ``busy``, ``local``, ``peer``, ``data``;
    ``error`` for a bare DiskrsyncError): what ``--json`` error objects name."""
    for c in _CATEGORIES:
        if isinstance(err, c):
            return c.__name__.removesuffix("Error").lower()
    return "error"


def _error_class(kind: str) -> type[DiskrsyncError] | None:
    todo: list[type[DiskrsyncError]] = [DiskrsyncError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == kind:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def error_from_wire(
    kind: str, message: str, *, from_peer: bool = True, exit_code: int | None = None
) -> DiskrsyncError:
    """An error another process reported by class name (``kind``) and message, as an
    exception of the same category, marked ``relayed``.

    The category, not the class: a subclass may carry attributes (``ReadError.offset``) the
    wire does not, and the category is what decides the exit code. From the other end of a
    push (``from_peer``), a bad path or option is still the user's (exit 2), a lock held
    elsewhere is busy (4), damaged stored data is data (6), and the rest, its own I/O
    failures included, is the peer's (5). From our own child process (the mount daemon:
    ``from_peer=False``) its local failures stay local (3), and ``exit_code`` carries the
    code it chose. An unknown ``kind`` (a newer release's class) is the peer's, or a plain
    ``DiskrsyncError`` from a child.
    """
    cls = _error_class(kind)
    category: type[DiskrsyncError] = PeerError if from_peer else DiskrsyncError
    for c in _CATEGORIES:
        if cls is not None and issubclass(cls, c):
            category = PeerError if from_peer and c is LocalError else c
            break
    err = category(message, exit_code=exit_code)
    err.relayed = from_peer
    return err


def stat_or_none(path: str, what: str) -> os.stat_result | None:
    """``os.stat(path)``, None when nothing is there yet, a clear error for anything else."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise from_oserror(e, f"{what} {path}") from None
