"""Running the far end of a sync over SSH, for both wire formats, and the native remote push.

:class:`RemoteRun` is the one wrapper around a remote command: it starts it over
``synccore.ssh`` (the built-in paramiko client, or with ``--rsh`` an external program such as
the system's ``ssh``: two process backends with one contract), relays its stderr as
``host: line`` (:class:`StderrRelay`), checks its exit status, and explains a failure in
one line (:meth:`RemoteRun.explain`). The native protocol (``diskrsync serve`` at the far
end) and the Go protocol (``synccore/go_remote.py``) both run through it.

:func:`remote_push` runs ``diskrsync serve`` on the other host and speaks the framed protocol
over its stdin/stdout: a push runs the source here and the target there (which verifies every
chunk); a pull (the backup server fetching from a client) runs the source there and the
target here. Everything that can go wrong at the far end (missing command, its own error, a
dropped or silent link, an old or foreign diskrsync) comes back as one ``PeerError`` line
naming the host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from diskrsync.base.errors import DiskrsyncError, PeerError, UsageError, error_from_wire
from diskrsync.base.progress import INTERVAL as PROGRESS_INTERVAL
from diskrsync.base.progress import Progress
from diskrsync.base.retention import Retention
from diskrsync.compression.image import retention_of
from diskrsync.compression.repolocation import is_repo_location
from diskrsync.compression.sources import source_name
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import FramedChannel, TokenBucket
from diskrsync.synccore.go_io import ProgressLineParser
from diskrsync.synccore.location import LocalPath, Location, RemotePath
from diskrsync.synccore.push import (
    PushRequest,
    open_push_source,
    run_target_end,
    source_committed,
)
from diskrsync.synccore.source import PushStats, SourceSession
from diskrsync.synccore.ssh.config import RemoteOptions
from diskrsync.synccore.ssh.connection import SshConnection, connect
from diskrsync.synccore.ssh.errors import EXIT_NOT_FOUND, LinkError, RemoteCommandError
from diskrsync.synccore.ssh.external import ExternalProcess, rsh_argv
from diskrsync.synccore.ssh.process import RemoteProcess

__all__ = ["RemoteOptions", "RemoteRun", "StderrRelay", "remote_push", "start_remote"]

T = TypeVar("T")

#: How long to wait for the remote command's exit status once the conversation is over.
EXIT_WAIT = 30.0
#: After a failure, how long the remote gets to report its own reason.
FAILURE_WAIT = 5.0
#: What `serve` exits with on a usage error: older/foreign programs reject `serve` with it.
EXIT_USAGE = UsageError.exit_code


#: What the original Go diskrsync says when it rejects a native request (its flag parser's
#: complaints, its usage text, its fatal log lines), on stderr or (merged) as its first output.
GO_WORDS = re.compile(r"unknown (shorthand )?flag: .+|flag needs an argument: .+|Usage of \S+:|"
                      r"Usage: \S+ \[flags\] <src> <dst>|"
                      r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (Source|Target) failed: .+")


class StderrRelay:
    """Relays the remote's stderr as ``host: line``.

    A diskrsync ``serve`` ends a failure with ``diskrsync: <error>`` lines: they are held back
    (``hold_errors``), since they usually become our own one-line error instead of being
    printed twice. So is everything from the first line in which the original Go tool
    rejects a native request (``go_said``): the error then names the Go tool instead of
    showing its usage text. A Go remote's progress lines (``progress_lines``) are consumed,
    not shown.
    """

    def __init__(self, host: str, *, hold_errors: bool = True,
                 progress_lines: bool = False) -> None:
        self.host = host
        self.hold_errors = hold_errors
        self.parser = ProgressLineParser() if progress_lines else None
        self.held: list[str] = []
        self.lines: list[str] = []
        self.go_said: str | None = None
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        if self.parser is not None and self.parser.feed(line)[0] != "text":
            return
        with self._lock:
            self.lines.append(line)
            if self.hold_errors and self.go_said is None and GO_WORDS.fullmatch(line.strip()):
                self.go_said = line.strip()
            if self.hold_errors and (self.go_said is not None or (
                    line.startswith("diskrsync: ")
                    and not line.startswith("diskrsync: warning:"))):
                self.held.append(line)
                return
        if line.strip() or self.hold_errors:
            self._print(line)

    def _print(self, line: str) -> None:
        sys.stderr.write(f"{self.host}: {line}\n")
        sys.stderr.flush()

    def last_error(self) -> str | None:
        """The remote's own last words: its held ``diskrsync: `` error line (without the
        prefix), or, when nothing is held back, its last non-empty line."""
        with self._lock:
            if self.hold_errors:
                return self.held[-1].removeprefix("diskrsync: ") if self.held else None
            lines = [ln.strip() for ln in self.lines if ln.strip()]
            return lines[-1] if lines else None

    def last_words(self) -> str:
        """``: <last non-empty line>``, or nothing."""
        with self._lock:
            lines = [ln for ln in self.lines if ln.strip()]
        return f": {lines[-1].strip()}" if lines else ""

    def flush(self, unless_in: str = "") -> None:
        """Print held lines, except those the final error already says (all of the Go
        tool's, when the error names it)."""
        with self._lock:
            held, self.held = self.held, []
        if GO_HINT in unless_in:
            return
        for line in held:
            text = line.removeprefix("diskrsync: ")
            said = text.removeprefix("target: ").removeprefix("source: ")
            if said not in unless_in:
                self._print(line)


#: The documented words (docs/migration.md) for a remote that is the original Go tool.
GO_HINT = "the peer is the original Go diskrsync"
NOT_OURS_HINT = ("if it is the original Go diskrsync, use --legacy, otherwise install the same "
                 "diskrsync release on both ends")


def _go_words(head: bytes) -> str | None:
    """The Go tool's first line when a peer's first output is it (stderr merged into
    stdout, e.g. under a pty), else None."""
    first = head.decode("ascii", "replace").split("\n")[0].strip()
    return first if GO_WORDS.match(first) else None


class _HostChannel:
    """A FramedChannel that names the host in protocol errors and keeps the peer's stated
    reason, which the explainer prefers to a pipe error in a race."""

    def __init__(self, inner: FramedChannel, host: str) -> None:
        self.inner = inner
        self.host = host
        self.peer_error: DiskrsyncError | None = None
        self.protocol_error: PeerError | None = None
        self.foreign: p.ForeignPeer | None = None  # another program answered

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def send(self, msg: p.Message) -> None:
        self.inner.send(msg)

    def recv(self) -> p.Message | None:
        try:
            msg = self.inner.recv()
        except PeerError as e:
            if isinstance(e, p.ForeignPeer):
                self.foreign = e
            if type(e) is PeerError or isinstance(e, p.ForeignPeer):
                # not ConnectionClosed, LinkError, RemoteCommandError
                # the decoder's "peer speaks version N, ..." etc.: say which peer
                self.protocol_error = PeerError(f"{self.host}: {e.message}")
                raise self.protocol_error from None
            raise
        if isinstance(msg, p.Error):
            self.peer_error = error_from_wire(msg.kind, f"{self.host}: {msg.message}")
            raise self.peer_error
        return msg

    def close(self) -> None:
        self.inner.close()


@dataclass
class RemoteRun:
    """One started remote command: its process (over our SSH connection ``conn``, or an
    external ``--rsh`` program, then ``conn`` is None) and stderr relay; ``channel`` when it
    speaks the native protocol (its errors then explain a failure best)."""

    host: str
    proc: RemoteProcess | ExternalProcess
    relay: StderrRelay
    cmd: str
    conn: SshConnection | None = None
    channel: _HostChannel | None = None

    def framed(self, limit: TokenBucket | None = None) -> _HostChannel:
        """The native protocol over the process's pipes (paced by ``limit``: --bwlimit)."""
        self.channel = _HostChannel(FramedChannel(self.proc, limit=limit), self.host)
        return self.channel

    def finish(self, wait: float = EXIT_WAIT) -> None:
        """After a successful conversation: the remote must also exit 0."""
        try:
            status = self.proc.wait(wait)
        except PeerError as e:
            raise self.explain(e) from None
        if status != 0:
            raise self.explain(RemoteCommandError(
                f"{self.cmd} on {self.host} exited with status {status}"))
        self.relay.flush()

    def explain(self, e: DiskrsyncError) -> DiskrsyncError:
        """The most useful single error for a failed conversation.

        In order: our own side's error; the remote's stated reason (its Error message);
        the original Go tool rejecting a native request (its words on stderr or stdout);
        a protocol complaint (foreign program, other version); a missing command; a lost
        link; the remote's last words (its ``diskrsync: ...`` line); a program that never
        spoke our protocol; then whatever the pipe said.
        """
        if not isinstance(e, PeerError):
            self.relay.flush(unless_in=e.message)  # the remote's echo of our own error
            return e
        ch, host = self.channel, self.host
        self.proc.close_send()  # EOF ends a remote that still reads: let it exit and report
        status: int | None = None
        status_error: PeerError | None = None
        try:
            status = self.proc.wait(FAILURE_WAIT)
        except PeerError as se:
            status_error = se
        line = self.relay.last_error()
        result: DiskrsyncError = e
        foreign = ch.foreign if ch is not None else None
        go_said = self.relay.go_said or (_go_words(foreign.head) if foreign else None)
        if ch is not None and ch.peer_error is not None:
            result = ch.peer_error
        elif go_said is not None and (foreign is not None or status or status_error):
            result = PeerError(f"{host}: {GO_HINT} (it answered: {go_said}): use --legacy")
        elif foreign is not None:
            result = PeerError(f"{host}: {self.cmd} {foreign.message.removeprefix('peer ')}; "
                               f"{NOT_OURS_HINT}")
        elif ch is not None and ch.protocol_error is not None:
            result = ch.protocol_error
        elif isinstance(status_error, RemoteCommandError) \
                and status_error.exit_status == EXIT_NOT_FOUND:
            result = status_error
        elif isinstance(e, LinkError):
            result = e
        elif isinstance(status_error, LinkError):
            result = status_error
        elif status and line is not None:
            result = (PeerError(f"{host}: {line}") if self.relay.hold_errors else
                      RemoteCommandError(f"{self.cmd} on {host} failed (exit status {status}): "
                                         f"{line}"))
        elif status and ch is not None and ch.bytes_received == 0:
            result = self._not_speaking(status)
        elif status:
            result = RemoteCommandError(f"{self.cmd} on {host} exited with status {status}"
                                        f"{self.relay.last_words()}")
        elif status_error is not None and not isinstance(e, RemoteCommandError):
            result = status_error
        self.relay.flush(unless_in=result.message)
        return result

    def _not_speaking(self, status: int) -> PeerError:
        """The remote program ended without a word of our protocol: an old diskrsync without
        ``serve``, or the original Go tool (which rejects ``serve`` as a usage error)."""
        hint = ""
        if status == EXIT_USAGE or not self.relay.lines:
            hint = f"; {NOT_OURS_HINT}"
        return RemoteCommandError(
            f"{self.cmd} on {self.host} exited with status {status} before speaking the "
            f"diskrsync protocol{self.relay.last_words()}{hint}")

    def converse(self, body: Callable[[], T], *, wait: float = EXIT_WAIT) -> T:
        """Run ``body()`` against the remote, then require exit status 0; turn failures into
        the best single error. Closes the connection."""
        try:
            try:
                result = body()
            except DiskrsyncError as e:
                raise self.explain(e) from None
            self.finish(wait)
            return result
        finally:
            self.close()

    def close(self) -> None:
        self.proc.close()
        if self.conn is not None:
            self.conn.close()


def start_remote(remote: RemotePath, opts: RemoteOptions, argv: list[str], *,
                 go: bool = False) -> RemoteRun:
    """Connect and start ``remote_cmd [extra...] argv...`` there; ``go``: it is the original
    Go tool (its lines are relayed as they come, minus its progress lines). With
    ``opts.rsh`` the external program runs it instead of the built-in client."""
    relay = StderrRelay(remote.host, hold_errors=not go, progress_lines=go)
    timeout = None if go else opts.timeout
    if opts.rsh:
        command = rsh_argv(opts.rsh, remote, opts.ssh, [*opts.extra, *argv])
        ext = ExternalProcess(command, remote.host, opts.ssh.remote_cmd, relay, timeout)
        return RemoteRun(remote.host, ext, relay, opts.command)
    # paramiko logs socket errors it also raises; with no handler Python would print them
    # ("Socket exception: ...") next to our one-line error
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    conn = connect(remote, opts.ssh)
    try:
        proc = conn.run([*opts.extra, *argv], on_stderr=relay, timeout=timeout)
    except BaseException:
        conn.close()
        raise
    return RemoteRun(conn.host, proc, relay, opts.command, conn)


# -- push and pull -------------------------------------------------------------------------


def _target_argv(path: str, req: PushRequest) -> list[str]:
    """`serve --target` with every option the far end (the target) acts on."""
    t = req.target
    policy = retention_of(t.keep)
    # a policy of --keep N alone goes as --keep N, which servers before the --keep-* rules
    # understand too
    keep = ["--keep", str(policy.last)] if policy == Retention(last=policy.last) \
        else policy.options()
    argv = ["serve", "--target", path, *keep, "--chunk-size", str(req.source.chunk_size)]
    if t.always_new_generation:
        argv.append("--always-new-generation")
    if req.raw_target:
        argv.append("--no-compress")  # --raw-target's old name: every server knows this one
    if t.dry_run:
        argv.append("--dry-run")
    if t.checkpoint_bytes != type(t)().checkpoint_bytes:
        argv += ["--checkpoint-interval", str(t.checkpoint_bytes)]
    return argv


def _source_argv(path: str, req: PushRequest) -> list[str]:
    """`serve --source` with every option the far end (the source) acts on."""
    argv = ["serve", "--source", path]
    if req.generation is not None:
        argv += ["--generation", str(req.generation)]
    if req.source.dry_run:
        argv.append("--dry-run")
    if req.source.ignore_read_errors:
        argv.append("--ignore-read-errors")
    if req.source.skip_free_blocks:
        argv.append("--skip-free-blocks")
    return argv


def remote_push(src: Location, dst: Location, req: PushRequest,
                opts: RemoteOptions) -> PushStats:
    """``diskrsync push`` where SRC or DST is ``[user@]host:path``."""
    if isinstance(src, RemotePath) and isinstance(dst, RemotePath):
        raise UsageError("SRC and DST are both remote: run the push on one of the two hosts")
    if not isinstance(src, RemotePath | LocalPath) or not isinstance(dst, RemotePath | LocalPath):
        raise UsageError("SRC and DST must be paths")
    if isinstance(dst, RemotePath):
        assert isinstance(src, LocalPath)
        return _push(src.path, dst, req, opts)
    assert isinstance(src, RemotePath)
    return _pull(src, dst.path, req, opts)


def _push(local: str, remote: RemotePath, req: PushRequest, opts: RemoteOptions) -> PushStats:
    """This machine is the source; ``serve --target`` runs on the remote host."""
    # local mistakes first, before any SSH
    if is_repo_location(remote.path):
        raise UsageError(f"{remote.path}: pushing into a repository over SSH is not supported "
                         f"yet; run the push on a machine that reaches the repository (an S3 "
                         f"service directly, a local repository on its own host)")
    reader = open_push_source(local, req)
    try:
        info = {"name": source_name(local), **req.source.info}
        host = f"{remote.user}@{remote.host}" if remote.user else remote.host
        src_opts = replace(req.source, info=info, host=host, target=remote.path)
        bar = Progress(reader.size, "push", opts.progress)
        session = SourceSession(None, reader, src_opts, bar.update)
        # the scan starts while SSH connects and the remote end starts (it stops, and its
        # threads are joined, before the reader closes, whatever happens)
        session.start_early()
        try:
            r = start_remote(remote, opts, _target_argv(remote.path, req))
            channel = r.framed(req.limit())
            stats: PushStats = r.converse(lambda: session.run(channel))
        finally:
            session.stop_early()
            bar.close()
        source_committed(reader, stats)
        return stats
    finally:
        reader.close()


def _pull(remote: RemotePath, local: str, req: PushRequest, opts: RemoteOptions) -> PushStats:
    """``serve --source`` runs on the remote host; this machine is the target and verifies
    every chunk it receives. The target end reports what it stored."""
    if is_repo_location(remote.path):
        raise UsageError(f"{remote.path}: reading a repository over SSH is not supported yet; "
                         f"run the push on a machine that reaches the repository")
    folder = local if os.path.isdir(local) else os.path.dirname(os.path.abspath(local))
    if not is_repo_location(local) and not os.path.isdir(folder):
        raise UsageError(f"target directory {folder} does not exist")
    r = start_remote(remote, opts, _source_argv(remote.path, req))
    channel = r.framed(req.limit())
    with _arrival_progress(channel, opts.progress):
        return r.converse(lambda: run_target_end(channel, local, req, verify=True,
                                                 pulled_from=remote.host, repositories=True))


@contextlib.contextmanager
def _arrival_progress(channel: FramedChannel, shown: bool) -> Iterator[None]:
    """A pull's progress line: the bytes arrived so far and their rate (the target end
    cannot know how many will: only the source knows what differs)."""
    bar = Progress(0, "pull", shown)
    if not bar.on:
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        seen = 0
        while not stop.wait(PROGRESS_INTERVAL):
            now = channel.bytes_received
            bar.update(now - seen)
            seen = now

    ticker = threading.Thread(target=tick, name="pull-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()
