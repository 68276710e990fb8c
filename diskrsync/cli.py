"""Command line: argument parsing, progress and exit codes (errors become exit codes only here)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from diskrsync import __version__
from diskrsync.errors import DiskrsyncError, LocalError, UsageError

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_seconds(text: str) -> float:
    """A non-negative number of seconds (0: never)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def parse_size(text: str) -> int:
    """'128K', '256M', '1G' or plain bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and t[-1:] else ""
    try:
        n = int(float(t[: len(t) - len(unit)]) * SIZE_UNITS[unit])
    except (ValueError, OverflowError):  # OverflowError: "inf"
        n = -1
    if not 0 <= n < 1 << 63:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128K, 256M)")
    return n


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class Progress:
    """A tqdm bar on a terminal, nothing otherwise (logs and cron mails stay clean)."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                            unit_divisor=1024, leave=False, file=sys.stderr)

    def update(self, n: int, sent: int | None = None) -> None:
        """Advance by ``n`` bytes (read or written); ``sent``: bytes sent so far (pushes)."""
        if self.bar is not None:
            if sent is not None:
                self.bar.set_postfix_str(f"sent {human(sent)}", refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- commands --------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from diskrsync.compression.container import open_image
    from diskrsync.compression.maintenance import image_info

    img = open_image(args.image)
    try:
        info = image_info(img)
    finally:
        img.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"image:        {info['path']} ({info['format']})")
    print(f"size:         {info['size']} bytes ({human(info['size'])})")
    print(f"chunk size:   {human(info['chunk_size'])}")
    ratio = f"ratio {info['ratio']}" if info["ratio"] is not None else "no data yet"
    print(f"stored:       {human(info['stored_bytes'])} ({ratio})")
    print(f"allocated:    {human(info['allocated_bytes'])} on disk")
    if info.get("checkpoint"):
        print("checkpoint:   a push was interrupted; the next push resumes from it")
    print("generations:")
    if not info["generations"]:
        print("  (none)")
    for g in info["generations"]:
        root = g["root_hash"][:16] or "-"
        print(f"  {g['number']:>4}  {_when(g['time'])}  {human(g['size']):>10}  {root}  "
              f"{g['source']}")
        meta = g.get("meta", {})
        if meta.get("source_changed_chunks"):
            print(f"        warning: the source changed during this push "
                  f"({meta['source_changed_chunks']} chunk(s) differ from the scan)")
        if meta.get("read_errors"):
            ranges = ", ".join(f"{o}+{n}" for o, n in meta["read_errors"][:10])
            print(f"        warning: {len(meta['read_errors'])} unreadable range(s) stored as "
                  f"zeros: {ranges}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from diskrsync.compression.container import open_image
    from diskrsync.compression.image import Image
    from diskrsync.compression.maintenance import verify
    from diskrsync.errors import EXIT_REDUNDANCY_LOST

    # opened even when the newest commit may be lost: verify names it, --repair accepts it
    img = open_image(args.image, accept_loss=True)
    try:
        if args.repair:
            if not isinstance(img, Image):
                raise UsageError(f"{args.image}: --repair works on diskrsync images only")
            for line in img.repair():
                print(f"repair: {line}", file=sys.stderr)
            img.refresh()
        report = verify(img, args.generation)
    finally:
        img.close()
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems,
                          "warnings": report.warnings, "bad_chunks": report.bad_chunks,
                          "chunks_checked": report.chunks_checked}, indent=2))
    else:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for p in report.problems:
            print(f"problem: {p}")
        for b in report.bad_chunks:
            gens = b.get("generations", [])
            gen = (f"generation{'s' if len(gens) > 1 else ''} {', '.join(map(str, gens))} "
                   if gens else "")
            print(f"bad chunk: {gen}chunk {b['chunk']} at offset {b['offset']}: {b['problem']}")
        state = "ok" if report.ok else "FAILED"
        if report.ok and report.warnings:
            state = "ok, but a metadata copy is damaged (`verify --repair` rewrites it)"
        print(f"{args.image}: {state} ({report.chunks_checked} stored chunks checked)")
    if not report.ok:
        return 6
    return EXIT_REDUNDANCY_LOST if report.warnings else 0


def cmd_restore(args: argparse.Namespace) -> int:
    from diskrsync.compression.container import open_image
    from diskrsync.compression.maintenance import restore

    img = open_image(args.image)
    try:
        snap = img.snapshot(args.generation)
        try:
            bar = Progress(snap.size, "restore", args.dest != "-" and not args.quiet)
            try:
                restore(snap, args.dest, force=args.force, progress=bar.update)
            finally:
                bar.close()
        finally:
            snap.close()
    finally:
        img.close()
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from diskrsync.compression.container import open_image
    from diskrsync.compression.image import Image

    img = open_image(args.image)
    try:
        if not isinstance(img, Image):
            raise UsageError(f"{args.image} is an SPGZ0001 file: it has one generation only")
        pruned = img.prune(args.keep)
    finally:
        img.close()
    if pruned:
        print(f"pruned generation(s) {', '.join(map(str, pruned))}")
    else:
        print("nothing to prune")
    return 0


def _push_request(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from diskrsync.synccore.protocol import DEFAULT_MAX_SIZE
    from diskrsync.synccore.push import PushRequest
    from diskrsync.synccore.source import SourceOptions
    from diskrsync.synccore.target import TargetOptions

    limit = DEFAULT_MAX_SIZE if args.max_size is None else args.max_size
    target = TargetOptions(keep=args.keep, dry_run=args.dry_run, max_size=limit)
    if getattr(args, "checkpoint_interval", None):
        target = replace(target, checkpoint_bytes=args.checkpoint_interval)
    return PushRequest(
        source=SourceOptions(chunk_size=args.chunk_size, dry_run=args.dry_run,
                             ignore_read_errors=getattr(args, "ignore_read_errors", False)),
        target=target,
        raw_target=args.no_compress,
        generation=getattr(args, "generation", None),
    )


def _push_summary(stats: Any, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from diskrsync.errors import EXIT_READ_ERRORS_IGNORED, EXIT_SOURCE_CHANGED

    warnings = stats.warnings
    if stats.source_changed_chunks:
        warnings.append(f"the source changed during the push: {len(stats.source_changed_chunks)}"
                        f" chunk(s) differ from the scan (use a snapshot); the backup holds what "
                        f"was read when each chunk was sent")
    if stats.read_errors:
        ranges = ", ".join(f"{o}+{n}" for o, n in stats.read_errors[:10])
        more = ", ..." if len(stats.read_errors) > 10 else ""
        warnings.append(f"{len(stats.read_errors)} unreadable range(s) stored as zeros "
                        f"(offset+length): {ranges}{more}")
    if args.json:
        print(json.dumps(asdict(stats), indent=2))
    elif not args.quiet:
        if stats.dry_run:
            print(f"dry run: {stats.chunks_differing} of {stats.chunks} chunks differ "
                  f"({human(stats.chunk_bytes_differing)} would move before compression)")
            for off, n in stats.differing_ranges[:50]:
                print(f"  differs: bytes {off}-{off + n - 1}")
            if len(stats.differing_ranges) > 50:
                print(f"  ... {len(stats.differing_ranges) - 50} more ranges")
            print(f"source root: {stats.root_hash}")
            print(f"target root: {stats.target_root_hash}")
        else:
            gen = f"generation {stats.generation}" if stats.generation else "updated in place"
            print(f"{gen}, root {stats.root_hash[:16]}…: {stats.chunks_differing} of "
                  f"{stats.chunks} chunks differed, {human(stats.bytes_sent)} sent in "
                  f"{stats.duration:.1f} s")
    for w in warnings:
        print(f"diskrsync: warning: {w}", file=sys.stderr)
    if stats.source_changed_chunks:
        return EXIT_SOURCE_CHANGED
    if stats.read_errors:
        return EXIT_READ_ERRORS_IGNORED
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from diskrsync.synccore.location import LocalPath, parse_location
    from diskrsync.synccore.push import local_push, open_source

    req = _push_request(args)
    src, dst = parse_location(args.src), parse_location(args.dst)
    if not (isinstance(src, LocalPath) and isinstance(dst, LocalPath)) or args.legacy:
        from diskrsync.remote import remote_push

        return _push_summary(remote_push(src, dst, req, args), args)
    total = 0
    if not args.quiet and not args.json and sys.stderr.isatty():
        with contextlib.suppress(DiskrsyncError):
            r = open_source(args.src, args.generation)
            total = r.size
            r.close()
    bar = Progress(total, "push", bool(total))
    try:
        stats = local_push(args.src, args.dst, req, progress=bar.update)
    finally:
        bar.close()
    return _push_summary(stats, args)


def cmd_serve(args: argparse.Namespace) -> int:
    from diskrsync.synccore.channel import FdStream, FramedChannel
    from diskrsync.synccore.push import run_target_end, serve_source

    if args.restrict_to or args.append_only or os.environ.get("SSH_ORIGINAL_COMMAND"):
        from diskrsync.remote import restricted_serve

        return restricted_serve(args)  # owns stdout: it may have to send a refusal
    if args.keep is None:
        args.keep = 2  # the client always names it; a person typing serve may not
    if not (args.target or args.source):
        raise UsageError("serve needs --target PATH or --source PATH")
    # stdout carries the protocol: nothing else may be printed there
    out_fd = os.dup(1)
    os.dup2(2, 1)
    channel = FramedChannel(FdStream(0, out_fd, args.timeout))
    if args.target:
        run_target_end(channel, args.target, _push_request(args), verify=True)
    else:
        # the source's options (--dry-run, --ignore-read-errors) come from the pulling client
        serve_source(channel, args.source, args.generation, _push_request(args).source)
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from diskrsync.compression.container import open_image
    from diskrsync.fsmount.mount import mount_main

    path = os.path.abspath(args.image)
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    mount_main(lambda: open_image(path), args.mountpoint, foreground=args.foreground,
               generation=args.generation, allow_other=args.allow_other,
               cache_size=args.cache_size, verbose=args.verbose, log_file=log_file)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from diskrsync.fsmount.mount import umount_main

    umount_main(args.mountpoint)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from diskrsync.legacy_cmd import convert

    return convert(args.old, args.new, chunk_size=args.chunk_size)


# -- parser ----------------------------------------------------------------------------


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


def _push_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--no-compress", action="store_true",
                    help="DST is a raw file or device updated in place, not an image")
    sp.add_argument("--chunk-size", type=parse_size, default=128 * 1024, metavar="N",
                    help="chunk size of a new image (power of two, 16K-4M; default 128K)")
    sp.add_argument("--keep", type=int, default=2, metavar="N",
                    help="generations to keep in the image (default 2)")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="when SRC is an image: push its generation G (default: newest)")
    sp.add_argument("--dry-run", "-n", action="store_true",
                    help="compare only: report what differs, change nothing")
    sp.add_argument("--ignore-read-errors", action="store_true",
                    help="store unreadable source sectors (and damaged chunks of an image "
                         "source) as zeros and list them")
    sp.add_argument("--checkpoint-interval", type=parse_size, metavar="BYTES",
                    help=argparse.SUPPRESS)
    sp.add_argument("--timeout", type=parse_seconds, default=0, metavar="SECONDS",
                    help="with a remote end: fail when it sends nothing for SECONDS "
                         "(default 0: never)")
    sp.add_argument("--max-size", type=parse_size, metavar="SIZE",
                    help="refuse a source larger than SIZE when this end is the target (default "
                         "64T): bounds what a peer can make it allocate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskrsync",
        description="Back up disks over SSH into crash-safe, mountable compressed images.",
    )
    p.add_argument("--version", action="version", version=f"diskrsync {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            **kw: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, **kw)
        sp.set_defaults(func=func)
        return sp

    sp = add("info", cmd_info, "Show an image's size, generations and space use.")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("verify", cmd_verify,
             "Check an image's metadata and every chunk against its hash.")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="check only generation G (default: every retained one)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--repair", action="store_true",
                    help="first rewrite both superblock copies and generation tables from the "
                         "newest readable commit, accepting as lost what verify reports lost")

    sp = add("restore", cmd_restore,
             "Write a generation of an image to a file (sparse), a device, or - (stdout).")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="restore generation G (default: the newest; see `diskrsync info`)")
    sp.add_argument("--force", action="store_true", help="overwrite a non-empty DEST file")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    sp = add("prune", cmd_prune, "Keep only the newest N generations of an image.")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--keep", type=int, required=True, metavar="N",
                    help="how many of the newest generations to keep (at least 1)")

    sp = add("push", cmd_push,
             "Make DST equal to SRC, sending only the chunks that differ.")
    sp.add_argument("src", metavar="SRC", help="a file, a block device, or an image")
    sp.add_argument("dst", metavar="DST",
                    help="an image (created if missing), or with --no-compress a raw file; "
                         "a directory means DIR/<name of SRC>.spgz")
    _push_options(sp)
    sp.add_argument("--json", action="store_true", help="print a machine-readable summary")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    sp.add_argument("--verbose", "-v", action="store_true", help="say more")
    _ssh_options(sp)

    sp = sub.add_parser("serve", description="The remote end of a push (started over SSH).")
    sp.set_defaults(func=cmd_serve)
    # hidden from the command list: users never run it themselves
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "serve"]
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--target", metavar="PATH")
    g.add_argument("--source", metavar="PATH")
    sp.add_argument("--restrict-to", metavar="DIR",
                    help="forced-command mode: take the request from SSH_ORIGINAL_COMMAND and "
                         "refuse paths outside DIR")
    sp.add_argument("--write-only", action="store_true",
                    help="with --restrict-to: refuse to act as a source (no reads)")
    sp.add_argument("--append-only", action="store_true",
                    help="never prune a generation for a client (nor --no-compress)")
    _push_options(sp)
    # in a forced command --keep N is a floor: clients may ask to keep more, never less;
    # a frozen client must not hold an image's writer lock for hours
    sp.set_defaults(keep=None, timeout=600)

    sp = add("mount", cmd_mount,
             "Mount an image read-only: disk.raw, partitions/ and generations/.")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--foreground", "-f", action="store_true",
                    help="stay in the foreground and log to stderr")
    sp.add_argument("--generation", "-g", type=int, metavar="G",
                    help="show generation G at the top level (default: the newest)")
    sp.add_argument("--allow-other", action="store_true",
                    help="let other users read the mount (needs user_allow_other)")
    sp.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="SIZE",
                    help="decompressed-chunk cache (default 256M)")
    sp.add_argument("--verbose", "-v", action="store_true", help="log every error in detail")
    sp.add_argument("--log-file", metavar="FILE",
                    help="log to FILE (default: stderr with -f, else syslog)")

    sp = add("umount", cmd_umount, "Unmount a diskrsync mount (also a stale one).")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")

    sp = add("convert", cmd_convert,
             "Convert a Go diskrsync SPGZ0001 file into a diskrsync image.")
    sp.add_argument("old", metavar="OLD.spgz")
    sp.add_argument("new", metavar="NEW.spgz")
    sp.add_argument("--chunk-size", type=parse_size, default=128 * 1024, metavar="N",
                    help="chunk size of the new image (default 128K)")

    for extra in _EXTRA_COMMANDS:
        extra(sub, add)
    return p


# Commands defined in other modules register here (push, serve, mount, ...).
_EXTRA_COMMANDS: list[Callable[..., None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from diskrsync.legacy_cmd import looks_like_go_remote

    if looks_like_go_remote(argv):
        # started by an original Go diskrsync client as `CMD --target|--source ... PATH`
        from diskrsync.legacy_cmd import go_remote_main

        return _run(lambda: go_remote_main(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    return _run(lambda: int(args.func(args)))


class Terminated(BaseException):
    """SIGTERM arrived: stop like on Ctrl-C (a push keeps a checkpoint), exit 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _run(func: Callable[[], int]) -> int:
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(func())
    except DiskrsyncError as e:
        print(f"diskrsync: {e.message}", file=sys.stderr)
        return e.exit_code
    except MemoryError:
        # a last line of defence: peer numbers are bounded before anything is allocated, but
        # a --max-size too large for this machine must still end in one line
        print("diskrsync: out of memory", file=sys.stderr)
        return LocalError.exit_code
    except KeyboardInterrupt:
        print("diskrsync: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("diskrsync: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `restore IMAGE - | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
