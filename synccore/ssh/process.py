"""The remote command as a byte pipe over one SSH channel: stdin/stdout carry the
protocol, stderr is relayed line by line, and every abnormal end (lost link, missing command,
a signal) becomes a one-line ``PeerError``."""

from __future__ import annotations

import contextlib
import shlex
import threading
from collections.abc import Callable
from typing import Protocol

import paramiko

from diskrsync.base.errors import PeerError
from diskrsync.synccore.ssh.config import SshOptions
from diskrsync.synccore.ssh.errors import EXIT_NOT_FOUND, LinkError, RemoteCommandError

__all__ = ["MAX_PACKET_SIZE", "MAX_STDERR_LINE", "RemoteProcess", "remote_command_line"]

MAX_PACKET_SIZE = 32 * 1024  # sshd's cap; also the transport's default packet size
MAX_STDERR_LINE = 64 * 1024  # a remote's line without an end is relayed in pieces this long


def remote_command_line(remote_cmd: str, argv: list[str]) -> str:
    """The exact line the remote shell gets: every word quoted, so nothing expands."""
    return " ".join(shlex.quote(w) for w in [remote_cmd, *argv])


class Link(Protocol):
    """What a remote process needs of its connection."""

    host: str
    opts: SshOptions

    @property
    def link_lost(self) -> bool:
        """True once the connection is dead (watchdog verdict or closed transport)."""

    def link_error(self, doing: str) -> LinkError:
        """The error for a broken link, with the best reason known."""


class RemoteProcess:
    """The remote command as a byte pipe: ``send``/``recv`` may run in two threads at once.

    Abnormal ends become ``PeerError``s: a dropped link (``LinkError``), a command missing
    (exit 127) or killed by a signal (``RemoteCommandError``).
    """

    #: How long recv() at end of stream waits for the exit status to tell a clean end
    #: from a crash or a missing command.
    EOF_STATUS_WAIT = 2.0

    def __init__(
        self, conn: Link, chan: paramiko.Channel, on_stderr: Callable[[str], None]
    ) -> None:
        self._conn = conn
        self._chan = chan
        self._on_stderr = on_stderr
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._stderr_thread = threading.Thread(
            target=self._relay_stderr, name=f"ssh-stderr-{conn.host}", daemon=True
        )
        self._stderr_thread.start()

    @property
    def _name(self) -> str:
        return self._conn.opts.remote_cmd

    def _relay_stderr(self) -> None:
        pending = b""
        while True:
            try:
                data = self._chan.recv_stderr(65536)
            except TimeoutError:  # the channel's --timeout: a quiet stderr is no failure
                continue
            except Exception:
                data = b""
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_STDERR_LINE:  # never hold a peer's endless line in memory
                lines.append(pending)
                pending = b""
            for line in lines:
                self._emit(line)
        if pending:
            self._emit(pending)

    def _emit(self, line: bytes) -> None:
        # A faulty callback must not stop the relay: unread stderr would eat the window.
        with contextlib.suppress(Exception):
            self._on_stderr(line.rstrip(b"\r").decode("utf-8", "replace"))

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` to the remote stdin (blocks for window space)."""
        view = memoryview(data).cast("B")
        step = max(1024, min(self._chan.out_max_packet_size, MAX_PACKET_SIZE) - 64)
        with self._send_lock:
            off = 0
            while off < len(view):
                try:  # paramiko copies the piece into its packet: a view is enough
                    n = self._chan.send(view[off : off + step])
                except TimeoutError:
                    raise TimeoutError(f"the peer took no data for {self._chan.gettimeout():g} "
                                       f"s") from None
                except (OSError, EOFError, paramiko.SSHException):
                    raise self._failure("sending") from None
                if n <= 0:
                    raise self._failure("sending")
                off += n

    def recv(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` from the remote stdout; b"" only at a clean end of stream."""
        with self._recv_lock:
            try:
                data: bytes = self._chan.recv(max_bytes)
            except TimeoutError:
                raise TimeoutError(f"no data from the peer for {self._chan.gettimeout():g} s") \
                    from None
            except (OSError, EOFError, paramiko.SSHException):
                raise self._failure("receiving") from None
            if data:
                return data
            if not self._chan.eof_received:
                raise self._failure("receiving")
            # EOF: if the command is ending badly, say so now rather than let the caller
            # report a mere "unexpected end of stream".
            self._chan.status_event.wait(self.EOF_STATUS_WAIT)
            if self._chan.status_event.is_set():
                self._check_status()
            return b""

    def close_send(self) -> None:
        """Send EOF to the remote stdin; later sends fail."""
        with contextlib.suppress(Exception):
            self._chan.shutdown_write()

    def wait(self, timeout: float | None = None) -> int:
        """The remote exit status; abnormal ends (127, killed, lost link) raise."""
        if not self._chan.status_event.wait(timeout):
            raise RemoteCommandError(
                f"{self._name} on {self._conn.host} did not exit within {timeout:g} s"
            )
        return self._check_status()

    def _check_status(self) -> int:
        self._stderr_thread.join(1.0)  # relay its last words before our error
        status = int(self._chan.exit_status)
        if status < 0:  # channel closed without exit-status: signal (exit-signal) or link
            # sshd ends a command's channel with EOF and a close, and then, that being its
            # last channel, may close the whole connection: a transport gone by the time we
            # look says nothing about the link once the remote's EOF arrived (a link that
            # breaks sends no EOF)
            if self._conn.link_lost and not self._chan.eof_received:
                raise self._conn.link_error(f"running {self._name}")
            raise RemoteCommandError(
                f"{self._name} on {self._conn.host} ended without an exit status "
                f"(killed by a signal?)"
            )
        if status == EXIT_NOT_FOUND:
            raise RemoteCommandError(
                f"{self._name} not found on {self._conn.host} (exit {status}): install it "
                f"there or pass --remote-cmd", exit_status=status
            )
        return status

    def _failure(self, doing: str) -> PeerError:
        """Why the pipe broke: the link, or the remote command ending (with its status)."""
        if self._conn.link_lost and not self._chan.eof_received:  # see _check_status
            return self._conn.link_error(doing)
        if self._chan.status_event.wait(self.EOF_STATUS_WAIT):
            try:
                status = self._check_status()
            except PeerError as e:
                return e
            return RemoteCommandError(
                f"{self._name} on {self._conn.host} exited with status {status} while we were "
                f"{doing}", exit_status=status
            )
        return self._conn.link_error(doing)

    def close(self) -> None:
        """Close the channel (the remote command gets EOF/SIGPIPE); idempotent."""
        with contextlib.suppress(Exception):
            self._chan.close()
        self._stderr_thread.join(1.0)

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
