"""The remote command through an external program: ``--rsh 'ssh ...'`` (rsync's ``-e``).

The built-in paramiko client cannot do everything OpenSSH can (ControlMaster, certificates,
FIDO keys, GSSAPI); with ``--rsh`` the system's own client runs the remote command and its
pipes become the byte pipe. :func:`rsh_argv` builds the command line as OpenSSH expects it
(``[-l USER] [-p PORT] HOST 'quoted command'``); :class:`ExternalProcess` has the same
``send``/``recv``/``wait`` contract as the paramiko ``RemoteProcess``, and turns ssh's own
failure lines (it exits 255) into the same ``PeerError`` kinds the built-in client raises.
No paramiko here.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence

from diskrsync.base.errors import PeerError, UsageError
from diskrsync.synccore.channel import FdStream
from diskrsync.synccore.location import RemotePath
from diskrsync.synccore.ssh.config import DEFAULT_SSH_CONFIG, SshOptions
from diskrsync.synccore.ssh.errors import (
    EXIT_NOT_FOUND,
    AuthError,
    ConnectError,
    HostKeyChangedError,
    HostKeyError,
    LinkError,
    RemoteCommandError,
    UnknownHostKeyError,
)
from diskrsync.synccore.ssh.process import MAX_STDERR_LINE, remote_command_line

__all__ = ["SSH_FAILED", "ExternalProcess", "classify_ssh_failure", "rsh_argv"]

#: What OpenSSH exits with when it fails itself (not the remote command).
SSH_FAILED = 255
#: stderr lines kept to explain a failure (ssh's host-key warning is about 15 lines).
KEPT_LINES = 64


def rsh_argv(rsh: Sequence[str], remote: RemotePath, opts: SshOptions,
             argv: Sequence[str]) -> list[str]:
    """The external command line: the ``--rsh`` words, then what the user asked of SSH
    explicitly (``-i``, ``-F``, ``--accept-new-host-key`` as OpenSSH options), then
    ``-l USER``/``-p PORT`` from the location, the host and the remote command as one
    string with every word quoted (ssh would join separate words with spaces anyway)."""
    if not rsh:
        raise UsageError("--rsh is empty")
    if remote.host.startswith("-"):
        raise UsageError(f"bad host name {remote.host!r}")
    words = list(rsh)
    for key in opts.identity_files:
        words += ["-i", str(key)]
    if opts.ssh_config is None:
        words += ["-F", "none"]
    elif opts.ssh_config != DEFAULT_SSH_CONFIG:
        words += ["-F", str(opts.ssh_config)]
    if opts.accept_new_host_key:
        words += ["-o", "StrictHostKeyChecking=accept-new"]
    if remote.user:
        words += ["-l", remote.user]
    if remote.port is not None:
        words += ["-p", str(remote.port)]
    return [*words, remote.host, remote_command_line(opts.remote_cmd, list(argv))]


# -- ssh's own failures --------------------------------------------------------------------

_CONNECT = re.compile(r"ssh: connect to host (\S+) port (\d+): (.+)")
_RESOLVE = re.compile(r"ssh: Could not resolve hostname (\S+): (.+)")
_DENIED = re.compile(r"(\S+): Permission denied \((.+)\)\.?")
_UNKNOWN_KEY = re.compile(r"No (\S+) host key is known for (\S+) and you have requested "
                          r"strict checking\.")
_CHANGED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED")
_OFFENDING = re.compile(r"Offending (\S+ )?key (?:for IP )?in (\S+)")
_REMOVE_WITH = re.compile(r"ssh-keygen -f \S+ -R (\S+)|ssh-keygen -f '[^']+' -R '?([^' ]+)")
_VERIFY_FAILED = "Host key verification failed."
_SILENT = re.compile(r"Timeout, server (\S+) not responding\.?")
_LOST = re.compile(r"(Connection to \S+ closed by remote host\.?|client_loop: .+|"
                   r"Connection (?:closed|reset) by .+|kex_exchange_identification: .+|"
                   r"Connection timed out during banner exchange|"
                   r"ssh_exchange_identification: .+|Broken pipe)")


def _reason(text: str) -> str:
    text = text.strip().rstrip(".")
    if text.lower() == "connection refused":
        return "connection refused (is sshd running, and is the port right?)"
    return text[:1].lower() + text[1:]


def classify_ssh_failure(host: str, lines: Sequence[str]) -> PeerError | None:
    """The error for ssh's own failure (exit 255) from its stderr ``lines``, in the words
    and kinds of the built-in client; None when the lines say nothing known."""
    text = [ln.strip() for ln in lines]
    for ln in text:
        if m := _CONNECT.fullmatch(ln):
            return ConnectError(f"cannot connect to {m[1]} port {m[2]}: {_reason(m[3])}")
        if m := _RESOLVE.fullmatch(ln):
            return ConnectError(f"cannot resolve host name {m[1]!r}: {_reason(m[2])}")
    if any(_CHANGED.search(ln) for ln in text):
        where = next((m[2] for ln in text if (m := _OFFENDING.search(ln))), "known_hosts")
        name = next((m[1] or m[2] for ln in text if (m := _REMOVE_WITH.search(ln))), host)
        return HostKeyChangedError(
            f"WARNING: HOST KEY OF {host} HAS CHANGED (ssh refused it; the old entry is in "
            f"{where}): someone may be intercepting the connection; if the change is "
            f"expected, remove the old key with: ssh-keygen -R {name}")
    for ln in text:
        if m := _UNKNOWN_KEY.fullmatch(ln):
            return UnknownHostKeyError(
                f"unknown host key for {host} (ssh has no {m[1]} key for {m[2]}): check its "
                f"fingerprint (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub on the server), "
                f"then rerun with --accept-new-host-key")
    if _VERIFY_FAILED in text:
        return HostKeyError(
            f"ssh could not verify the host key of {host} (unknown or changed; run "
            f"`ssh {host} true` to see why), or rerun with --accept-new-host-key for a new one")
    for ln in text:
        if m := _DENIED.fullmatch(ln):
            return AuthError(f"authentication as {m[1]} failed: the server accepted none "
                             f"of the offered credentials ({m[2]}); check -i, ssh-agent and "
                             f"the server's authorized_keys")
        if m := _SILENT.fullmatch(ln):
            return LinkError(f"lost connection to {host}: no response from {m[1]} "
                             f"(ssh's ServerAlive probes unanswered)")
    for ln in reversed(text):
        if _LOST.fullmatch(ln):
            return LinkError(f"lost connection to {host}: {ln}")
    return None


class ExternalProcess:
    """The remote command run by an external program (``ssh HOST CMD``), as a byte pipe
    with the contract of ``RemoteProcess``: ``send``/``recv`` from two threads, ``wait``
    for the status, abnormal ends as ``PeerError``s (ssh's failures classified, 127 as a
    missing command).

    The program inherits our terminal, so ssh can still ask for a passphrase or a FIDO
    touch on /dev/tty; its stdin, stdout and stderr are pipes.
    """

    #: How long recv() at end of stream waits for the exit status (see RemoteProcess).
    EOF_STATUS_WAIT = 2.0

    def __init__(self, argv: list[str], host: str, name: str,
                 on_stderr: Callable[[str], None], timeout: float | None = None) -> None:
        self.host = host
        self._name = name  # the remote command, for messages
        self._program = argv[0]
        self._on_stderr = on_stderr
        self._lines: deque[str] = deque(maxlen=KEPT_LINES)
        self._lines_lock = threading.Lock()
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, close_fds=True)
        except OSError as e:
            raise UsageError(f"--rsh: cannot run {argv[0]}: {e.strerror or e}") from None
        assert self._proc.stdin and self._proc.stdout and self._proc.stderr
        # our own descriptors, closed by us alone (the file objects would close theirs too)
        self._rfd = os.dup(self._proc.stdout.fileno())
        self._stream = FdStream(self._rfd, os.dup(self._proc.stdin.fileno()), timeout=timeout)
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._stderr_thread = threading.Thread(target=self._relay_stderr, daemon=True,
                                               name=f"rsh-stderr-{host}")
        self._stderr_thread.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _relay_stderr(self) -> None:
        err = self._proc.stderr
        assert err is not None
        pending = b""
        while True:
            try:
                data = os.read(err.fileno(), 65536)
            except (OSError, ValueError):
                data = b""
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_STDERR_LINE:
                lines.append(pending)
                pending = b""
            for line in lines:
                self._emit(line)
        if pending:
            self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        with self._lines_lock:
            self._lines.append(line)
        if classify_ssh_failure(self.host, [line]) is not None:
            return  # becomes our own one-line error if ssh fails; shown at wait() otherwise
        with contextlib.suppress(Exception):
            self._on_stderr(line)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` to the remote stdin."""
        with self._send_lock:
            try:
                self._stream.send(bytes(data))
            except TimeoutError:
                raise
            except (OSError, PeerError):
                raise self._failure("sending") from None

    def recv(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` from the remote stdout; b"" only at a clean end of stream."""
        with self._recv_lock:
            try:
                data = self._stream.recv(max_bytes)
            except TimeoutError:
                raise
            except OSError:
                raise self._failure("receiving") from None
            if data:
                return data
            # EOF: if the command (or ssh) is ending badly, say so now
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(self.EOF_STATUS_WAIT)
            if self._proc.returncode is not None:
                self._check_status()
            return b""

    def close_send(self) -> None:
        """EOF to the remote stdin; later sends fail."""
        with self._send_lock, contextlib.suppress(OSError):
            self._stream.close_send()

    def wait(self, timeout: float | None = None) -> int:
        """The remote exit status; abnormal ends (ssh's failures, 127, a signal) raise."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RemoteCommandError(
                f"{self._name} on {self.host} did not exit within {timeout:g} s") from None
        return self._check_status()

    def _check_status(self) -> int:
        self._stderr_thread.join(1.0)
        status = self._proc.returncode
        with self._lines_lock:
            lines = list(self._lines)
        failure = classify_ssh_failure(self.host, lines) if status == SSH_FAILED else None
        if failure is not None:
            raise failure
        for line in lines:  # ssh-like lines held back, but ssh did not fail: show them
            if classify_ssh_failure(self.host, [line]) is not None:
                with contextlib.suppress(Exception):
                    self._on_stderr(line)
        if status < 0:
            raise RemoteCommandError(f"{self._program} (--rsh) was killed by signal {-status}")
        if status == EXIT_NOT_FOUND:
            raise RemoteCommandError(
                f"{self._name} not found on {self.host} (exit {status}): install it there or "
                f"pass --remote-cmd", exit_status=status)
        return status

    def _failure(self, doing: str) -> PeerError:
        """Why the pipe broke: ssh or the remote command ended (with its status)."""
        try:
            status = self.wait(self.EOF_STATUS_WAIT)
        except PeerError as e:
            return e
        if status == SSH_FAILED:
            return LinkError(f"lost connection to {self.host} while {doing} "
                             f"({self._program} exited with status {status})")
        return RemoteCommandError(f"{self._name} on {self.host} exited with status {status} "
                                  f"while we were {doing}", exit_status=status)

    def close(self) -> None:
        """Close the pipes and end the program (terminate, then kill); idempotent."""
        self.close_send()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._rfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._rfd)
            self._rfd = -1
        # a ControlPersist master forked by ssh may hold stderr open: do not wait for it
        self._stderr_thread.join(1.0)
        if not self._stderr_thread.is_alive():
            self._proc.stderr.close()  # type: ignore[union-attr]

    def __enter__(self) -> ExternalProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
