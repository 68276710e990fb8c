"""SSH settings: our options, and ssh_config applied to a host as OpenSSH would.

paramiko is imported only when a config file is read, so a command that merely builds
``SshOptions`` (any push) does not pay for it.
"""

from __future__ import annotations

import getpass
import glob
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diskrsync.base.errors import LocalError, UsageError
from diskrsync.synccore.location import split_port

if TYPE_CHECKING:
    import paramiko

__all__ = ["DEFAULT_KNOWN_HOSTS", "DEFAULT_SSH_CONFIG", "SYSTEM_SSH_CONFIG", "SshOptions",
           "Target", "load_config", "parse_jump", "resolve"]

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
GLOBAL_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
#: The system-wide client config, read after the user's (OpenSSH's SSHDIR/ssh_config).
SYSTEM_SSH_CONFIG = Path("/etc/ssh/ssh_config")
#: Where a relative ``Include`` in the user's config is looked for (OpenSSH: ~/.ssh).
USER_SSH_DIR = Path("~/.ssh")
#: OpenSSH's READCONF_MAX_DEPTH: Includes nested deeper are an error (a loop, usually).
MAX_INCLUDE_DEPTH = 16


@dataclass(frozen=True)
class SshOptions:
    """How to reach the remote end; defaults mirror OpenSSH where it has one."""

    identity_files: tuple[Path, ...] = ()
    ssh_config: Path | None = DEFAULT_SSH_CONFIG
    known_hosts: Path = DEFAULT_KNOWN_HOSTS
    accept_new_host_key: bool = False
    remote_cmd: str = "diskrsync"
    connect_timeout: float = 20.0
    #: A link silent for interval x count seconds, despite probes, is declared dead.
    keepalive_interval: float = 15.0
    keepalive_count: int = 4
    use_agent: bool = True
    #: Read-only system-wide known hosts (as OpenSSH's GlobalKnownHostsFile); None: skip.
    global_known_hosts: Path | None = GLOBAL_KNOWN_HOSTS
    #: The system-wide ssh_config, read after ``ssh_config`` (first value wins); None: skip
    #: (as ``ssh -F FILE`` does). Relative Includes in it are relative to its directory.
    system_ssh_config: Path | None = SYSTEM_SSH_CONFIG


@dataclass(frozen=True)
class Target:
    """One hop after ssh_config is applied: where to connect and as whom."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[Path, ...]
    identities_only: bool
    proxy_command: str | None
    proxy_jump: tuple[str, ...]
    host_key_alias: str | None
    hash_known_hosts: bool
    known_hosts: Path
    extra_known_hosts: tuple[Path, ...] = field(default=())
    #: ``StrictHostKeyChecking accept-new`` (or ``no``) in ssh_config: add unknown host keys
    #: (a changed key is refused all the same).
    accept_new_host_key: bool = False

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH files this host's key under in known_hosts."""
        name = (self.host_key_alias or self.hostname).lower()
        return name if self.port == 22 else f"[{name}]:{self.port}"


def load_config(opts: SshOptions) -> paramiko.SSHConfig:
    """ssh_config as OpenSSH reads it: the user's file (``opts.ssh_config``; the default one
    only if it exists), then the system's (``opts.system_ssh_config``, if it exists), with
    every ``Include`` expanded; the first value obtained for a setting wins."""
    import paramiko

    if opts.ssh_config is None:
        return paramiko.SSHConfig()
    lines: list[str] = []
    read: list[str] = []
    path = opts.ssh_config.expanduser()
    if path.exists() or opts.ssh_config != DEFAULT_SSH_CONFIG:
        lines += _read_config(path, USER_SSH_DIR.expanduser(), depth=0, context=None)
        read.append(str(path))
    system = opts.system_ssh_config
    if system is not None and system.exists():
        lines.append("Host *")  # back to "every host" after the user's last block
        lines += _read_config(system, system.parent, depth=0, context=None)
        read.append(str(system))
    try:
        return paramiko.SSHConfig.from_text("\n".join(lines))
    except Exception as e:
        raise UsageError(f"cannot parse ssh config {' + '.join(read)} (with their Includes): "
                         f"{e}") from None


_KEYWORD = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*)")


def _criteria(block: str) -> list[str]:
    """A ``Host``/``Match`` line as ``Match`` criteria words (``Host a b`` is ``Match
    originalhost a,b``: Host patterns see the name as typed)."""
    key, _, rest = block.replace("=", " ", 1).partition(" ")
    if key.lower() == "host":
        return ["originalhost", ",".join(rest.split())]
    words = rest.split()
    return [] if [w.lower() for w in words] == ["all"] else words


def _within(outer: str | None, block: str) -> str:
    """``block`` of an included file, restricted to where the Include's own block
    (``outer``) applies: OpenSSH never matches anything in a file included from a block
    that does not apply."""
    if outer is None:
        return block
    words = _criteria(outer) + _criteria(block)
    return "Match " + " ".join(words) if words else "Match all"


def _read_config(path: Path, base: Path, *, depth: int, context: str | None) -> list[str]:
    """The lines of one config file with its ``Include``s replaced by the included files.

    An included file's lines apply under the block the Include stands in (``context``, the
    last ``Host``/``Match`` line): its own blocks match only where that one does (see
    ``_within``), and the block is reopened after each Include, so the lines that follow it
    keep their meaning, as in OpenSSH. Relative Include paths are relative to
    ``base`` (~/.ssh for the user's config, /etc/ssh for the system's); globs are sorted;
    a pattern that matches nothing is skipped.
    """
    if depth > MAX_INCLUDE_DEPTH:
        raise UsageError(f"ssh config {path}: Include nested more than {MAX_INCLUDE_DEPTH} "
                         f"deep (does it include itself?)")
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise UsageError(f"ssh config file {path} not found") from None
    except OSError as e:
        raise LocalError(f"cannot read ssh config {path}: {e.strerror or e}") from None
    outer, out = context, []
    for line in text.splitlines():
        m = _KEYWORD.match(line)
        key = m[1].lower() if m else ""
        if key in ("host", "match"):
            line = context = _within(outer, line.strip())
        if key != "include":
            out.append(line)
            continue
        assert m is not None
        try:
            patterns = shlex.split(m[2], comments=True)
        except ValueError as e:
            raise UsageError(f"ssh config {path}: bad Include line: {e}") from None
        for pattern in patterns:
            full = Path(pattern).expanduser()
            if not full.is_absolute():
                full = base / full
            for name in sorted(glob.glob(str(full))):
                if Path(name).is_file():
                    out += _read_config(Path(name), base, depth=depth + 1, context=context)
        out.append(context or "Host *")
    return out


def _yes(value: Any) -> bool:
    return str(value).lower() in ("yes", "true")


def resolve(
    alias: str, user: str | None, port: int | None, cfg: paramiko.SSHConfig, opts: SshOptions
) -> Target:
    """Apply ssh_config to a host as typed; explicit user/port win, like ssh's -l/-p."""
    try:
        c = cfg.lookup(alias)
    except Exception as e:
        raise UsageError(f"ssh config lookup for {alias!r} failed: {e}") from None
    hostname = c.get("hostname", alias)
    try:
        real_port = port if port is not None else int(c.get("port", 22))
    except ValueError:
        raise UsageError(f"bad Port {c.get('port')!r} in ssh config for {alias}") from None
    files = tuple(opts.identity_files) + tuple(Path(p) for p in c.get("identityfile", []))
    proxy_command = c.get("proxycommand")
    if proxy_command and proxy_command.lower() == "none":
        proxy_command = None
    jump = c.get("proxyjump")
    jumps = () if not jump or jump.lower() == "none" else tuple(jump.split(","))
    known = opts.known_hosts
    if known == DEFAULT_KNOWN_HOSTS and c.get("userknownhostsfile"):
        known = Path(c["userknownhostsfile"].split()[0])
    extra = (opts.global_known_hosts,) if opts.global_known_hosts else ()
    strict = str(c.get("stricthostkeychecking", "ask")).lower()
    return Target(
        alias=alias,
        hostname=hostname,
        port=real_port,
        user=user or c.get("user") or getpass.getuser(),
        identity_files=files,
        identities_only=_yes(c.get("identitiesonly", "no")),
        proxy_command=proxy_command,
        proxy_jump=jumps,
        host_key_alias=c.get("hostkeyalias"),
        hash_known_hosts=_yes(c.get("hashknownhosts", "no")),
        known_hosts=known.expanduser(),
        extra_known_hosts=tuple(p.expanduser() for p in extra),
        accept_new_host_key=strict in ("accept-new", "no", "off"),
    )


def parse_jump(spec: str) -> tuple[str, str | None, int | None]:
    """A ProxyJump element: ``[user@]host[:port]`` or ``ssh://[user@]host[:port]``."""
    spec = spec.strip().removeprefix("ssh://").rstrip("/")
    user: str | None = None
    if "@" in spec:
        user, _, spec = spec.rpartition("@")
    host, port = split_port(spec, spec)
    if not host:
        raise UsageError(f"bad ProxyJump host {spec!r}")
    return host, user, port


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach and run the far end, and what to show meanwhile (from the CLI's flags)."""

    ssh: SshOptions
    extra: tuple[str, ...] = ()  # words after the program of a multi-word --remote-cmd
    progress: bool = False  # draw a progress bar here
    remote_progress: bool = False  # ask a Go remote for its progress lines (a bar on a tty)
    timeout: float | None = None  # fail when the remote sends nothing for this long
    #: ``--rsh``: the words of an external program (``ssh -o ...``) that runs the remote
    #: command instead of the built-in client; empty: the built-in client.
    rsh: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        """The remote command as the user gave it, for messages."""
        return " ".join([self.ssh.remote_cmd, *self.extra])
