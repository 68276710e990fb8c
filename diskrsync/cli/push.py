"""The push command (local, remote over SSH, or with a Go diskrsync) and its summary."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
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
from diskrsync.cli import jsonout
from diskrsync.cli.keys import LOSS_WARNING, REPO_LOSS_WARNING
from diskrsync.cli.requests import push_request
from diskrsync.compression.nbd import is_nbd_url
from diskrsync.compression.repolocation import is_repo_location
from diskrsync.compression.sources import open_source
from diskrsync.synccore.location import LocalPath, RemotePath, parse_location
from diskrsync.synccore.push import local_push


def _push_summary(stats: Any, args: argparse.Namespace, started: float) -> int:

    warnings = stats.warnings
    if getattr(args, "encrypt", False) and stats.generation == 1:
        warnings.append(REPO_LOSS_WARNING if is_repo_location(args.dst) else LOSS_WARNING)
    asked = getattr(args, "chunk_size", None)
    # (a Go target's block size is not a chunk size: --legacy is not compared)
    if asked and stats.chunk_size and asked != stats.chunk_size and not args.legacy:
        stats.chunk_size_ignored = True
        warnings.append(f"--chunk-size {human(asked)} is ignored: {args.dst} has "
                        f"{human(stats.chunk_size)} chunks (fixed when it was created; push "
                        f"into a new image for another chunk size)")
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
        out = {"src": args.src, "dst": args.dst, "started": started, **asdict(stats)}
        for name in ("differing_ranges", "source_changed_chunks", "read_errors"):
            jsonout.cap(out, name)
        jsonout.emit("push", out)
    elif not args.quiet:
        if stats.dry_run:
            print(f"dry run: {stats.chunks_differing} of {stats.chunks} chunks differ "
                  f"({human(stats.chunk_bytes_differing)} would move before compression)")
            _ranges(stats)
            print(f"source root: {stats.root_hash}")
            print(f"target root: {stats.target_root_hash}")
        else:
            if stats.unchanged and is_repo_location(args.dst):
                what = (f"unchanged: generation {stats.generation} is still current (no new "
                        f"generation)")
            elif stats.unchanged:
                what = (f"unchanged: generation {stats.generation} is still current (this run "
                        f"is recorded in it, no new generation)")
            elif stats.generation:
                what = f"generation {stats.generation}"
            elif args.legacy and isinstance(parse_location(args.dst), RemotePath):
                # a Go target makes no generations: say what it holds now
                what = f"{'created' if stats.created else 'updated'} {args.dst} (Go diskrsync)"
            else:
                what = "created" if stats.created else "updated in place"
            root = f", root {stats.root_hash[:16]}…" if stats.root_hash else ""
            print(f"{what}{root}: {stats.chunks_differing} of {stats.chunks} chunks differed, "
                  f"{human(stats.bytes_sent)} sent in {stats.duration:.1f} s")
            if stats.pruned:
                print(f"pruned generation(s) {', '.join(map(str, stats.pruned))}")
            if args.verbose:
                _ranges(stats)
        if args.verbose:
            _details(stats, args)
    for w in warnings:
        print(f"diskrsync: warning: {w}", file=sys.stderr)
    if stats.source_changed_chunks:
        return EXIT_SOURCE_CHANGED
    if stats.read_errors:
        return EXIT_READ_ERRORS_IGNORED
    return 0


def _ranges(stats: Any, limit: int = 50) -> None:
    for off, n in stats.differing_ranges[:limit]:
        print(f"  differs: bytes {off}-{off + n - 1}")
    if len(stats.differing_ranges) > limit:
        print(f"  ... {len(stats.differing_ranges) - limit} more ranges")


def _details(stats: Any, args: argparse.Namespace) -> None:
    """``push -v``: what each end did and where the time went."""
    # phases: this process ran the source end; a pull knows the target's side only
    here = bool(stats.phases)
    zeros = f", {stats.zero_chunks} all zeros" if here else ""
    print(f"source:   {args.src}: {human(stats.size)}, {stats.chunks} chunks of "
          f"{human(stats.chunk_size)}{zeros}")
    if here:
        print(f"read:     {human(stats.bytes_read)} read, {human(stats.bytes_hashed)} hashed")
    pages = (f"{stats.pages_compared} index pages, {stats.pages_differing} differed; "
             if here else "")
    print(f"compared: {pages}{stats.chunks_differing} chunks "
          f"({human(stats.chunk_bytes_differing)}) differed")
    print(f"wire:     {human(stats.bytes_sent)} sent, {human(stats.bytes_received)} received"
          + (" (resumed from a checkpoint)" if stats.resumed else ""))
    t = stats.target
    did = [f"wrote {t['chunks_written']} chunks"] if "chunks_written" in t else []
    if stats.dry_run:
        did.append("committed nothing (dry run)")
    elif stats.generation:
        did.append(f"committed generation {stats.generation}")
    else:
        did.append("flushed the raw target")
    if "commit_seconds" in t:
        did[-1] += f" in {t['commit_seconds']:.2f} s"
    print(f"target:   {t.get('path', args.dst)}: {', '.join(did)}")
    if stats.phases:
        print("phases:   " + ", ".join(f"{k} {v:.2f} s" for k, v in stats.phases.items()))


def cmd_push(args: argparse.Namespace) -> int:
    started = time.time()
    req = push_request(args)
    if (req.dirty_bitmap or req.qmp) and (args.legacy or not is_nbd_url(args.src)):
        raise UsageError("--dirty-bitmap and --qmp need an NBD source (nbd://... or "
                         "nbd+unix:///EXPORT?socket=PATH) and diskrsync's own protocol")
    if args.legacy and req.bwlimit:
        raise UsageError("--bwlimit works with the native protocol only, not with --legacy")
    src, dst = parse_location(args.src), parse_location(args.dst)
    if not (isinstance(src, LocalPath) and isinstance(dst, LocalPath)) or args.legacy:
        # the SSH stack (paramiko, ~0.1 s to import) is loaded only for a remote end
        remote = importlib.import_module("diskrsync.cli.remote")
        return _push_summary(remote.push(src, dst, req, args), args, started)
    total = 0
    if not args.quiet and not args.json and sys.stderr.isatty():
        with contextlib.suppress(DiskrsyncError):
            r = open_source(args.src, args.generation, req.source.keyring)
            total = r.size
            r.close()
    bar = Progress(total, "push", bool(total))
    try:
        stats = local_push(args.src, args.dst, req, progress=bar.update)
    finally:
        bar.close()
    return _push_summary(stats, args, started)
