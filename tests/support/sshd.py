"""A private OpenSSH server for tests: real sshd, own config, own keys, loopback only.

Tests of the SSH transport must meet a real sshd (window handling, re-keying, exit
statuses, stderr) rather than a paramiko stand-in that shares our bugs. Each ``SshServer``
lives in its own temp dir, listens on an ephemeral port of 127.0.0.1, accepts only its
own client key and is always stopped on exit, even when the test fails.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SSHD = Path(shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin") or "/usr/sbin/sshd")
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def free_port() -> int:
    """A loopback port nobody listens on right now (small race, callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(path: Path, kind: str = "ed25519") -> Path:
    """Generate an unencrypted key pair with ssh-keygen; returns the private key path."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", f"test-{path.name}", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def public_line(key: Path) -> str:
    """The ``type base64 comment`` line of a key's .pub file."""
    return Path(f"{key}.pub").read_text().strip()


@dataclass(frozen=True)
class Proc:
    """One process below sshd: enough to find and signal a session or remote command."""

    pid: int
    ppid: int
    comm: str
    cmdline: str


def _proc_table() -> list[Proc]:
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        # comm is parenthesised and may hold spaces: split after the last ')'.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        procs.append(Proc(int(entry.name), ppid, comm, cmdline))
    return procs


class SshServer:
    """Start ``sshd -D -e`` on a private config; use as a context manager.

    Attributes a test needs: ``host``, ``port``, ``user``, ``client_key`` (private key
    path accepted by the server), ``known_hosts`` (file holding the server's host key
    under ``[127.0.0.1]:PORT``), ``host_key`` (the server's private host key) and
    ``log`` (sshd's stderr, for failure messages).
    """

    def __init__(self, base: Path | None = None) -> None:
        self._own_dir = base is None
        self.dir = Path(tempfile.mkdtemp(prefix="sshd-")) if base is None else base
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = 0
        self.user = getpass.getuser()
        self.host_key = make_key(self.dir / "ssh_host_ed25519_key")
        self.client_key = make_key(self.dir / "client_key")
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "sshd_config"
        self.pidfile = self.dir / "sshd.pid"
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.set_authorized_keys()

    # -- set-up helpers ------------------------------------------------------------------

    @property
    def host_pattern(self) -> str:
        """How OpenSSH names this server in known_hosts (non-default port form)."""
        return f"[{self.host}]:{self.port}"

    def set_authorized_keys(
        self, options: str | None = None, keys: list[Path] | None = None
    ) -> None:
        """Rewrite authorized_keys: ``keys`` (default: the client key), each with ``options``
        (e.g. ``command="...",no-pty``), effective for the next connection."""
        prefix = f"{options} " if options else ""
        lines = [prefix + public_line(k) for k in (keys or [self.client_key])]
        self.authorized_keys.write_text("".join(line + "\n" for line in lines))

    def write_known_hosts(self, path: Path | None = None, *, key: Path | None = None) -> Path:
        """Write a known_hosts file naming this server with ``key`` (default its real one)."""
        path = path or self.known_hosts
        kind, blob = public_line(key or self.host_key).split()[:2]
        path.write_text(f"{self.host_pattern} {kind} {blob}\n")
        return path

    def write_ssh_config(self, path: Path, alias: str = "testhost", **extra: str) -> Path:
        """Write an ssh_config with a ``Host alias`` block pointing at this server; keyword
        arguments add options (``ProxyJump="..."``) and may override the defaults."""
        options = {
            "HostName": self.host,
            "Port": str(self.port),
            "User": self.user,
            "IdentityFile": str(self.client_key),
            "IdentitiesOnly": "yes",
        }
        options.update(extra)
        body = "".join(f"    {k} {v}\n" for k, v in options.items())
        path.write_text(f"Host {alias}\n{body}")
        return path

    # -- life cycle ----------------------------------------------------------------------

    def _write_config(self, port: int, extra: list[str]) -> None:
        lines = [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.pidfile}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",
            "AllowTcpForwarding yes",
            "MaxStartups 100",
            "LogLevel VERBOSE",
            *extra,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> SshServer:
        """Start sshd on a free port; retries when another process grabbed the port."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        # Newer sshd penalises sources that fail auth; tests fail auth on purpose.
        extra = ["PerSourcePenalties no"]
        self._write_config(free_port(), extra)
        check = subprocess.run([str(SSHD), "-t", "-f", str(self.config)], capture_output=True)
        if check.returncode:
            extra = []
        last = ""
        for _ in range(5):
            self.port = free_port()
            self._write_config(self.port, extra)
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [str(SSHD), "-D", "-e", "-f", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if self._wait_listening(timeout):
                return self
            last = self.log.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"sshd did not start; log tail:\n{last}")

    def _wait_listening(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5) as s,
            ):
                s.settimeout(2)
                if s.recv(4) == b"SSH-":
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop sshd and every session below it (terminate, wait, kill)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        children = self.descendants(proc.pid)
        # A SIGSTOPped session would ignore SIGTERM until continued.
        for p in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> SshServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and remove its temp dir (if we made it)."""
        try:
            self.stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- inspecting sessions -------------------------------------------------------------

    def descendants(self, root: int | None = None) -> list[Proc]:
        """Every process below sshd (sessions, their shells and commands)."""
        if root is None:
            if self.proc is None:
                return []
            root = self.proc.pid
        table = _proc_table()
        found: list[Proc] = []
        parents = {root}
        changed = True
        while changed:
            changed = False
            for p in table:
                if p.ppid in parents and p.pid not in parents:
                    parents.add(p.pid)
                    found.append(p)
                    changed = True
        return found

    def wait_for(self, pred: str, timeout: float = 5.0) -> list[Proc]:
        """Wait until some process below sshd has ``pred`` in its command line."""
        deadline = time.monotonic() + timeout
        while True:
            hits = [p for p in self.descendants() if pred in p.cmdline or pred == p.comm]
            if hits or time.monotonic() > deadline:
                return hits
            time.sleep(0.02)

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (monitor and network child)."""
        return [p.pid for p in self.descendants() if p.comm == "sshd"]


@contextlib.contextmanager
def running_sshd(base: Path | None = None) -> Iterator[SshServer]:
    """``with running_sshd(tmp_path) as srv:`` — the functional spelling of ``SshServer``."""
    with SshServer(base) as srv:
        yield srv
