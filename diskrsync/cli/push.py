"""The push command (local, remote over SSH, or with a Go diskrsync) and its summary."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from dataclasses import asdict
from typing import Any

from diskrsync.base.errors import (
    EXIT_READ_ERRORS_IGNORED,
    EXIT_SOURCE_CHANGED,
    DiskrsyncError,
    UsageError,
)
from diskrsync.base.progress import Progress
from diskrsync.base.units import human
from diskrsync.cli.requests import push_request
from diskrsync.compression.nbd import is_nbd_url
from diskrsync.compression.sources import open_source
from diskrsync.synccore.location import LocalPath, parse_location
from diskrsync.synccore.push import local_push


def _push_summary(stats: Any, args: argparse.Namespace) -> int:

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
    req = push_request(args)
    if (req.dirty_bitmap or req.qmp) and (args.legacy or not is_nbd_url(args.src)):
        raise UsageError("--dirty-bitmap and --qmp need an NBD source (nbd://... or "
                         "nbd+unix:///EXPORT?socket=PATH) and diskrsync's own protocol")
    src, dst = parse_location(args.src), parse_location(args.dst)
    if not (isinstance(src, LocalPath) and isinstance(dst, LocalPath)) or args.legacy:
        # the SSH stack (paramiko, ~0.1 s to import) is loaded only for a remote end
        remote = importlib.import_module("diskrsync.cli.remote")
        return _push_summary(remote.push(src, dst, req, args), args)
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
