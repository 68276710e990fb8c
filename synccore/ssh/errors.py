"""The SSH layer's errors: every way a connection or remote command fails, each a
``PeerError`` (exit code 5) so the CLI reports them alike; the subclasses let callers react by
kind without reading messages."""

from __future__ import annotations

from diskrsync.base.errors import PeerError

__all__ = [
    "EXIT_NOT_FOUND",
    "AuthError",
    "ConnectError",
    "HostKeyChangedError",
    "HostKeyError",
    "LinkError",
    "RemoteCommandError",
    "UnknownHostKeyError",
]

#: The status a POSIX shell exits with when the command is not found.
EXIT_NOT_FOUND = 127


class ConnectError(PeerError):
    """The SSH server could not be reached or would not talk SSH."""


class HostKeyError(PeerError):
    """The server's host key is not known to be the right one."""


class UnknownHostKeyError(HostKeyError):
    """No known_hosts entry names this server; the user must accept the key once."""


class HostKeyChangedError(HostKeyError):
    """known_hosts holds a different key for this server: possible man in the middle."""


class AuthError(PeerError):
    """The server accepted none of the keys we offered."""


class LinkError(PeerError):
    """An established connection broke (peer gone, silent link, channel closed)."""


class RemoteCommandError(PeerError):
    """The remote command could not run or ended abnormally (missing, killed, a status).

    ``exit_status`` is the remote's exit status where it gave one (e.g. ``EXIT_NOT_FOUND``),
    else None.
    """

    def __init__(self, message: str, *, exit_status: int | None = None) -> None:
        super().__init__(message)
        self.exit_status = exit_status
