"""Pushes where one end is on another host, over SSH, and the forced-command server side.

``remote_push`` runs ``diskrsync serve`` on the other host through ``synccore.ssh`` and speaks
the framed protocol over its stdin/stdout: a push runs the source here and the target there
(which verifies every chunk); a pull (the backup server fetching from a client) runs the
source there and the target here. Everything that can go wrong at the far end (missing
command, its own error, a dropped or silent link, an old or foreign diskrsync) comes back as
one ``PeerError`` line naming the host.

``restricted_serve`` is the server side for an ``authorized_keys`` forced command: it reads
what the client asked for from ``SSH_ORIGINAL_COMMAND`` and refuses paths outside one
directory (and reads, with ``--write-only``), so a leaked backup key cannot touch anything else;
the server's retention policy (``--keep`` as a floor, ``--append-only``) keeps such a key from
pruning history.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from diskrsync.base.errors import (
    DiskrsyncError,
    LocalError,
    PeerError,
    UsageError,
    error_from_wire,
    from_oserror,
)
from diskrsync.base.merkle import Shape
from diskrsync.base.progress import Progress
from diskrsync.base.units import parse_size
from diskrsync.cli.requests import push_request, ssh_options
from diskrsync.compression.image import DEFAULT_KEEP
from diskrsync.legacy_cmd import legacy_push
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import Channel, FdStream, FramedChannel
from diskrsync.synccore.location import LocalPath, RemotePath
from diskrsync.synccore.push import PushRequest, open_source, run_target_end, serve_source
from diskrsync.synccore.source import PushStats, SourceSession
from diskrsync.synccore.ssh.config import SshOptions
from diskrsync.synccore.ssh.connection import SshConnection, connect
from diskrsync.synccore.ssh.errors import EXIT_NOT_FOUND, LinkError, RemoteCommandError
from diskrsync.synccore.ssh.process import RemoteProcess
from diskrsync.synccore.target import TargetStore, open_store, serve_target

__all__ = ["remote_push", "restricted_serve"]

T = TypeVar("T")

#: How long to wait for the remote command's exit status once the conversation is over.
EXIT_WAIT = 30.0
#: After a failure, how long the remote gets to report its own reason.
FAILURE_WAIT = 5.0
#: What `serve` exits with on a usage error: older/foreign programs reject `serve` with it.
EXIT_USAGE = UsageError.exit_code


def _target_argv(path: str, req: PushRequest) -> list[str]:
    """`serve --target` with every option the far end (the target) acts on."""
    t = req.target
    argv = ["serve", "--target", path, "--keep", str(t.keep),
            "--chunk-size", str(req.source.chunk_size)]
    if req.raw_target:
        argv.append("--no-compress")
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
    return argv


# -- the conversation's plumbing -------------------------------------------------------------


class _StderrRelay:
    """Relays the remote's stderr as ``host: line``, but holds back its final
    ``diskrsync: <error>`` lines: they usually become our own one-line error instead of
    being printed twice."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.held: list[str] = []
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)
            if line.startswith("diskrsync: ") and not line.startswith("diskrsync: warning:"):
                self.held.append(line)
                return
        self._print(line)

    def _print(self, line: str) -> None:
        sys.stderr.write(f"{self.host}: {line}\n")
        sys.stderr.flush()

    def last_error(self) -> str | None:
        """The remote's own error line, without the ``diskrsync: `` prefix."""
        with self._lock:
            return self.held[-1].removeprefix("diskrsync: ") if self.held else None

    def flush(self, unless_in: str = "") -> None:
        """Print held lines, except those the final error already says."""
        with self._lock:
            held, self.held = self.held, []
        for line in held:
            text = line.removeprefix("diskrsync: ")
            said = text.removeprefix("target: ").removeprefix("source: ")
            if said not in unless_in:
                self._print(line)


class _HostChannel:
    """A FramedChannel that names the host in protocol errors and observes the conversation
    (enough for a pull's summary, and to prefer the peer's stated reason in a race)."""

    def __init__(self, inner: FramedChannel, host: str) -> None:
        self.inner = inner
        self.host = host
        self.peer_error: DiskrsyncError | None = None
        self.protocol_error: PeerError | None = None
        self.peer_hello: p.Hello | None = None
        self.my_hello: p.Hello | None = None
        self.done: p.Done | None = None
        self.committed: p.Committed | None = None
        self.chunks: list[int] = []

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def send(self, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            self.my_hello = msg
        elif isinstance(msg, p.Committed):
            self.committed = msg
        self.inner.send(msg)

    def recv(self) -> p.Message | None:
        try:
            msg = self.inner.recv()
        except PeerError as e:
            if type(e) is PeerError:  # not ConnectionClosed, LinkError, RemoteCommandError
                # the decoder's "peer speaks version N, ..." etc.: say which peer
                self.protocol_error = PeerError(f"{self.host}: {e.message}")
                raise self.protocol_error from None
            raise
        if isinstance(msg, p.Error):
            self.peer_error = error_from_wire(msg.kind, f"{self.host}: {msg.message}")
            raise self.peer_error
        if isinstance(msg, p.Hello):
            self.peer_hello = msg
        elif isinstance(msg, p.Chunk):
            self.chunks.append(msg.index)
        elif isinstance(msg, p.Done):
            self.done = msg
        elif isinstance(msg, p.Committed):
            self.committed = msg
        return msg

    def close(self) -> None:
        self.inner.close()


@dataclass
class _Remote:
    """One started ``serve``: its connection, process, channel and stderr relay."""

    conn: SshConnection
    proc: RemoteProcess
    channel: _HostChannel
    relay: _StderrRelay
    cmd: str

    def finish(self) -> None:
        """After a successful conversation: the remote must also exit 0."""
        try:
            status = self.proc.wait(EXIT_WAIT)
        except PeerError as e:
            raise self._explain(e) from None
        if status != 0:
            raise self._explain(RemoteCommandError(
                f"{self.cmd} on {self.conn.host} exited with status {status}"))
        self.relay.flush()

    def _explain(self, e: DiskrsyncError) -> DiskrsyncError:
        """The most useful single error for a failed conversation.

        In order: our own side's error; the remote's stated reason (its Error message);
        a protocol complaint (foreign program, other version); a missing command; a lost
        link; the remote's ``diskrsync: ...`` line; a program that never spoke our protocol;
        then whatever the pipe said.
        """
        if not isinstance(e, PeerError):
            self.relay.flush(unless_in=e.message)  # the remote's echo of our own error
            return e
        ch, host = self.channel, self.conn.host
        self.proc.close_send()  # EOF ends a serve that still reads: let it exit and report
        status: int | None = None
        status_error: PeerError | None = None
        try:
            status = self.proc.wait(FAILURE_WAIT)
        except PeerError as se:
            status_error = se
        line = self.relay.last_error()
        result: DiskrsyncError = e
        if ch.peer_error is not None:
            result = ch.peer_error
        elif ch.protocol_error is not None:
            result = ch.protocol_error
        elif isinstance(status_error, RemoteCommandError) \
                and status_error.exit_status == EXIT_NOT_FOUND:
            result = status_error
        elif isinstance(e, LinkError):
            result = e
        elif isinstance(status_error, LinkError):
            result = status_error
        elif status and line is not None:
            result = PeerError(f"{host}: {line}")
        elif status and ch.bytes_received == 0:
            result = self._not_speaking(status)
        elif status:
            result = RemoteCommandError(f"{self.cmd} on {host} exited with status {status}"
                                        f"{self._last_words()}")
        elif status_error is not None and not isinstance(e, RemoteCommandError):
            result = status_error
        self.relay.flush(unless_in=result.message)
        return result

    def _last_words(self) -> str:
        lines = [ln for ln in self.relay.lines if ln.strip()]
        return f": {lines[-1].strip()}" if lines else ""

    def _not_speaking(self, status: int) -> PeerError:
        """The remote program ended without a word of our protocol: an old diskrsync without
        ``serve``, or the original Go tool (which rejects ``serve`` as a usage error)."""
        hint = ""
        if status == EXIT_USAGE or not self.relay.lines:
            hint = ("; if it is the original Go diskrsync, use --legacy, otherwise install the "
                    "same diskrsync release on both ends")
        return RemoteCommandError(
            f"{self.cmd} on {self.conn.host} exited with status {status} before speaking the "
            f"diskrsync protocol{self._last_words()}{hint}")

    def close(self) -> None:
        self.proc.close()
        self.conn.close()


def _start(remote: RemotePath, opts: SshOptions, extra: list[str], argv: list[str],
           timeout: float | None) -> _Remote:
    # paramiko logs socket errors it also raises; with no handler Python would print them
    # ("Socket exception: ...") next to our one-line error
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    conn = connect(remote, opts)
    try:
        relay = _StderrRelay(conn.host)
        proc = conn.run([*extra, *argv], on_stderr=relay, timeout=timeout)
    except BaseException:
        conn.close()
        raise
    channel = _HostChannel(FramedChannel(proc), conn.host)
    cmd = " ".join([opts.remote_cmd, *extra])
    return _Remote(conn, proc, channel, relay, cmd)


def _run_conversation(r: _Remote, body: Callable[[], T]) -> T:
    """Run ``body()`` against the remote; turn failures into the best single error."""
    try:
        try:
            result = body()
        except DiskrsyncError as e:
            raise r._explain(e) from None
        r.finish()
        return result
    finally:
        r.close()


# -- push and pull -------------------------------------------------------------------------


def remote_push(src: Any, dst: Any, req: PushRequest, args: argparse.Namespace) -> PushStats:
    """``diskrsync push`` where SRC or DST is ``[user@]host:path`` (or ``--legacy``)."""
    if getattr(args, "legacy", False):

        stats: PushStats = legacy_push(src, dst, req, args)
        return stats
    if isinstance(src, RemotePath) and isinstance(dst, RemotePath):
        raise UsageError("SRC and DST are both remote: run the push on one of the two hosts")
    if not isinstance(src, RemotePath | LocalPath) or not isinstance(dst, RemotePath | LocalPath):
        raise UsageError("SRC and DST must be paths")
    if isinstance(dst, RemotePath):
        assert isinstance(src, LocalPath)
        return _push(src.path, dst, req, args)
    assert isinstance(src, RemotePath)
    return _pull(src, dst.path, req, args)


def _push(local: str, remote: RemotePath, req: PushRequest,
          args: argparse.Namespace) -> PushStats:
    """This machine is the source; ``serve --target`` runs on the remote host."""

    opts, extra = ssh_options(args)
    reader = open_source(local, req.generation)  # local mistakes first, before any SSH
    try:
        info = {"name": os.path.basename(local.rstrip("/")), **req.source.info}
        src_opts = replace(req.source, info=info)
        quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
        r = _start(remote, opts, extra, _target_argv(remote.path, req),
                   getattr(args, "timeout", None))
        bar = Progress(reader.size, "push", not quiet)
        try:
            stats: PushStats = _run_conversation(
                r, lambda: SourceSession(r.channel, reader, src_opts, bar.update).run())
        finally:
            bar.close()
        return stats
    finally:
        reader.close()


def _pull(remote: RemotePath, local: str, req: PushRequest,
          args: argparse.Namespace) -> PushStats:
    """``serve --source`` runs on the remote host; this machine is the target and verifies
    every chunk it receives."""

    folder = local if os.path.isdir(local) else os.path.dirname(os.path.abspath(local))
    if not os.path.isdir(folder):
        raise UsageError(f"target directory {folder} does not exist")
    opts, extra = ssh_options(args)
    r = _start(remote, opts, extra, _source_argv(remote.path, req),
               getattr(args, "timeout", None))
    t0 = time.monotonic()
    ch = r.channel
    committed = _run_conversation(
        r, lambda: run_target_end(ch, local, req, verify=True))
    stats = PushStats(dry_run=req.target.dry_run, duration=time.monotonic() - t0)
    # What a target can know: sizes, what arrived, the roots and the commit. The byte
    # counts keep PushStats' meaning: "sent" is source to target, here what we received.
    stats.bytes_sent = ch.bytes_received
    stats.bytes_received = ch.bytes_sent
    if ch.peer_hello is not None and ch.my_hello is not None:
        shape = Shape(ch.peer_hello.size, ch.my_hello.chunk_size, ch.my_hello.fanout)
        stats.size, stats.chunk_size = shape.size, shape.chunk_size
        stats.chunks = shape.chunks
        stats.target_root_hash = str(ch.my_hello.info.get("root", ""))
        stats.resumed = bool(ch.my_hello.info.get("resumed"))
        for c in sorted(set(ch.chunks)):
            _add_range(stats, c * shape.chunk_size, shape.chunk_length(c))
    if ch.done is not None:
        stats.root_hash = ch.done.root.hex()
        info = ch.done.info
        stats.read_errors = [(int(o), int(n)) for o, n in info.get("read_errors") or []]
        changed = int(info.get("source_changed_chunks") or 0)
        if changed:
            stats.warnings.append(f"{remote.host}: the source changed during the pull: {changed}"
                                  f" chunk(s) differ from its scan (use a snapshot there)")
        if req.target.dry_run:  # no chunks travel in a dry run: the source counted them
            stats.chunks_differing = int(info.get("chunks_differing", 0))
            stats.chunk_bytes_differing = int(info.get("chunk_bytes_differing", 0))
            stats.differing_ranges = [(int(o), int(n))
                                      for o, n in info.get("differing_ranges") or []]
    if committed is not None:
        if req.target.dry_run:
            stats.target_root_hash = committed.root.hex()
        else:
            stats.generation = committed.generation or None
    return stats


def _add_range(stats: PushStats, off: int, length: int) -> None:
    stats.chunks_differing += 1
    stats.chunk_bytes_differing += length
    r = stats.differing_ranges
    if r and r[-1][0] + r[-1][1] == off:
        r[-1] = (r[-1][0], r[-1][1] + length)
    else:
        r.append((off, length))


# -- forced-command server side -------------------------------------------------------------

#: Options a client may send to a restricted serve: name -> takes a value.
_CLIENT_OPTIONS = {
    "--target": True, "--source": True, "--keep": True, "--chunk-size": True,
    "--checkpoint-interval": True, "--generation": True, "-g": True, "--no-compress": False,
    "--dry-run": False, "-n": False, "--ignore-read-errors": False,
}


def _parse_request(command: str) -> argparse.Namespace:
    """The client's ``... serve --target|--source PATH [options]`` as serve's Namespace.

    The program word(s) before ``serve`` are the client's ``--remote-cmd`` and are ignored:
    what runs here is the forced command.
    """

    try:
        words = shlex.split(command)
    except ValueError as e:
        raise UsageError(f"refused: cannot parse the requested command ({e})") from None
    if "serve" not in words:
        raise UsageError("refused: this key only allows `diskrsync serve` (a diskrsync push)")
    rest = words[words.index("serve") + 1 :]
    given: dict[str, str | bool] = {}
    i = 0
    while i < len(rest):
        word = rest[i]
        name, eq, value = word.partition("=")
        if name not in _CLIENT_OPTIONS or (eq and not _CLIENT_OPTIONS[name]):
            raise UsageError(f"refused: option {word!r} is not allowed with this key")
        if _CLIENT_OPTIONS[name]:
            if not eq:
                i += 1
                if i >= len(rest):
                    raise UsageError(f"refused: {name} needs a value")
                value = rest[i]
            given[name] = value
        else:
            given[name] = True
        i += 1
    if ("--target" in given) == ("--source" in given):
        raise UsageError("refused: the request must name exactly one --target or --source")
    try:
        return argparse.Namespace(
            target=given.get("--target"), source=given.get("--source"),
            keep=int(given.get("--keep", 2)),
            chunk_size=parse_size(str(given.get("--chunk-size", "128K"))),
            checkpoint_interval=(parse_size(str(given["--checkpoint-interval"]))
                                 if "--checkpoint-interval" in given else None),
            generation=(int(str(given.get("--generation", given.get("-g"))))
                        if "--generation" in given or "-g" in given else None),
            no_compress="--no-compress" in given,
            dry_run="--dry-run" in given or "-n" in given,
            ignore_read_errors="--ignore-read-errors" in given,
        )
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise UsageError(f"refused: bad option value in the request ({e})") from None


#: What an append-only server commits with: "keep the newest 2**62", i.e. every generation.
KEEP_ALL = 1 << 62


def _note(message: str) -> None:
    """A line for the client (relayed there as ``HOST: ...``), not an error."""
    sys.stderr.write(f"diskrsync: note: {message}\n")
    sys.stderr.flush()


def apply_retention(req: argparse.Namespace, *, floor: int | None, append_only: bool) -> None:
    """The server's retention policy over a client's target request (``req``, in place).

    A stolen client key must not shrink what the server keeps: with ``--append-only`` no
    generation is pruned on a client's behalf (pruning is the administrator's ``prune``), with
    ``--keep N`` at least N are kept (clients may ask for more). Either way a raw target
    (``--no-compress``), which keeps no history and is overwritten in place, is refused.
    """
    if floor is not None and floor < 1:
        raise UsageError("serve --keep must be at least 1")
    if not (append_only or floor):
        return
    if req.no_compress:
        raise UsageError("refused: this key keeps the backups' history (serve "
                         f"{'--append-only' if append_only else f'--keep {floor}'}): "
                         "--no-compress would overwrite a file in place")
    if append_only:
        _note(f"this server keeps every generation (serve --append-only): --keep {req.keep} "
              f"is ignored; pruning is the server administrator's job")
        req.keep = KEEP_ALL
    elif floor is not None and req.keep < floor:
        _note(f"this server keeps at least {floor} generations: --keep {req.keep} raised "
              f"to {floor}")
        req.keep = floor


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _open_dir_beneath(root: str, folder: str) -> int:
    """An fd of ``folder`` (a directory under ``root``, symlinks already resolved), opened one
    component at a time from ``root`` without following a symlink: someone who may write
    under ``root`` cannot swap a directory for a symlink between the check and the open."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in Path(os.path.relpath(folder, root)).parts:
            if part == ".":
                continue
            step = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=fd)
            os.close(fd)
            fd = step
    except OSError as e:
        os.close(fd)
        if e.errno == errno.ENOENT:
            raise UsageError(f"directory {folder} does not exist") from None
        raise UsageError(f"refused: {folder} changed while being opened (a symlink or "
                         f"non-directory appeared in it: {e.strerror})") from None
    return fd


def _enter_beneath(real: str, root: str) -> str:
    """Make the directory of ``real`` (or ``real`` itself, a directory) the working
    directory, opened beneath ``root``; returns the name to use from there on ("." for a
    directory). Later opens then cannot be redirected by swapping an ancestor."""
    folder, name = (real, ".") if os.path.isdir(real) else os.path.split(real)
    fd = _open_dir_beneath(root, folder)
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)
    _refuse_symlink(name)
    return name


def _refuse_symlink(name: str) -> None:
    """The final component is never followed: a symlink there could point anywhere."""
    try:
        mode = os.lstat(name).st_mode
    except FileNotFoundError:
        return
    except OSError as e:  # a client's name too long for the file system, ...
        raise from_oserror(e, f"refused: {os.path.abspath(name)}") from None
    if stat.S_ISLNK(mode):
        raise UsageError(f"refused: {os.path.abspath(name)} is a symbolic link")


def _guard(path: str, root: str | None) -> str:
    """``path`` with every symlink and ``..`` resolved (the parent's, for a file not created
    yet; realpath also follows a dangling link); refused unless it lies under ``root``."""
    real = os.path.realpath(path)
    if root is not None and not _inside(real, root):
        shown = path if real == path else f"{path} (really {real})"
        raise UsageError(f"refused: {shown} is outside {root}, the only directory this key "
                         f"may use")
    return real


def _send_refusal(message: str) -> None:
    """Tell a waiting client why, in the protocol (it shows the reason as the error)."""
    frame = p.preamble() + p.encode(p.Error("UsageError", message))
    with contextlib.suppress(OSError):
        os.write(1, frame)


def restricted_serve(args: argparse.Namespace) -> int:
    """``serve`` as an authorized_keys forced command: the request comes from
    ``SSH_ORIGINAL_COMMAND``; paths must resolve under ``--restrict-to``; ``--write-only``
    refuses to act as a source, so the key can add backups but never read one back."""
    try:
        plan = _plan_restricted(args)
    except DiskrsyncError as e:
        _send_refusal(e.message)
        raise
    return _serve_restricted(*plan)


def _plan_restricted(args: argparse.Namespace) -> tuple[argparse.Namespace, str | None]:
    root = os.path.realpath(args.restrict_to) if args.restrict_to else None
    if root is not None and not os.path.isdir(root):
        raise LocalError(f"--restrict-to {args.restrict_to}: no such directory on this host")
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    if args.target or args.source:
        if root is not None:
            raise UsageError("serve --restrict-to takes the path from the client's request: "
                             "drop --target/--source from the forced command")
        # a forced command naming its own path: serve exactly that, in the asked direction
        asked = _parse_request(command) if command else None
        want = "--source" if args.source else "--target"
        if asked is not None and bool(asked.source) != bool(args.source):
            raise UsageError(f"refused: this key is fixed to serve {want}")
        if args.source and args.write_only:
            raise UsageError("refused: this key is write-only: it may push backups but "
                             "not read them (--source)")
        fixed = argparse.Namespace(**vars(args))
        fixed.keep = DEFAULT_KEEP if args.keep is None else args.keep
        if args.target:
            apply_retention(fixed, floor=None, append_only=args.append_only)
        return fixed, None
    if not command:
        raise UsageError("serve --restrict-to is meant as a forced command in "
                         "authorized_keys: SSH_ORIGINAL_COMMAND is not set")
    req = _parse_request(command)
    req.timeout = args.timeout  # the server's, never the client's
    req.max_size = args.max_size  # the server's limit, never the client's
    if req.source is not None and args.write_only:
        raise UsageError("refused: this key is write-only: it may push backups but not read "
                         "them (--source)")
    if req.target is not None:
        apply_retention(req, floor=args.keep, append_only=args.append_only)
    path = req.target or req.source
    real = _guard(path, root)
    if root is not None:
        real = _enter_beneath(real, root)
    if req.source is not None:
        req.source = real
    else:
        req.target = real
    return req, root


def _serve_restricted(req: argparse.Namespace, root: str | None) -> int:
    """What cmd_serve runs, with the target path checked again once the source has named
    its image (a directory target becomes DIR/<name>.spgz)."""

    out_fd = os.dup(1)
    os.dup2(2, 1)  # stdout carries the protocol: nothing else may be printed there
    channel: Channel = FramedChannel(FdStream(0, out_fd, req.timeout))
    push_req = push_request(req)
    if req.source:
        serve_source(channel, req.source, req.generation, push_req.source)
        return 0

    def opener(hello: p.Hello) -> TargetStore:
        path = req.target
        if os.path.isdir(path):
            name = os.path.basename(str(hello.info.get("name", "")).rstrip("/")) or "disk"
            path = os.path.join(path, name + ".spgz")
            real = _guard(path, root)
            if root is None:
                path = real
            elif os.path.isdir(path):
                raise UsageError(f"refused: {real} is a directory")
        if root is None:
            return open_store(path, hello, push_req.target, raw=push_req.raw_target)
        # beneath DIR (the working directory): never follow the final component
        _refuse_symlink(path)
        return open_store(path, hello, replace(push_req.target, nofollow=True),
                          raw=push_req.raw_target)

    serve_target(channel, opener, verify=True, max_size=push_req.target.max_size)
    return 0

