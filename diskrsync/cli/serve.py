"""``diskrsync serve``: the remote end of a push, started over SSH (also as a forced command).

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
import io
import os
import shlex
import stat
import sys
from dataclasses import replace
from pathlib import Path

from diskrsync.base.errors import DiskrsyncError, LocalError, UsageError, from_oserror
from diskrsync.base.retention import Retention
from diskrsync.cli.main import build_parser
from diskrsync.cli.requests import push_request, retention, set_retention
from diskrsync.compression.image import DEFAULT_KEEP
from diskrsync.compression.targets import target_path
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import Channel, FdStream, FramedChannel
from diskrsync.synccore.push import run_target_end, serve_source
from diskrsync.synccore.target import TargetStore, open_store, serve_target


def cmd_serve(args: argparse.Namespace) -> int:
    if args.restrict_to or args.append_only or os.environ.get("SSH_ORIGINAL_COMMAND"):
        return restricted_serve(args)  # owns stdout: it may have to send a refusal
    if not (args.target or args.source):
        raise UsageError("serve needs --target PATH or --source PATH")
    # stdout carries the protocol: nothing else may be printed there
    out_fd = os.dup(1)
    os.dup2(2, 1)
    channel = FramedChannel(FdStream(0, out_fd, args.timeout))
    if args.target:
        run_target_end(channel, args.target, push_request(args), verify=True)
    else:
        # the source's options (--dry-run, --ignore-read-errors, --skip-free-blocks) come
        # from the pulling client
        serve_source(channel, args.source, args.generation, push_request(args).source)
    return 0


# -- forced-command server side -------------------------------------------------------------

#: Options a client may send to a restricted serve: name -> takes a value.
_CLIENT_OPTIONS = {
    "--target": True, "--source": True, "--keep": True, "--keep-last": True,
    "--keep-hourly": True, "--keep-daily": True, "--keep-weekly": True, "--keep-monthly": True,
    "--keep-yearly": True, "--keep-within": True, "--always-new-generation": False,
    "--chunk-size": True, "--checkpoint-interval": True, "--generation": True, "-g": True,
    "--no-compress": False, "--raw-target": False, "--dry-run": False, "-n": False,
    "--ignore-read-errors": False,
    "--skip-free-blocks": False,
}


def _parse_request(command: str) -> argparse.Namespace:
    """The client's ``... serve --target|--source PATH [options]`` as serve's Namespace.

    The program word(s) before ``serve`` are the client's ``--remote-cmd`` and are ignored:
    what runs here is the forced command. Only the options in ``_CLIENT_OPTIONS`` pass; the
    rest of the request is parsed by the real ``serve`` parser, so its types and defaults are
    the command line's own.
    """
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise UsageError(f"refused: cannot parse the requested command ({e})") from None
    if "serve" not in words:
        raise UsageError("refused: this key only allows `diskrsync serve` (a diskrsync push)")
    rest = words[words.index("serve") + 1 :]
    expect_value = False
    for word in rest:
        if expect_value:
            expect_value = False
            continue
        name, eq, _value = word.partition("=")
        if name not in _CLIENT_OPTIONS or (eq and not _CLIENT_OPTIONS[name]):
            raise UsageError(f"refused: option {word!r} is not allowed with this key")
        expect_value = _CLIENT_OPTIONS[name] and not eq
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            req = build_parser().parse_args(["serve", *rest])
    except SystemExit:
        lines = complaint.getvalue().strip().splitlines() or ["bad request"]
        why = lines[-1].split("error: ", 1)[-1]
        raise UsageError(f"refused: bad option value in the request ({why})") from None
    if (req.target is None) == (req.source is None):
        raise UsageError("refused: the request must name exactly one --target or --source")
    if retention(req) is None:
        req.keep = DEFAULT_KEEP  # a client that names no --keep asks for the default
    return req


#: What an append-only server commits with: "keep the newest 2**62", i.e. every generation.
KEEP_ALL = 1 << 62


def _note(message: str) -> None:
    """A line for the client (relayed there as ``HOST: ...``), not an error."""
    sys.stderr.write(f"diskrsync: note: {message}\n")
    sys.stderr.flush()


def apply_retention(req: argparse.Namespace, *, floor: int | Retention | None,
                    append_only: bool) -> None:
    """The server's retention policy over a client's target request (``req``, in place).

    A stolen client key must not shrink what the server keeps: with ``--append-only`` no
    generation is pruned on a client's behalf (pruning is the administrator's ``prune``), with
    ``--keep N`` (or any ``--keep-*`` rule) the server's rules are a floor: what they keep is
    kept whatever the client asks (the union of both policies; clients may keep more). Either
    way a raw target (``--raw-target``), which keeps no history and is overwritten in place,
    is refused.
    """
    if isinstance(floor, int):
        if floor < 1:
            raise UsageError("serve --keep must be at least 1")
        floor = Retention(last=floor)
    if not (append_only or floor):
        return
    asked = retention(req) or Retention(last=DEFAULT_KEEP)
    if req.no_compress:
        rule = "--append-only" if append_only else floor.describe()  # type: ignore[union-attr]
        raise UsageError(f"refused: this key keeps the backups' history (serve {rule}): "
                         "--raw-target would overwrite a file in place")
    if append_only:
        _note(f"this server keeps every generation (serve --append-only): {asked.describe()} "
              f"is ignored; pruning is the server administrator's job")
        set_retention(req, Retention(last=KEEP_ALL))
    elif floor is not None and not asked.covers(floor):
        union = asked.union(floor)
        _note(f"this server keeps at least {floor.describe()}: {asked.describe()} raised to "
              f"{union.describe()}")
        set_retention(req, union)


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
        if retention(fixed) is None:
            fixed.keep = DEFAULT_KEEP
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
        apply_retention(req, floor=retention(args), append_only=args.append_only)
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
    its image (a directory target becomes DIR/<name>.spgz, or DIR/<name> with
    --no-compress)."""

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
            path = target_path(path, str(hello.info.get("name", "")), raw=push_req.raw_target)
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

