"""Command line: argument parsing, progress and exit codes (errors become exit codes only here)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from diskrsync import __version__
from diskrsync.errors import DiskrsyncError, UsageError

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'128K', '256M', '1G' or plain bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and t[-1:] else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128K, 256M)") from None


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

    def update(self, n: int) -> None:
        if self.bar is not None:
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
    print(f"stored:       {human(info['stored_bytes'])} (ratio {info['ratio']})")
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
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from diskrsync.compression.container import open_image
    from diskrsync.compression.maintenance import verify

    img = open_image(args.image)
    try:
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
            gen = f"generation {b['generation']} " if "generation" in b else ""
            print(f"bad chunk: {gen}chunk {b['chunk']} at offset {b['offset']}: {b['problem']}")
        state = "ok" if report.ok else "FAILED"
        print(f"{args.image}: {state} ({report.chunks_checked} stored chunks checked)")
    return 0 if report.ok else 6


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


# -- parser ----------------------------------------------------------------------------


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

    sp = add("restore", cmd_restore,
             "Write a generation of an image to a file (sparse), a device, or - (stdout).")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--generation", "-g", type=int, metavar="G", help="default: the newest")
    sp.add_argument("--force", action="store_true", help="overwrite a non-empty DEST file")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    sp = add("prune", cmd_prune, "Keep only the newest N generations of an image.")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--keep", type=int, required=True, metavar="N")

    for extra in _EXTRA_COMMANDS:
        extra(sub, add)
    return p


# Commands defined in other modules register here (push, serve, mount, ...).
_EXTRA_COMMANDS: list[Callable[..., None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DiskrsyncError as e:
        print(f"diskrsync: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("diskrsync: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `restore IMAGE - | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
