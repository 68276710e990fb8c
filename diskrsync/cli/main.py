"""The command line: the parser, dispatch to the command modules, and the one place where
exceptions become exit codes.

Each command lives in a module of this package (``images``, ``push``, ``serve``, ``mounts``);
the parser names it as ``"module:function"`` and only the chosen command's module is imported,
so ``diskrsync info`` never loads paramiko or pyfuse3.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from diskrsync import __version__
from diskrsync.base.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    DiskrsyncError,
    LocalError,
    Terminated,
    UsageError,
    category,
    from_oserror,
)
from diskrsync.base.parallel import MAX_AUTO_WORKERS, set_workers
from diskrsync.base.units import parse_duration, parse_rate, parse_seconds, parse_size
from diskrsync.cli.jsonout import emit_error


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.7)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse, stricter: no abbreviated options (``--ke 3 --dry`` is not ``--keep 3
    --dry-run``), an unknown option is refused where it stands (so ``push --kep 3 SRC DST``
    never takes 3 for SRC), and unknown commands and options come with suggestions. Hidden
    commands (``serve``) are neither listed nor suggested."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def _options(self) -> list[str]:
        return [o for a in self._actions
                if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
                for o in a.option_strings]

    def _parse_optional(self, arg_string: str) -> Any:
        found = super()._parse_optional(arg_string)
        # one (action, ...) tuple, or a list of them in newer Pythons; action None: unknown
        tuples = found if isinstance(found, list) else [found] if found else []
        if self._subparsers is None and len(tuples) == 1 and tuples[0][0] is None:
            name = arg_string.partition("=")[0]
            self.error(f"unknown option {name}{_did_you_mean(name, self._options())}")
        return found

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            shown = [c.dest for c in action._choices_actions]
            raise argparse.ArgumentError(
                None, f"unknown command {value!r}{_did_you_mean(value, shown)}; the commands "
                      f"are {', '.join(shown)}")
        super()._check_value(action, value)

    def error(self, message: str) -> NoReturn:
        # left over at the top level: options before the command, or words after the
        # command's last positional argument
        unknown = message.removeprefix("unrecognized arguments: ")
        if unknown != message and self._subparsers is not None:
            word = unknown.split()[0]
            message = (f"unknown option {word}{_did_you_mean(word, self._options())}"
                       if word.startswith("-") else f"too many arguments: {unknown}")
        super().error(message)


def _exit_status_epilog() -> str:
    """The exit codes as --help lists them (base/errors.py's table)."""
    lines = ["exit status:"]
    for code, text in EXIT_CODES:
        lines += textwrap.wrap(text, 79, initial_indent=f"  {code:>3}  ",
                               subsequent_indent=" " * 7)
    return "\n".join(lines)


def _ssh_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("remote ends (SRC or DST as [user@]host:path or ssh://...)")
    g.add_argument("--identity", "-i", action="append", default=[], metavar="FILE",
                   help="private key to try (repeatable); the ssh agent is tried too")
    g.add_argument("--ssh-config", "-F", metavar="FILE",
                   help="ssh client config to read (default ~/.ssh/config)")
    g.add_argument("--accept-new-host-key", action="store_true",
                   help="trust and remember an unknown host's key (never a changed one)")
    g.add_argument("--remote-cmd", default="diskrsync", metavar="PATH",
                   help="diskrsync on the remote host (default: found on its PATH)")
    g.add_argument("--legacy", action="store_true",
                   help="the remote end is the original Go diskrsync (BSNC0002 protocol)")
    g.add_argument("--rsh", "-e", metavar="COMMAND",
                   help="run the remote end through COMMAND (e.g. 'ssh -o ControlMaster=auto')"
                        " instead of the built-in SSH client, as rsync's -e")


def _push_options(sp: argparse.ArgumentParser, *, serve: bool = False) -> None:
    """The options push and serve share; ``serve`` gives the help serve's own defaults."""
    sp.add_argument("--raw-target", "--no-compress", dest="no_compress", action="store_true",
                    help="DST is a raw file or device updated in place, not an image "
                         "(--no-compress: its old name, the Go diskrsync's)")
    sp.add_argument("--chunk-size", type=parse_size, metavar="N",
                    help="chunk size of a new image (power of two, 16K-4M; default 128K); an "
                         "existing image keeps its own (a warning says so)")
    _retention_options(sp, serve=serve)
    sp.add_argument("--always-new-generation", action="store_true",
                    help="commit a new generation even when nothing changed (by default the "
                         "newest one records the run and no retention slot is used)")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="when SRC is an image: push its generation G (default: newest)")
    sp.add_argument("--dry-run", "-n", action="store_true",
                    help="compare only: report what differs, change nothing")
    sp.add_argument("--ignore-read-errors", action="store_true",
                    help="store unreadable source sectors (and damaged chunks of an image "
                         "source) as zeros and list them")
    sp.add_argument("--skip-free-blocks", action="store_true",
                    help="read only the blocks ext2/3/4 and xfs file systems on SRC use "
                         "(found through its partition table); their free blocks are stored "
                         "as zeros. SRC must be unmounted or a snapshot")
    sp.add_argument("--checkpoint-interval", type=parse_size, metavar="BYTES",
                    help=argparse.SUPPRESS)
    sp.add_argument("--timeout", type=parse_seconds, default=0, metavar="SECONDS",
                    help="fail when the client sends nothing for SECONDS (default 600; "
                         "0: never)" if serve else
                         "with a remote end: fail when it sends nothing for SECONDS "
                         "(default 0: never)")
    sp.add_argument("--max-size", type=parse_size, metavar="SIZE",
                    help="refuse a source larger than SIZE when this end is the target (default "
                         "64T): bounds what a peer can make it allocate")


def _json_option(sp: argparse.ArgumentParser, note: str = "") -> None:
    sp.add_argument("--json", action="store_true",
                    help=f"print a machine-readable object (docs/json.md{note})")


def _key_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("encrypted images and repositories")
    g.add_argument("--passphrase-file", metavar="FILE",
                   help="read the passphrase from FILE's first line (else "
                        "$DISKRSYNC_PASSPHRASE, else a prompt on the terminal)")
    g.add_argument("--key-file", metavar="FILE",
                   help="use this exported key (`diskrsync key export`) instead of the "
                        "copy inside the image")


def _s3_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group(
        "repositories", "A disk in a deduplicating repository: s3://BUCKET[/PREFIX]#DISK, or "
                        "repo:DIR#DISK for a local directory (docs/repository.md). S3 "
                        "credentials, region and endpoint come from the environment and "
                        "profiles as for every AWS tool (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
                        "AWS_ENDPOINT_URL...).")
    g.add_argument("--s3-endpoint", metavar="URL",
                   help="the S3 service's URL (MinIO, Ceph RGW, Swift...; default: "
                        "AWS_ENDPOINT_URL, else AWS)")
    g.add_argument("--s3-profile", metavar="NAME",
                   help="the AWS profile to take credentials from (default: AWS_PROFILE)")


def _retention_options(sp: argparse.ArgumentParser, *, serve: bool = False,
                       prune: bool = False) -> None:
    """The --keep-* rules (see the user guide, "Generations and retention")."""
    if prune:
        what = "give at least one"
    elif serve:
        what = ("with --restrict-to a floor (clients may ask to keep more, never fewer); "
                "without: as push's")
    else:
        what = "applied at each commit (default: --keep-last 2)"
    g = sp.add_argument_group(
        "retention", f"Which generations to keep; rules combine (a generation stays when any "
                     f"rule keeps it), the newest always stays; {what}.")
    g.add_argument("--keep-last", "--keep", dest="keep", type=int, metavar="N",
                   help="the N newest generations (--keep is the same)")
    for period, unit in (("hourly", "hour"), ("daily", "day"), ("weekly", "week"),
                         ("monthly", "month"), ("yearly", "year")):
        g.add_argument(f"--keep-{period}", type=int, metavar="N",
                       help=f"the newest generation of each of the last N {unit}s that have "
                            f"one (local time)")
    g.add_argument("--keep-within", type=parse_duration, metavar="DURATION",
                   help="every generation up to DURATION older than the newest (7d, 36h, 2w, "
                        "1y6m: m is a month)")


def build_parser() -> argparse.ArgumentParser:
    epilog = _exit_status_epilog()
    p = _Parser(
        prog="diskrsync",
        description="Back up disks over SSH into crash-safe, mountable compressed images.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", "-V", action="version", version=f"diskrsync {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: str, help_: str, *, hidden: bool = False,
            **kw: Any) -> argparse.ArgumentParser:
        """A command; a ``hidden`` one (internal, run by diskrsync itself) is missing from
        the command list, suggestions, completions and the man page, and still runs."""
        shown: dict[str, Any] = {} if hidden else {"help": help_}
        sp = sub.add_parser(name, description=help_, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter, **shown, **kw)
        sp.set_defaults(func=func)
        return sp

    sp = add("info", "images:cmd_info",
             "Show an image's (or a repository's) size, generations and space use.")
    sp.add_argument("image", metavar="IMAGE", help="an image, or a repository (REPO[#DISK])")
    _json_option(sp)
    sp.add_argument("--no-key", action="store_true",
                    help="an encrypted image: show what can be shown without its key (no "
                         "passphrase asked for)")
    _key_options(sp)
    _s3_options(sp)

    sp = add("verify", "images:cmd_verify",
             "Check an image's metadata and every chunk against its hash.")
    sp.add_argument("image", metavar="IMAGE", help="an image, or a repository (REPO[#DISK])")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="check only generation G (default: every retained one)")
    _json_option(sp)
    sp.add_argument("--repair", action="store_true",
                    help="first rewrite both superblock copies and generation tables from the "
                         "newest readable commit, accepting as lost what verify reports lost")
    sp.add_argument("--no-key", action="store_true",
                    help="an encrypted image: check only what can be checked without its key")
    _key_options(sp)
    _workers_option(sp)
    _s3_options(sp)

    sp = add("restore", "images:cmd_restore",
             "Write a generation of an image to a file (sparse), a device, or - (stdout).")
    sp.add_argument("image", metavar="IMAGE", help="an image, or a repository disk (REPO#DISK)")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="restore generation G (default: the newest; see `diskrsync info`)")
    sp.add_argument("--force", "-f", action="store_true",
                    help="overwrite a non-empty DEST file; with DEST -, write to stdout even "
                         "when it is a terminal")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _key_options(sp)
    _json_option(sp, "; not with DEST -")
    _workers_option(sp)
    _s3_options(sp)

    sp = add("prune", "images:cmd_prune",
             "Drop the generations that no retention rule (--keep-*) keeps.")
    sp.add_argument("image", metavar="IMAGE",
                    help="an image, or a repository (REPO[#DISK]: then unreferenced packs are "
                         "collected too)")
    sp.add_argument("--dry-run", "-n", action="store_true",
                    help="list what would go and which rule keeps each one; change nothing")
    _retention_options(sp, prune=True)
    _key_options(sp)  # an encrypted repository's prune reads its manifests
    _json_option(sp)
    _s3_options(sp)

    sp = add("push", "push:cmd_push",
             "Make DST equal to SRC, sending only the chunks that differ.")
    sp.add_argument("src", metavar="SRC",
                    help="a file, a block device, an image, or a repository disk (REPO#DISK)")
    sp.add_argument("dst", metavar="DST",
                    help="an image (created if missing), or with --raw-target a raw file; "
                         "a directory means DIR/<name of SRC>.spgz; a repository disk "
                         "(REPO#DISK; a new local repository directory is created)")
    _push_options(sp)
    sp.add_argument("--bwlimit", type=parse_rate, default=0.0, metavar="RATE",
                    help="at most RATE bytes per second over the wire, both ways together "
                         "(as rsync: a plain number is KiB/s; 500K, 10M, 1.5MiB/s; 0: no "
                         "limit)")
    _workers_option(sp)
    _json_option(sp)
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    sp.add_argument("--verbose", "-v", action="store_true", help="say more")
    sp.add_argument("--encrypt", action="store_true",
                    help="a new image is encrypted with a new key wrapped by the passphrase "
                         "(later pushes into it need the passphrase, not this option)")
    _key_options(sp)
    sp.add_argument("--label", metavar="TEXT",
                    help="the source the new generation records (default: SRC's path; in a "
                         "pull HOST:PATH), e.g. the volume a snapshot was taken of")
    g = sp.add_argument_group("QEMU disks (SRC as nbd://HOST[:PORT]/EXPORT or "
                              "nbd+unix:///EXPORT?socket=PATH)")
    g.add_argument("--dirty-bitmap", metavar="NAME",
                   help="read only what QEMU's dirty bitmap NAME marks as written since the "
                        "last push (a full scan when it is missing or does not match the "
                        "image's newest generation)")
    g.add_argument("--qmp", metavar="SOCKET",
                   help="with --dirty-bitmap: QEMU's QMP socket; the push then creates the "
                        "bitmap, reads a frozen copy and clears it only after it committed")
    _ssh_options(sp)
    _s3_options(sp)

    sp = add("serve", "serve:cmd_serve", "The remote end of a push (started over SSH).",
             hidden=True)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--target", metavar="PATH")
    g.add_argument("--source", metavar="PATH")
    sp.add_argument("--restrict-to", metavar="DIR",
                    help="forced-command mode: take the request from SSH_ORIGINAL_COMMAND and "
                         "refuse paths outside DIR")
    sp.add_argument("--write-only", action="store_true",
                    help="with --restrict-to: refuse to act as a source (no reads)")
    sp.add_argument("--append-only", action="store_true",
                    help="never prune a generation for a client (nor --raw-target)")
    _push_options(sp, serve=True)
    # in a forced command --keep N is a floor: clients may ask to keep more, never less;
    # a frozen client must not hold an image's writer lock for hours
    sp.set_defaults(keep=None, timeout=600)

    sp = add("mount", "mounts:cmd_mount",
             "Mount an image read-only: disk.raw, partitions/ and generations/.")
    sp.add_argument("image", metavar="IMAGE", help="an image, or a repository disk (REPO#DISK)")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    sp.add_argument("--foreground", "-f", action="store_true",
                    help="stay in the foreground and log to stderr")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="show generation G at the top level (default: the newest)")
    sp.add_argument("--allow-other", action="store_true",
                    help="let other users read the mount (needs user_allow_other)")
    sp.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="SIZE",
                    help="decompressed-chunk cache (default 256M); with --cache-dir also "
                         "the bound of the blob cache there")
    sp.add_argument("--cache-dir", metavar="DIR",
                    help="a repository disk: keep fetched blobs in DIR (least recently used "
                         "out first), so reading again costs no request")
    sp.add_argument("--verbose", "-v", action="store_true", help="log every error in detail")
    sp.add_argument("--log-file", metavar="FILE",
                    help="log to FILE (default: stderr with -f, else syslog)")
    _key_options(sp)
    _s3_options(sp)

    sp = add("umount", "mounts:cmd_umount", "Unmount a diskrsync mount (also a stale one).")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT",
                    help="the directory where `diskrsync mount` mounted an image")

    sp = add("convert", "images:cmd_convert",
             "Convert a Go diskrsync SPGZ0001 file into a diskrsync image.")
    sp.add_argument("old", metavar="OLD.spgz")
    sp.add_argument("new", metavar="NEW.spgz")
    sp.add_argument("--chunk-size", type=parse_size, default=128 * 1024, metavar="N",
                    help="chunk size of the new image (default 128K)")
    sp.add_argument("--encrypt", action="store_true",
                    help="make NEW an encrypted image (OLD may also be a diskrsync image: "
                         "every retained generation is copied)")
    _json_option(sp)
    _key_options(sp)

    sp = add("copy", "repos:cmd_copy",
             "Copy a disk with all its generations between an image and a repository or "
             "two repositories, sending only the chunks the destination lacks.")
    sp.add_argument("src", metavar="SRC", help="an image, or a repository disk (REPO#DISK)")
    sp.add_argument("dst", metavar="DST",
                    help="a repository disk (REPO#DISK; a new local repository directory is "
                         "created), or an image (created if missing); generations it has "
                         "already are skipped")
    _json_option(sp)
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    sp.add_argument("--encrypt", action="store_true",
                    help="a new destination repository is encrypted with a new key wrapped by "
                         "the passphrase (every later command on it needs the passphrase)")
    _key_options(sp)
    _s3_options(sp)

    sp = add("key", "keycmds:cmd_key_show",
             "Manage the key of an encrypted image (show, export, import, "
             "change-passphrase) or repository (show, export).")
    ksub = sp.add_subparsers(dest="key_command", metavar="ACTION")
    ksub.required = True
    kp = ksub.add_parser("show", help="the key's public facts (no passphrase needed)",
                         description="Show the key id, cipher and where the key is kept.")
    kp.set_defaults(func="keycmds:cmd_key_show")
    kp.add_argument("image", metavar="IMAGE")
    _s3_options(kp)
    kp = ksub.add_parser("export", help="write the wrapped key to FILE (or - for stdout)",
                         description="Write the key of an image or a repository, still "
                                     "protected by its passphrase, to FILE: keep it away from "
                                     "the backup host.")
    kp.set_defaults(func="keycmds:cmd_key_export")
    kp.add_argument("image", metavar="IMAGE")
    kp.add_argument("file", metavar="FILE")
    kp.add_argument("--passphrase-file", metavar="FILE",
                    help="the image's passphrase, checked before the key is written (else "
                         "$DISKRSYNC_PASSPHRASE or a prompt)")
    _s3_options(kp)
    kp = ksub.add_parser("import", help="put an exported key back into the image",
                         description="Put an exported key back into the image (its "
                                     "passphrase proves it is the image's key).")
    kp.set_defaults(func="keycmds:cmd_key_import")
    kp.add_argument("image", metavar="IMAGE")
    kp.add_argument("file", metavar="FILE")
    kp.add_argument("--passphrase-file", metavar="FILE",
                    help="the key's passphrase (else $DISKRSYNC_PASSPHRASE or a prompt)")
    kp = ksub.add_parser("change-passphrase", help="wrap the key with a new passphrase",
                         description="Wrap the image's key with a new passphrase (the data "
                                     "is not re-encrypted).")
    kp.set_defaults(func="keycmds:cmd_key_change_passphrase")
    kp.add_argument("image", metavar="IMAGE")
    _key_options(kp)
    kp.add_argument("--new-passphrase-file", metavar="FILE",
                    help="the new passphrase (else $DISKRSYNC_NEW_PASSPHRASE or a prompt)")

    return p


def looks_like_go_remote(argv: list[str]) -> bool:
    """True when argv is what a Go diskrsync client runs on its remote end."""
    return bool(argv) and argv[0].strip() in ("--target", "--source")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _warnings_to_stderr()
    if looks_like_go_remote(argv):
        # started by an original Go diskrsync client as `CMD --target|--source ... PATH`
        go = importlib.import_module("diskrsync.cli.go_remote")
        return _run(lambda: int(go.go_remote_main(argv)))
    parser = build_parser()
    if not wants_json(argv):
        args = parser.parse_args(argv)
        return _run(lambda: _dispatch(args))
    # --json: a refused command line is reported as an object too
    command = next((w for w in argv if w in _commands(parser)), None)
    return _run(lambda: _dispatch(_parse_or_raise(parser, argv)), as_json=True,
                json_command=command)


def _warnings_to_stderr() -> None:
    """What the layers below log as warnings (a state directory that cannot be written)
    reaches the user as the commands' own warnings do; the mount sets its own logging."""
    logger = logging.getLogger("diskrsync")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("diskrsync: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


def wants_json(argv: Sequence[str]) -> bool:
    """``--json`` among the options (not after ``--``)."""
    words = list(argv)
    return "--json" in words[: words.index("--")] if "--" in words else "--json" in words


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subs.choices)


def _parse_or_raise(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, with a refusal raised as a UsageError instead of exiting 2."""
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            return parser.parse_args(argv)
    except SystemExit as e:
        if not e.code:
            raise  # --help, --version
        lines = complaint.getvalue().strip().splitlines() or ["bad arguments"]
        raise UsageError(lines[-1].split("error: ", 1)[-1]) from None


def _workers_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--workers", type=int, metavar="N",
                    help=f"threads hashing, compressing and decoding chunks (default: one per "
                         f"core, at most {MAX_AUTO_WORKERS})")


def _dispatch(args: argparse.Namespace) -> int:
    """Import the chosen command's module (see the module docstring) and run the command."""
    set_workers(getattr(args, "workers", None))  # every command: none keeps another's
    module, name = args.func.split(":")
    command: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(f"diskrsync.cli.{module}"), name)
    return int(command(args))


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _run(func: Callable[[], int], *, as_json: bool = False,
         json_command: str | None = None) -> int:
    """Run a command; every way it can fail ends here as one line on stderr and an exit
    code, and with ``--json`` (``as_json``) as an error object of ``json_command`` (None:
    the command line named none) on stdout as well."""

    def failed(kind: str, code: int, message: str) -> int:
        print(f"diskrsync: {message}", file=sys.stderr)
        if as_json:
            emit_error(json_command, kind, code, message)
        return code

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = int(func())
        sys.stdout.flush()  # a full disk under a redirected stdout fails here, not at exit
        return code
    except DiskrsyncError as e:
        return failed(category(e), e.exit_code, e.message)
    except MemoryError:
        # a last line of defence: peer numbers are bounded before anything is allocated, but
        # a --max-size too large for this machine must still end in one line
        return failed("local", LocalError.exit_code, "out of memory")
    except KeyboardInterrupt:
        return failed("interrupted", EXIT_INTERRUPTED, "interrupted")
    except Terminated:
        return failed("terminated", EXIT_TERMINATED, "terminated")
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `restore IMAGE - | head`)
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:
        # in practice our stdout failing (`info IMAGE > /full/disk/f`): other I/O errors
        # are wrapped where they happen, with what was being done
        _drop_stdout()
        err = from_oserror(e, e.filename or "I/O failed")
        print(f"diskrsync: {err.message}", file=sys.stderr)
        return err.exit_code


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit cannot fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())

