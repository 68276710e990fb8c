"""SSH settings: our options, and ssh_config applied to a host as OpenSSH would.

paramiko is imported only when a config file is read, so a command that merely builds
``SshOptions`` (any push) does not pay for it.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diskrsync.base.errors import LocalError, UsageError
from diskrsync.synccore.location import split_port

if TYPE_CHECKING:
    import paramiko

__all__ = ["DEFAULT_KNOWN_HOSTS", "DEFAULT_SSH_CONFIG", "SshOptions", "Target", "load_config",
           "parse_jump", "resolve"]

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
GLOBAL_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")


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

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH files this host's key under in known_hosts."""
        name = (self.host_key_alias or self.hostname).lower()
        return name if self.port == 22 else f"[{name}]:{self.port}"


def load_config(opts: SshOptions) -> paramiko.SSHConfig:
    """The ssh_config file named by ``opts`` (OpenSSH's default one only if it exists)."""
    import paramiko

    if opts.ssh_config is None:
        return paramiko.SSHConfig()
    path = opts.ssh_config.expanduser()
    if not path.exists():
        if opts.ssh_config == DEFAULT_SSH_CONFIG:
            return paramiko.SSHConfig()
        raise UsageError(f"ssh config file {path} not found")
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except OSError as e:
        raise LocalError(f"cannot read ssh config {path}: {e.strerror or e}") from None
    except Exception as e:
        raise UsageError(f"cannot parse ssh config {path}: {e}") from None


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

    @property
    def command(self) -> str:
        """The remote command as the user gave it, for messages."""
        return " ".join([self.ssh.remote_cmd, *self.extra])
