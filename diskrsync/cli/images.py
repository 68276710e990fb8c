"""Commands on images: info, verify, restore, prune, convert."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from diskrsync.base.errors import EXIT_REDUNDANCY_LOST, DataError, UsageError
from diskrsync.base.progress import Progress
from diskrsync.base.units import human
from diskrsync.cli import jsonout, repos
from diskrsync.cli.keys import kdf_params, keyring, optional_keyring
from diskrsync.cli.requests import retention
from diskrsync.compression.container import open_image, sniff
from diskrsync.compression.convert import convert
from diskrsync.compression.image import Image, fsync_dir, remove_stale_temps, temp_name
from diskrsync.compression.maintenance import image_info, restore, verify, verify_chunks
from diskrsync.compression.repolocation import parse_repo_location
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions
from diskrsync.synccore.target import TargetOptions


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def cmd_info(args: argparse.Namespace) -> int:
    loc = parse_repo_location(args.image)
    if loc is not None:
        return repos.repo_info(loc, args)
    img = open_image(args.image, keyring=None if args.no_key else optional_keyring(args))
    try:
        info = image_info(img)
    finally:
        img.close()
    if args.json:
        jsonout.emit("info", info)
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
        if meta.get("checks"):
            print(f"        unchanged by {meta['checks']} later push(es), the last at "
                  f"{_when(meta.get('last_checked') or 0)}")
        if meta.get("source_changed_chunks"):
            print(f"        warning: the source changed during this push "
                  f"({meta['source_changed_chunks']} chunk(s) differ from the scan)")
        if meta.get("read_errors"):
            ranges = ", ".join(f"{o}+{n}" for o, n in meta["read_errors"][:10])
            print(f"        warning: {len(meta['read_errors'])} unreadable range(s) stored as "
                  f"zeros: {ranges}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    loc = parse_repo_location(args.image)
    if loc is not None:
        return repos.repo_verify(loc, args)
    # opened even when the newest commit may be lost: verify names it, --repair accepts it
    started = time.time()
    img = open_image(args.image, accept_loss=True,
                     keyring=None if args.no_key else optional_keyring(args))
    repaired: list[str] = []
    try:
        if args.repair:
            if not isinstance(img, Image):
                raise UsageError(f"{args.image}: --repair works on diskrsync images only")
            for line in img.repair():
                repaired.append(line)
                print(f"repair: {line}", file=sys.stderr)
            img.refresh()
        bar = Progress(verify_chunks(img, args.generation), "verify", not args.json,
                       unit="chunks")
        try:
            report = verify(img, args.generation, progress=bar.update)
        finally:
            bar.close()
    finally:
        img.close()
    if args.json:
        out = {"path": args.image, "generation": args.generation, "started": started,
               "duration": time.time() - started, "ok": report.ok,
               "problems": report.problems, "warnings": report.warnings,
               "bad_chunks": report.bad_chunks, "chunks_checked": report.chunks_checked,
               "repaired": repaired, "contents_checked": not report.unchecked}
        jsonout.cap(out, "problems")
        jsonout.cap(out, "bad_chunks")
        jsonout.emit("verify", out)
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
        if report.unchecked:
            print(f"note: {report.unchecked}", file=sys.stderr)
        state = "ok" if report.ok else "FAILED"
        if report.ok and report.warnings:
            state = "ok, but a metadata copy is damaged (`verify --repair` rewrites it)"
        print(f"{args.image}: {state} ({report.chunks_checked} stored chunks checked)")
    if not report.ok:
        return DataError.exit_code  # damage found: the same code as any data error
    return EXIT_REDUNDANCY_LOST if report.warnings else 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.dest == "-" and sys.stdout.isatty() and not args.force:
        # as zstd does: a disk's bytes on a terminal help nobody and may upset it
        raise UsageError("refusing to write a disk to a terminal: redirect stdout (`> FILE`, "
                         "`| CMD`), or pass --force")
    if args.json and args.dest == "-":
        raise UsageError("--json prints on stdout, where DEST - writes the disk: restore to a "
                         "file or device, or drop --json")
    loc = parse_repo_location(args.image)
    if loc is not None:
        return repos.repo_restore(loc, args)
    started = time.time()
    img = open_image(args.image, keyring=keyring(args))
    try:
        snap = img.snapshot(args.generation)
        try:
            number, size = snap.info.number, snap.size
            # on stderr, also while the disk goes to stdout (`restore IMAGE - | ssh ...`)
            bar = Progress(size, "restore", not (args.quiet or args.json))
            try:
                restore(snap, args.dest, force=args.force, progress=bar.update)
            finally:
                bar.close()
        finally:
            snap.close()
    finally:
        img.close()
    if args.json:
        jsonout.emit("restore", {"image": args.image, "generation": number, "dest": args.dest,
                                 "size": size, "started": started,
                                 "duration": time.time() - started})
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    loc = parse_repo_location(args.image)
    if loc is not None:
        return repos.repo_prune(loc, args)
    started = time.time()
    policy = retention(args)
    if policy is None:
        raise UsageError("prune needs at least one rule: --keep-last N, --keep-daily N, ... "
                         "(see `diskrsync prune --help`)")
    img = open_image(args.image)
    try:
        if not isinstance(img, Image):
            raise UsageError(f"{args.image} is an SPGZ0001 file: it has one generation only")
        if args.dry_run:
            verdicts = img.verdicts(policy)
            pruned = [v.number for v in verdicts if not v.kept]
            kept = [v.number for v in verdicts if v.kept]
        else:
            pruned = img.prune(policy)
            img.refresh()
            kept = [g.number for g in img.generations()]
    finally:
        img.close()
    if args.json:
        jsonout.emit("prune", {"image": args.image, "rules": policy.describe(),
                               "dry_run": args.dry_run, "pruned": pruned, "kept": kept,
                               "started": started, "duration": time.time() - started})
        return 0
    if args.dry_run:
        # newest first, with every rule that keeps each one (local time: the rules' time)
        for v in reversed(verdicts):
            when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(v.time))
            why = ", ".join(v.reasons) if v.kept else "no rule keeps it"
            print(f"{'keep ' if v.kept else 'prune'} {v.number:>5}  {when}  {why}")
        print(f"dry run: would prune generation(s) {', '.join(map(str, pruned))}" if pruned
              else "dry run: nothing to prune")
        return 0
    if pruned:
        print(f"pruned generation(s) {', '.join(map(str, pruned))}")
    else:
        print("nothing to prune")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    started = time.time()
    old, new = args.old, args.new
    if args.encrypt:
        return _convert_encrypted(args)
    size = os.path.getsize(old) if os.path.isfile(old) else 0
    bar = Progress(size, "convert", not args.json)
    try:
        gen = convert(old, new, chunk_size=args.chunk_size, progress=bar.update,
                      log=lambda m: print(f"diskrsync: {m}", file=sys.stderr))
    finally:
        bar.close()
    if args.json:
        jsonout.emit("convert", {"old": old, "new": new, "generation": gen.number,
                                 "size": gen.size, "chunk_size": args.chunk_size,
                                 "started": started, "duration": time.time() - started})
    else:
        print(f"converted {old} into {new}: generation {gen.number}, {human(gen.size)}")
    return 0


def _convert_encrypted(args: argparse.Namespace) -> int:
    """Every retained generation of OLD (an image, or an SPGZ0001 file's one), oldest
    first, pushed into a new encrypted image built under a temporary name and linked to NEW
    when complete."""
    old, new = args.old, args.new
    if not os.path.isfile(old) or sniff(old) is None:
        raise UsageError(f"{old} is not a diskrsync image or SPGZ0001 file")
    if os.path.lexists(new):
        raise UsageError(f"{new} already exists; refusing to overwrite it")
    ring = keyring(args)
    src = open_image(old, keyring=ring)
    try:
        numbers = [g.number for g in src.generations()] if isinstance(src, Image) else [None]
    finally:
        src.close()
    if not numbers:
        raise UsageError(f"{old} has no generation to convert")
    remove_stale_temps(new)
    temp = temp_name(new, "convert")
    started = time.time()
    try:
        for i, number in enumerate(numbers):
            opts = SourceOptions(chunk_size=args.chunk_size, keyring=ring, encrypt=i == 0,
                                 kdf=kdf_params())
            req = PushRequest(source=opts, target=TargetOptions(keep=len(numbers)),
                              generation=number)
            stats = local_push(old, temp, req)
            if not args.json:
                print(f"generation {number or 1} of {old}: "
                      f"{human(stats.chunk_bytes_differing)} encrypted", file=sys.stderr)
        try:
            os.link(temp, new)  # never over a NEW that appeared meanwhile
            fsync_dir(new)
        except FileExistsError:
            raise UsageError(f"{new} already exists; refusing to overwrite it") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    if args.json:
        jsonout.emit("convert", {"old": old, "new": new, "generation": stats.generation,
                                 "generations": len(numbers), "encrypted": True,
                                 "size": stats.size, "chunk_size": stats.chunk_size,
                                 "started": started, "duration": time.time() - started})
    else:
        print(f"converted {old} into the encrypted image {new}: {len(numbers)} generation(s)")
    return 0
