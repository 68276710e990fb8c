"""Where a push's ends are: a local path, or ``[user@]host:path`` / ``ssh://`` (pure).

Kept apart from ssh.py so that local pushes parse their arguments without importing paramiko.
"""

from __future__ import annotations

from dataclasses import dataclass

from diskrsync.base.errors import UsageError
from diskrsync.compression.nbd import is_nbd_url
from diskrsync.compression.repolocation import is_repo_location


@dataclass(frozen=True)
class LocalPath:
    """A file on this machine."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class RemotePath:
    """A file on an SSH host; ``user``/``port`` None mean "from ssh_config or default".

    ``path`` is as the remote shell sees it: relative paths are relative to the login
    directory (``~/`` is folded into that, since the remote gets paths quoted, unexpanded).
    """

    user: str | None
    host: str
    port: int | None
    path: str

    def __post_init__(self) -> None:
        _check_user(self.user)
        _check_host(self.host)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise UsageError(f"port {self.port} out of range 1-65535")
        if not self.path or "\0" in self.path or self.path.startswith("~/"):
            raise UsageError(f"bad remote path {self.path!r}")

    def __str__(self) -> str:
        """The shortest spelling that parses back to this value (scp form if possible)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user is not None else ""
        if self.port is None:
            return f"{user}{host}:{self.path}"
        path = self.path if self.path.startswith(("/", "~")) else f"~/{self.path}"
        return f"ssh://{user}{host}:{self.port}/{path.removeprefix('/')}"


Location = LocalPath | RemotePath


def _check_user(user: str | None) -> None:
    if user is not None and (not user or any(c in user for c in "@:/[] \t\n\0")):
        raise UsageError(f"bad user name {user!r} in remote location")


def _check_host(host: str) -> None:
    bad = "@/[] \t\n\0" if ":" in host else "@/:[] \t\n\0"
    if not host or host.startswith("-") or any(c in host for c in bad):
        raise UsageError(f"bad host name {host!r} in remote location")


def _normalize_path(path: str) -> str:
    return path[2:] if path.startswith("~/") else path


def split_port(hostport: str, text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise UsageError(f"unclosed '[' in {text!r}")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"unexpected {rest!r} after ']' in {text!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = hostport.partition(":")
        port_text = port_text_ if sep else None
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit():
        raise UsageError(f"bad port {port_text!r} in {text!r}")
    return host, int(port_text)


def _parse_ssh_url(text: str) -> RemotePath:
    rest = text[len("ssh://") :]
    authority, slash, path = rest.partition("/")
    if not slash or not path:
        raise UsageError(f"no path in {text!r}: write ssh://[user@]host[:port]/path")
    user: str | None = None
    if "@" in authority:
        user, _, authority = authority.rpartition("@")
    host, port = split_port(authority, text)
    # git-style: ssh://host/abs/path is absolute, ssh://host/~/p is relative to home.
    path = path[2:] if path.startswith("~/") else path if path.startswith("~") else "/" + path
    if not path:
        raise UsageError(f"no path in {text!r}")
    return RemotePath(user, host, port, path)


def parse_location(text: str) -> Location:
    """Parse a path as scp/rsync/git accept it: local path, ``[user@]host:path`` or
    ``ssh://[user@]host[:port]/path`` (IPv6 hosts in brackets). An NBD URI (``nbd://``,
    ``nbd+unix://``) is local: this machine connects to it.

    Like scp, a colon only makes a location remote when it comes before any slash, so
    ``./a:b`` and ``/abs:x`` stay local.
    """
    if not text:
        raise UsageError("empty path")
    if is_nbd_url(text) or is_repo_location(text):
        return LocalPath(text)  # this machine's NBD client or object store client reads it
    if text.startswith("ssh://"):
        return _parse_ssh_url(text)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "[" and (i == 0 or text[i - 1] == "@"):
            end = text.find("]", i)
            if end < 0:
                return LocalPath(text)
            i = end + 1
            continue
        if c == "/":
            return LocalPath(text)
        if c == ":":
            if i == 0:
                return LocalPath(text)
            break
        i += 1
    else:
        return LocalPath(text)
    userhost, path = text[:i], text[i + 1 :]
    user: str | None = None
    if "@" in userhost:
        user, _, userhost = userhost.rpartition("@")
    host = userhost[1:-1] if userhost.startswith("[") and userhost.endswith("]") else userhost
    if userhost.startswith("[") and ":" not in host:
        raise UsageError(f"brackets are for IPv6 addresses: {text!r}")
    path = _normalize_path(path)
    if not path:
        raise UsageError(f"no path after ':' in {text!r}")
    return RemotePath(user, host, None, path)
