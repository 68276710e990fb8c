"""Repository maintenance: verify, usage figures, and garbage collection (prune).

docs/repository.md specifies both: verify reads every pack a generation needs and checks
every blob (naming the disks and generations a missing or damaged pack affects); prune
deletes manifests, marks what the remaining generations reach, repacks partly used packs,
rewrites the index, condemns what nothing reaches, and deletes only packs condemned longer
than the grace period ago that no reader older than their condemnation may still read.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import blake3

from diskrsync.base.errors import DataError, DiskrsyncError, ObjectMissing
from diskrsync.base.merkle import HASH_SIZE, node_hash_packed
from diskrsync.compression.codec import ChunkAt
from diskrsync.compression.repository import (
    CHUNK,
    GRACE,
    LEASE,
    PAGE,
    GenerationInfo,
    Lease,
    Loc,
    Packer,
    Repository,
    RepoSnapshot,
    list_locks,
    pack_key,
    write_index,
)

REPACK_BELOW = 0.8  # a pack whose dead bytes exceed 1 - this of the pack size is rewritten


@dataclass
class VerifyReport:
    generations: int = 0
    packs: int = 0
    blobs: int = 0
    #: what is wrong with each affected generation, by (disk, number)
    affected: dict[tuple[str, int], list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.affected


def _check_blob(repo: Repository, bid: bytes, loc: Loc, stored: bytes) -> str | None:
    """None when the stored bytes are the blob, else why not."""
    try:
        data = repo.codec.decode(loc.kind, stored, loc.length, ChunkAt(0, bid))
    except ValueError as e:
        return f"{e}"
    good = (node_hash_packed(data) if loc.type == PAGE else repo.codec.leaf_hash(data, 0))
    return None if good == bid else "content hash mismatch"


def verify(repo: Repository, disks: list[str] | None = None, *, workers: int = 4
           ) -> VerifyReport:
    """Check every generation of ``disks`` (all by default): manifests, trees, and every
    blob they need, read from its pack and checked against its id."""
    report = VerifyReport()
    needed: dict[bytes, list[tuple[str, int]]] = {}

    def bad(gen: tuple[str, int], why: str) -> None:
        report.affected.setdefault(gen, []).append(why)

    for disk in disks if disks is not None else repo.disks():
        for info in repo.generations(disk):
            gen = (disk, info.number)
            report.generations += 1
            try:
                ids = RepoSnapshot(repo, repo.manifest(info)).blob_ids()
            except DiskrsyncError as e:
                bad(gen, e.message)
                continue
            for bid in ids:
                needed.setdefault(bid, []).append(gen)
    index = repo.index()
    by_pack: dict[bytes, list[tuple[bytes, Loc]]] = {}
    for bid, gens in needed.items():
        loc = index.get(bid)
        if loc is None:
            for gen in gens:
                bad(gen, f"blob {bid.hex()[:16]}… is in no pack")
            continue
        by_pack.setdefault(loc.pack, []).append((bid, loc))

    def check_pack(item: tuple[bytes, list[tuple[bytes, Loc]]]) -> list[tuple[bytes, str]]:
        pack, blobs = item
        name = f"pack {pack.hex()[:16]}…"
        try:
            data = repo.store.get(pack_key(pack))
        except ObjectMissing:
            return [(bid, f"{name} is missing") for bid, _ in blobs]
        except DataError as e:
            return [(bid, f"{name}: {e.message}") for bid, _ in blobs]
        damaged = blake3.blake3(data).digest() != pack
        out = []
        for bid, loc in blobs:
            why = (f"{name} is too short" if loc.offset + loc.stored > len(data) else
                   _check_blob(repo, bid, loc, data[loc.offset : loc.offset + loc.stored]))
            if why is not None:
                out.append((bid, f"{name}{' (damaged)' if damaged else ''}: "
                                 f"{'page' if loc.type == PAGE else 'chunk'} "
                                 f"{bid.hex()[:16]}…: {why}"))
        return out

    with ThreadPoolExecutor(workers) as pool:
        for problems in pool.map(check_pack, by_pack.items()):
            for bid, why in problems:
                for gen in needed[bid]:
                    bad(gen, why)
    report.packs = len(by_pack)
    report.blobs = len(needed)
    return report


# -- garbage collection ------------------------------------------------------------------------


@dataclass
class PruneReport:
    dry_run: bool
    removed: list[tuple[str, int]] = field(default_factory=list)
    repacked: int = 0  # packs rewritten
    repacked_bytes: int = 0  # live bytes copied into new packs
    condemned: int = 0  # packs condemned by this run
    condemned_bytes: int = 0
    deleted: int = 0  # packs deleted by this run (condemned long enough ago)
    deleted_bytes: int = 0
    waiting: int = 0  # condemned packs left for a later prune (grace period, readers)
    waiting_bytes: int = 0


def _condemned(repo: Repository) -> list[tuple[str, float, list[bytes]]]:
    out = []
    for obj in repo.store.list("condemned/"):
        doc = json.loads(repo.unframe(obj.key, repo.store.get(obj.key), obj.key))
        out.append((obj.key, float(doc["time"]), [bytes.fromhex(p) for p in doc["packs"]]))
    return out


def _write_condemned(repo: Repository, when: float, packs: list[bytes]) -> None:
    key = f"condemned/{int(when):012d}-{os.urandom(8).hex()}"
    body = json.dumps({"time": when, "packs": sorted(p.hex() for p in packs)}).encode()
    repo.store.put(key, repo.frame(key, body))


def _pack_sizes(repo: Repository) -> dict[bytes, int]:
    out = {}
    for o in repo.store.list("packs/"):
        name = o.key.rsplit("/", 1)[1]
        if re.fullmatch("[0-9a-f]{64}", name) and o.key == f"packs/{name[:2]}/{name}":
            out[bytes.fromhex(name)] = o.size
    return out


class StageProgress(Protocol):
    """Where a command of several long steps reports them (base.progress.Progress)."""

    def stage(self, desc: str, total: int, unit: str = "B") -> None: ...
    def update(self, n: int, sent: int | None = None) -> None: ...


class _Silent:
    def stage(self, desc: str, total: int, unit: str = "B") -> None:
        pass

    def update(self, n: int, sent: int | None = None) -> None:
        pass


def prune(repo: Repository, remove: list[GenerationInfo], *, dry_run: bool = False,
          grace: float = GRACE, repack_below: float = REPACK_BELOW, lease: float = LEASE,
          now: Callable[[], float] = time.time,
          progress: StageProgress | None = None) -> PruneReport:
    """Remove the generations ``remove`` and collect garbage (docs/repository.md, Garbage
    collection). ``dry_run``: change nothing, say what would be freed. ``progress`` hears
    the three steps that grow with the repository: marking (generations), repacking
    (bytes read and written again), deleting (packs)."""
    report = PruneReport(dry_run, [(g.disk, g.number) for g in remove])
    held = None if dry_run else Lease(repo.store, "prune", None, lease=lease).acquire()
    try:
        _prune(repo, remove, report, grace, repack_below, now, progress or _Silent())
    finally:
        if held is not None:
            held.release()
    return report


def _prune(repo: Repository, remove: list[GenerationInfo], report: PruneReport, grace: float,
           repack_below: float, now: Callable[[], float], progress: StageProgress) -> None:
    dry = report.dry_run
    gone = {g.key for g in remove}
    if not dry:
        for g in remove:
            repo.store.delete(g.key)  # a crash after this: the next prune collects
    # 1. mark; an unreadable generation stops the prune: a partial mark would delete data
    live: set[bytes] = set()
    marking = [info for disk in repo.disks() for info in repo.generations(disk)
               if info.key not in gone]
    progress.stage("prune: marking", len(marking), "generations")
    for info in marking:
        live |= RepoSnapshot(repo, repo.manifest(info)).blob_ids()
        progress.update(1)
    index = repo.index()
    missing = [bid for bid in live if bid not in index]
    if missing:
        raise DataError(f"{len(missing)} blobs that generations need are in no pack: run "
                        f"verify; nothing was pruned")
    sizes = _pack_sizes(repo)
    live_bytes: dict[bytes, int] = {}
    for bid in live:
        loc = index[bid]
        live_bytes[loc.pack] = live_bytes.get(loc.pack, 0) + loc.stored
    earlier = _condemned(repo)
    already = {p for _k, _t, packs in earlier for p in packs}
    dead = [p for p in sizes if p not in live_bytes and p not in already]
    # dead bytes measured against the pack size target, not the pack: a small pack (a push's
    # last) is not rewritten by every prune for its trailer's sake
    slack = (1 - repack_below) * repo.config.pack_size
    sparse = [p for p, n in live_bytes.items() if p in sizes and sizes[p] - n > slack]
    # 2. repack: live blobs of sparse packs move, as stored, into new packs
    report.repacked = len(sparse)
    report.repacked_bytes = sum(live_bytes[p] for p in sparse)
    old_index_keys = [o.key for o in repo.store.list("index/")]
    if not dry and sparse:
        moving = [bid for bid in live if index[bid].pack in set(sparse)]
        progress.stage("prune: repacking", report.repacked_bytes)
        packer = Packer(repo)
        try:
            for start in range(0, len(moving), 256):
                batch = moving[start : start + 256]
                stored = repo.read_blobs(batch, what=lambda b: "repacking")
                for bid in batch:
                    loc = index[bid]
                    packer.append(bid, loc.type, loc.kind, loc.length, stored[bid])
                    progress.update(loc.stored)
            packer.finish()
        finally:
            packer.close()
    # 3. the index: live blobs only, written before the old index objects go
    if not dry:
        index = repo.index()
        sizes.update(_pack_sizes(repo))  # the new packs' lengths too
        by_pack: dict[bytes, list[tuple[bytes, Loc]]] = {}
        for bid in live:
            by_pack.setdefault(index[bid].pack, []).append((bid, index[bid]))
        packs = sorted(by_pack.items())
        written = set()
        for start in range(0, len(packs), 64):
            group = [(p, sizes[p], entries) for p, entries in packs[start : start + 64]]
            written.add(write_index(repo, group))
        for key in old_index_keys:
            if key not in written:
                repo.store.delete(key)
    # 4. condemn: nothing reaches them now; deleted by a later prune
    condemned = dead + sparse
    report.condemned = len(condemned)
    report.condemned_bytes = sum(sizes[p] for p in condemned)
    t = now()
    if not dry and condemned:
        _write_condemned(repo, t, condemned)
    # 5. sweep what earlier prunes condemned
    locks = [lock for lock in list_locks(repo.store) if not lock.stale(t)
             and lock.kind == "read"]
    still_live = set(live_bytes) - set(sparse)
    progress.stage("prune: deleting", sum(len(packs_) for _k, _w, packs_ in earlier), "packs")
    for key, when, packs_ in earlier:
        keep = []
        for p in packs_:
            progress.update(1)
            if p in still_live or p not in sizes:
                continue  # alive again (a push reused it), or already gone
            if when > t - grace or any(lock.created < when for lock in locks):
                keep.append(p)
                report.waiting += 1
                report.waiting_bytes += sizes[p]
                continue
            report.deleted += 1
            report.deleted_bytes += sizes[p]
            if not dry:
                repo.store.delete(pack_key(p))
        if not dry and keep != packs_:
            if keep:
                _write_condemned(repo, when, keep)
            repo.store.delete(key)


@dataclass
class Usage:
    disks: int
    generations: int
    packs: int
    stored_bytes: int  # what the packs occupy
    #: the bytes of every generation's non-zero chunks, as if each were stored on its own
    #: (uncompressed): what deduplication and compression save against
    logical_bytes: int


def usage(repo: Repository) -> Usage:
    packs = list(repo.store.list("packs/"))
    gens = 0
    logical = 0
    disks = repo.disks()
    index = repo.index()
    for disk in disks:
        for info in repo.generations(disk):
            gens += 1
            snap = RepoSnapshot(repo, repo.manifest(info))
            leaves = snap.leaves()
            for i in range(snap.shape.chunks):
                loc = index.get(leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE])
                if loc is not None and loc.type == CHUNK:
                    logical += loc.length
    return Usage(len(disks), gens, len(packs), sum(o.size for o in packs), logical)
