"""The read and maintenance commands on repository locations (``s3://...``, ``repo:DIR``,
with ``#DISK``): info, verify, restore, prune; and ``copy`` between an image and a
repository or two repositories. images.py hands a repository location here
(mounts.py mounts one itself: this module does not load the FUSE side)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

from diskrsync.base.errors import DataError, UsageError
from diskrsync.base.progress import Progress
from diskrsync.base.retention import Retention, Verdict, select
from diskrsync.base.units import human
from diskrsync.cli import jsonout
from diskrsync.cli.keys import kdf_params, keyring
from diskrsync.cli.requests import retention, s3_options
from diskrsync.compression import repomaint
from diskrsync.compression.container import open_image
from diskrsync.compression.image import Image
from diskrsync.compression.maintenance import restore
from diskrsync.compression.repocopy import copy_disk
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repolocation import (
    RepoLocation,
    open_repository,
    parse_repo_location,
)
from diskrsync.compression.repository import Repository
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions
from diskrsync.synccore.target import TargetOptions


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _open(loc: RepoLocation, args: argparse.Namespace, *, create: bool = False) -> Repository:
    """``loc``'s repository; with ``create`` (a copy into it) made when new, encrypted with
    ``--encrypt``."""
    encrypt = create and bool(getattr(args, "encrypt", False))
    return open_repository(loc, keyring=keyring(args), s3=s3_options(args), create=create,
                           encrypt=encrypt, kdf=kdf_params() if encrypt else None)


def _disks(repo: Repository, loc: RepoLocation) -> list[str]:
    if loc.disk is None:
        return repo.disks()
    if not repo.generations(loc.disk):
        raise UsageError(f"{loc.text}: the repository has no disk {loc.disk}")
    return [loc.disk]


# -- info ----------------------------------------------------------------------------------


def repo_info(loc: RepoLocation, args: argparse.Namespace) -> int:
    repo = _open(loc, args)
    disks: list[dict[str, Any]] = []
    for disk in _disks(repo, loc):
        gens = []
        for g in repo.generations(disk):
            m = repo.manifest(g)
            gens.append({"number": m.number, "time": m.time, "size": m.size,
                         "root_hash": m.root.hex(), "source": m.source, "meta": m.meta})
        disks.append({"name": disk, "generations": gens})
    use = repomaint.usage(repo)
    cfg = repo.config
    info: dict[str, Any] = {
        "repository": loc.store, "disk": loc.disk, "id": cfg.id,
        "chunk_size": cfg.chunk_size, "pack_size": cfg.pack_size,
        "encrypted": cfg.encryption is not None, "disks": disks, "packs": use.packs,
        "stored_bytes": use.stored_bytes, "logical_bytes": use.logical_bytes,
        "ratio": round(use.logical_bytes / use.stored_bytes, 2) if use.stored_bytes else None}
    if args.json:
        jsonout.emit("info", info)
        return 0
    print(f"repository:   {loc.store} ({'encrypted' if info['encrypted'] else 'plain'})")
    print(f"chunk size:   {human(cfg.chunk_size)}")
    ratio = f", ratio {info['ratio']}" if info["ratio"] is not None else ""
    print(f"stored:       {human(use.stored_bytes)} in {use.packs} pack(s) for "
          f"{human(use.logical_bytes)} of chunks in every generation of every disk "
          f"(deduplicated and compressed{ratio})")
    if not disks:
        print("disks:        (none)")
    for d in disks:
        print(f"disk {d['name']}:")
        for g in d["generations"]:
            print(f"  {g['number']:>4}  {_when(g['time'])}  {human(g['size']):>10}  "
                  f"{g['root_hash'][:16]}  {g['source']}")
    return 0


# -- verify --------------------------------------------------------------------------------


def repo_verify(loc: RepoLocation, args: argparse.Namespace) -> int:
    if args.repair:
        raise UsageError("--repair is for images; a repository's objects are immutable (a "
                         "damaged pack is named by verify; push the disk again)")
    if args.generation is not None:
        raise UsageError("verify of a repository checks every generation (no --generation)")
    started = time.time()
    repo = _open(loc, args)
    report = repomaint.verify(repo, _disks(repo, loc))
    problems = [{"disk": d, "generation": n, "problems": why}
                for (d, n), why in sorted(report.affected.items())]
    if args.json:
        out = {"repository": loc.store, "disk": loc.disk, "ok": report.ok,
               "generations": report.generations, "packs": report.packs,
               "blobs": report.blobs, "affected": problems, "started": started,
               "duration": time.time() - started}
        jsonout.cap(out, "affected")
        jsonout.emit("verify", out)
    else:
        for p in problems:
            for why in p["problems"]:
                print(f"problem: disk {p['disk']} generation {p['generation']}: {why}")
        print(f"{loc.text}: {'ok' if report.ok else 'FAILED'} ({report.generations} "
              f"generation(s), {report.packs} pack(s), {report.blobs} blobs checked)")
    return 0 if report.ok else DataError.exit_code


# -- restore -------------------------------------------------------------------------------


def repo_restore(loc: RepoLocation, args: argparse.Namespace) -> int:
    disk = loc.need_disk("restore")
    started = time.time()
    repo = _open(loc, args)
    with repo.pin(disk, args.generation) as snap:
        number, size = snap.manifest.number, snap.size
        bar = Progress(size, "restore", not (args.quiet or args.json))
        try:
            restore(snap, args.dest, force=args.force, progress=bar.update)
        finally:
            bar.close()
    if args.json:
        jsonout.emit("restore", {"image": loc.text, "generation": number, "dest": args.dest,
                                 "size": size, "started": started,
                                 "duration": time.time() - started})
    return 0


# -- prune ---------------------------------------------------------------------------------


def repo_prune(loc: RepoLocation, args: argparse.Namespace) -> int:
    started = time.time()
    policy = retention(args)
    if policy is None:
        raise UsageError("prune needs at least one rule: --keep-last N, --keep-daily N, ... "
                         "(see `diskrsync prune --help`)")
    repo = _open(loc, args)
    verdicts: dict[str, list[Verdict]] = {}
    remove = []
    for disk in _disks(repo, loc):
        gens = repo.generations(disk)
        times = {g.key: repo.manifest(g).time for g in gens}
        verdicts[disk] = select([(g.number, times[g.key]) for g in gens], policy)
        gone = {v.number for v in verdicts[disk] if not v.kept}
        remove += [g for g in gens if g.number in gone]
    bar = Progress(0, "prune", not args.json)
    try:
        report = repomaint.prune(repo, remove, dry_run=args.dry_run, progress=bar)
    finally:
        bar.close()
    pruned = {d: [v.number for v in vs if not v.kept] for d, vs in verdicts.items()}
    kept = {d: [v.number for v in vs if v.kept] for d, vs in verdicts.items()}
    if args.json:
        jsonout.emit("prune", {
            "repository": loc.store, "disk": loc.disk, "rules": policy.describe(),
            "dry_run": args.dry_run, "pruned": pruned, "kept": kept,
            "repacked_packs": report.repacked, "repacked_bytes": report.repacked_bytes,
            "condemned_packs": report.condemned, "condemned_bytes": report.condemned_bytes,
            "deleted_packs": report.deleted, "deleted_bytes": report.deleted_bytes,
            "waiting_packs": report.waiting, "waiting_bytes": report.waiting_bytes,
            "started": started, "duration": time.time() - started})
        return 0
    would = "would " if args.dry_run else ""
    for disk, vs in verdicts.items():
        for v in reversed(vs):
            if args.dry_run:
                why = ", ".join(v.reasons) if v.kept else "no rule keeps it"
                print(f"{'keep ' if v.kept else 'prune'} {disk} {v.number:>5}  "
                      f"{_when(v.time)}  {why}")
        if pruned[disk]:
            print(f"disk {disk}: {would}prune generation(s) "
                  f"{', '.join(map(str, pruned[disk]))}")
    if not any(pruned.values()):
        print(f"{'dry run: ' if args.dry_run else ''}no generation to prune")
    print(f"packs: {would}repack {report.repacked} ({human(report.repacked_bytes)} live), "
          f"{would}condemn {report.condemned} ({human(report.condemned_bytes)}), "
          f"{would}delete {report.deleted} ({human(report.deleted_bytes)}) condemned earlier; "
          f"{report.waiting} ({human(report.waiting_bytes)}) wait for the grace period or "
          f"readers")
    return 0


# -- copy ----------------------------------------------------------------------------------


def _image_generations(path: str, args: argparse.Namespace) -> Iterator[Any]:
    img = open_image(path, keyring=keyring(args))
    try:
        if not isinstance(img, Image):
            snap = img.snapshot(None)
            try:
                yield snap
            finally:
                snap.close()
            return
        for g in img.generations():
            snap = img.snapshot(g.number)
            try:
                yield snap
            finally:
                snap.close()
    finally:
        img.close()


def cmd_copy(args: argparse.Namespace) -> int:
    started = time.time()
    src, dst = parse_repo_location(args.src), parse_repo_location(args.dst)
    if src is None and dst is None:
        raise UsageError("copy needs a repository disk on at least one side (s3://BUCKET/"
                         "PREFIX#DISK or repo:DIR#DISK); between two images use push")
    bar = Progress(0, "copy", not (args.quiet or args.json))
    try:
        if dst is None:
            assert src is not None
            if args.encrypt:
                raise UsageError("copy --encrypt makes a new encrypted repository; to get an "
                                 "encrypted image, push --encrypt into a new image")
            copied, skipped, sent = _copy_to_image(src, args.dst, args)
        elif src is not None:
            disk = src.need_disk("copy")
            source = _open(src, args)
            target = _open(dst, args, create=True)
            report = copy_disk(source, target, disk, dst_disk=dst.disk,
                               progress=bar.update)
            copied, skipped, sent = report.copied, report.skipped, report.bytes_sent
        else:
            copied, skipped, sent = _copy_image(args.src, dst, args, bar)
    finally:
        bar.close()
    out = {"src": args.src, "dst": args.dst, "copied": copied, "skipped": skipped,
           "bytes_sent": sent, "started": started, "duration": time.time() - started}
    if args.json:
        jsonout.emit("copy", out)
    elif not args.quiet:
        print(f"copied {len(copied)} generation(s) into {args.dst}"
              + (f" (now {', '.join(map(str, copied))})" if copied else "")
              + (f", {skipped} already there" if skipped else "")
              + f": {human(sent)} sent")
    return 0


def _copy_to_image(src: RepoLocation, path: str, args: argparse.Namespace
                   ) -> tuple[list[int], int, int]:
    """Every generation of the repository disk ``src``, oldest first, pushed into the image
    at ``path`` (created with the repository's chunk size) as a generation of its own; one
    whose root the image holds already is skipped (a plain repository's roots are an image's
    roots for the same bytes and chunk size). The image's generations are dated by the copy
    and keep the source's name."""
    disk = src.need_disk("copy")
    repo = _open(src, args)
    ring = keyring(args)
    have: set[bytes] = set()
    if os.path.exists(path):
        img = open_image(path, keyring=ring)
        try:
            have = {g.root_hash for g in img.generations()}
            kept = len(img.generations())
        finally:
            img.close()
    else:
        kept = 0
    gens = [repo.manifest(g) for g in repo.generations(disk)]
    if not gens:
        raise UsageError(f"{src.text}: the repository has no disk {disk}")
    copied: list[int] = []
    skipped = sent = 0
    keep = Retention(last=kept + len(gens))  # the copy prunes nothing the image had
    for m in gens:
        if m.root in have:
            skipped += 1
            continue
        req = PushRequest(source=SourceOptions(chunk_size=repo.config.chunk_size,
                                               keyring=ring, label=m.source or src.text),
                          target=TargetOptions(keep=keep, always_new_generation=True),
                          generation=m.number, s3=s3_options(args))
        stats = local_push(f"{src.text}", path, req)
        if stats.generation is not None:
            copied.append(stats.generation)
        sent += stats.bytes_sent
        have.add(m.root)
    return copied, skipped, sent


def _copy_image(path: str, dst: RepoLocation, args: argparse.Namespace,
                bar: Progress) -> tuple[list[int], int, int]:
    """Every generation of the image at ``path``, oldest first, into the repository disk
    ``dst``; one that the disk holds already (same root and source time) is skipped."""
    if parse_repo_location(path) is None and not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    disk = dst.need_disk("copy")
    repo = _open(dst, args, create=True)  # an encrypted one: chunks sealed as they go in
    done = {str(repo.manifest(g).meta.get("copy_of")) for g in repo.generations(disk)}
    copied: list[int] = []
    skipped = sent = 0
    for snap in _image_generations(path, args):
        info = snap.info
        tag = f"image:{info.root_hash.hex()}:{info.commit_time}"
        if tag in done:
            skipped += 1
            continue
        m, stats = write_disk(repo, disk, snap.read, snap.size, source=info.source,
                              meta={**info.meta, "copy_of": tag}, progress=bar.update,
                              now=lambda t=info.commit_time: t)
        copied.append(m.number)
        sent += stats["bytes_stored"]
        done.add(tag)
    return copied, skipped, sent
