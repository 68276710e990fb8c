"""Putting a push together: open the two ends and connect them over a channel.

Local pushes run the target on a thread of this process, connected by an in-process channel
(no encoding, no verification pass: both ends are this program). Remote pushes run
``diskrsync serve`` at the other end over SSH and speak the framed protocol; that end
verifies every chunk it receives against its digest.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from diskrsync.base.errors import DiskrsyncError, UsageError
from diskrsync.base.merkle import Shape
from diskrsync.compression.objstore import S3Options
from diskrsync.compression.repoimport import ChunkPlan, write_disk
from diskrsync.compression.repolocation import open_repository, parse_repo_location
from diskrsync.compression.repolocation import open_store as open_object_store
from diskrsync.compression.repository import Repository, RepoSource
from diskrsync.compression.repotarget import RepoStore
from diskrsync.compression.sources import SourceReader, open_source, source_name
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import Channel, TokenBucket, channel_pair
from diskrsync.synccore.source import (
    PushStats,
    SourceOptions,
    SourceSession,
    commit_outcome,
    note_shrink,
    plan_scan,
    target_report,
)
from diskrsync.synccore.target import (
    TargetOptions,
    TargetStore,
    WireStore,
    open_store,
    serve_target,
)


@dataclass(frozen=True)
class PushRequest:
    source: SourceOptions = field(default_factory=SourceOptions)
    target: TargetOptions = field(default_factory=TargetOptions)
    raw_target: bool = False  # --raw-target: DST is a raw file updated in place
    generation: int | None = None  # of SRC, when it is an image
    dirty_bitmap: str | None = None  # SRC is an NBD export: QEMU's bitmap of what changed
    qmp: str | None = None  # QEMU's monitor socket: the push manages that bitmap itself
    bwlimit: float = 0.0  # --bwlimit: bytes per second over the wire, this end's (0: none)
    s3: S3Options = field(default_factory=S3Options)  # --s3-endpoint, --s3-profile

    def limit(self) -> TokenBucket | None:
        """A fresh token bucket for ``bwlimit`` (None: unlimited)."""
        return TokenBucket(self.bwlimit) if self.bwlimit else None


def _same_file(a: str, b: str) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def local_push(src: str, dst: str, req: PushRequest,
               progress: Callable[[int, int], None] | None = None,
               channels: tuple[Channel, Channel] | None = None) -> PushStats:
    """Push between two paths of this machine. ``channels`` lets tests put a delaying
    link in between."""
    if _same_file(src, dst):
        raise UsageError(f"{src} and {dst} are the same file")
    # a repository is opened (and created if new) before the source: a bad location fails first
    into = repository_target(dst, req)
    reader = open_push_source(src, req)
    if into is not None and into[0].config.encryption is not None:
        try:
            return push_sealed(reader, *into, req, progress)
        finally:
            reader.close()
    a, b = channels or channel_pair(limit=req.limit())
    failure: list[BaseException] = []

    def opener(hello: p.Hello) -> TargetStore:
        return _open_target(dst, into, hello, req)

    def run_target() -> None:
        try:
            serve_target(b, opener, verify=False, max_size=req.target.max_size)
        except BaseException as e:
            failure.append(e)
            # keep draining so a source blocked on a full channel sees the error and stops
            with contextlib.suppress(Exception):
                while b.recv() is not None:
                    pass

    thread = threading.Thread(target=run_target, name="push-target", daemon=True)
    thread.start()
    opts = req.source
    info = {"name": source_name(src), **opts.info}
    session = SourceSession(a, reader, _with_info(opts, info), progress)
    try:
        stats = session.run()
        thread.join()
        if not failure:
            source_committed(reader, stats)
    except BaseException as e:
        # let the target finish aborting: it keeps what arrived as a checkpoint (also on
        # Ctrl-C), so the next push resumes instead of starting over
        thread.join(60)
        theirs = failure[0] if failure else None
        if isinstance(e, DiskrsyncError) and isinstance(theirs, DiskrsyncError) \
                and not theirs.relayed:
            raise theirs from None  # the target's own error says more than "target: ..."
        raise  # ours, or the target only echoed it: its category (exit code) is the true one
    finally:
        reader.close()
    if failure:
        raise failure[0]
    return stats


def repository_target(dst: str, req: PushRequest) -> tuple[Repository, str] | None:
    """DST's repository and disk when it names one (``REPO#DISK``), opened for a push into
    it and created when the store is empty; None for any other DST."""
    into = parse_repo_location(dst)
    if into is None:
        return None
    disk = into.need_disk("a push into a repository")
    if req.raw_target:
        raise UsageError("--raw-target does not apply to a repository")
    if not req.target.dry_run:
        return open_repository(into, keyring=req.source.keyring, s3=req.s3, create=True,
                               encrypt=req.source.encrypt, kdf=req.source.kdf), disk
    # a dry run compares with what is there: it creates nothing
    if req.source.encrypt:
        raise UsageError("--dry-run with --encrypt: a new repository has nothing to compare "
                         "with (every chunk would be sent)")
    store = open_object_store(into, req.s3)
    if store.head("config") is None:
        raise UsageError(f"{into.store} holds no repository yet: a dry run has nothing to "
                         f"compare with (the first push creates it and sends every chunk)")
    # from the config alone: no passphrase is asked for only to refuse
    if Repository.read_config(store).encryption is not None:
        raise UsageError(f"{into.store} is encrypted: a dry run into an encrypted repository "
                         f"is not supported (its push seals the chunks on this end and uploads "
                         f"only the chunks it lacks)")
    return open_repository(into, keyring=req.source.keyring, s3=req.s3), disk


def push_sealed(reader: SourceReader, repo: Repository, disk: str, req: PushRequest,
                 progress: Callable[[int, int], None] | None) -> PushStats:
    """A local push into an encrypted repository. Its chunk ids are keyed content hashes
    that only this end can compute (``ContentSealedCodec``), which the sync protocol's
    source does not speak; so the source is read here and sealed into the repository
    directly (``repoimport.write_disk``): chunks whose id the newest generation or any other
    disk holds cost no upload, and equal content makes no new generation. What is read is
    planned as for the sync protocol's scan (``plan_scan``): holes, free blocks with
    ``--skip-free-blocks``, and the chunks a map of changed ranges says are unchanged since
    the newest generation (whose sealed manifest records what the map is relative to)."""
    t0 = time.monotonic()
    gens = repo.generations(disk)
    before = repo.manifest(gens[-1]) if gens else None

    def step(n: int) -> None:
        if progress is not None:
            progress(n, 0)

    label = req.source.label or reader.description
    # the manifest is sealed: its change_base is the client's own record
    newest = {"kind": "repository", "generation": before.number if before else 0,
              "change_base": before.meta.get("change_base") if before else None}
    plan = plan_scan(reader, newest, skip_free_blocks=req.source.skip_free_blocks)
    if plan.changed is not None and before is not None and before.size != reader.size:
        why = f"the disk's size changed ({before.size} to {reader.size} bytes)"
        # the map's name leads plan.map ("dirty-bitmap+allocation"): the rest narrowed it
        name = str((plan.change_base or {}).get("map", "changed ranges"))
        plan = replace(plan, changed=None, map=plan.map[len(name) + 1:] or "full",
                       map_fallback=why,
                       warnings=[*plan.warnings, f"full scan: {name} not used because {why}"])
    chunk_plan = ChunkPlan(plan.data, plan.changed, before.root if before else None)
    meta = {"map": plan.map, "map_fallback": plan.map_fallback,
            "change_base": plan.change_base}
    m, counts = write_disk(repo, disk, reader.read, reader.size, source=label,
                           meta={k: v for k, v in meta.items() if v},
                           progress=step, new_generation=req.target.always_new_generation,
                           plan=chunk_plan)
    shape = Shape(reader.size, repo.config.chunk_size, repo.config.fanout)
    unchanged = before is not None and m.number == before.number
    stats = PushStats(
        size=reader.size, chunk_size=shape.chunk_size, chunks=shape.chunks,
        bytes_read=chunk_plan.bytes_read, bytes_hashed=chunk_plan.bytes_read,
        bytes_sent=counts["bytes_stored"], chunks_differing=counts["chunks_stored"],
        duration=time.monotonic() - t0, root_hash=m.root.hex(),
        target_root_hash=before.root.hex() if before is not None else "",
        generation=m.number, created=before is None, unchanged=unchanged,
        target=target_report({"chunks_written": counts["chunks_stored"]}),
        map=plan.map, map_fallback=plan.map_fallback, warnings=list(plan.warnings))
    source_committed(reader, stats)
    return stats


def _open_target(dst: str, into: tuple[Repository, str] | None, hello: p.Hello,
                 req: PushRequest, *, label: str = "", source_host: str = "") -> WireStore:
    if into is None:
        return open_store(dst, hello, req.target, raw=req.raw_target, label=label,
                          source_host=source_host)
    repo, disk = into
    store = RepoStore(repo, disk, hello.size, req.target,
                      source=str(hello.info.get("source", "")), label=label,
                      source_host=source_host)
    return WireStore(cast(Any, store), hello)


def open_push_source(src: str, req: PushRequest) -> SourceReader:
    """SRC as the push reads it (its generation, or its NBD dirty bitmap; a repository
    disk's generation, pinned by a read lease until the reader is closed)."""
    loc = parse_repo_location(src)
    if loc is not None:
        if req.dirty_bitmap or req.qmp:
            raise UsageError("--dirty-bitmap and --qmp need an NBD source")
        disk = loc.need_disk("a push out of a repository")
        repo = open_repository(loc, keyring=req.source.keyring, s3=req.s3)
        return RepoSource(repo.pin(disk, req.generation))
    return open_source(src, req.generation, req.source.keyring, dirty_bitmap=req.dirty_bitmap,
                       qmp=req.qmp)


def source_committed(reader: SourceReader, stats: PushStats) -> None:
    """Tell the source its push committed a generation (a dirty bitmap is cleared only now,
    never after a failure), and pass on what it has to say."""
    if stats.generation is not None and not stats.dry_run:
        try:
            reader.committed()
        except DiskrsyncError as e:  # the generation stands; the source still has more
            stats.warnings.append(f"generation {stats.generation} committed, but {e} (nothing "
                                  f"is lost: the next push reads more than it would need)")
    stats.warnings.extend(reader.warnings())


def _with_info(opts: SourceOptions, info: dict[str, Any]) -> SourceOptions:
    return replace(opts, info=info)


def serve_source(channel: Channel, path: str, generation: int | None,
                 opts: SourceOptions) -> PushStats:
    """The remote end of a pull: this machine is the source."""
    try:
        reader = open_source(path, generation)
    except DiskrsyncError as e:
        # in the protocol too: the puller then keeps its category (a missing path is exit 2)
        with contextlib.suppress(Exception):
            channel.send(p.Error(type(e).__name__, str(e)))
        raise
    try:
        info = {"name": source_name(path), **opts.info}
        return SourceSession(channel, reader, _with_info(opts, info)).run()
    finally:
        reader.close()


def run_target_end(channel: Channel, dst: str, req: PushRequest, *, verify: bool = True,
                   pulled_from: str | None = None, repositories: bool = False) -> PushStats:
    """The target's side over a channel (serve --target, or the local end of a pull: only
    that one, ``repositories``, takes a repository location as ``dst``).

    Returns what this end knows, from its own store: sizes, the chunks it stored, the roots
    and the commit. The byte counts keep PushStats' meaning: "sent" is source to target,
    here what this end received. ``pulled_from`` names the source's host in a warning and
    in the generation's source label (``HOST:PATH``, unless ``--label`` gave one)."""
    opened: list[WireStore] = []
    if parse_repo_location(dst) is not None and not repositories:
        raise UsageError(f"{dst}: a repository is not a target over SSH yet; run the push on "
                         f"a machine that reaches the repository")
    into = repository_target(dst, req)

    def opener(hello: p.Hello) -> TargetStore:
        # the generation's source label: --label, else in a pull HOST:what the source says
        store = _open_target(dst, into, hello, req, label=req.source.label,
                             source_host=pulled_from or "")
        opened.append(store)
        return store

    t0 = time.monotonic()
    committed = serve_target(channel, opener, verify=verify, max_size=req.target.max_size)
    dry_run = req.target.dry_run
    stats = PushStats(dry_run=dry_run, duration=time.monotonic() - t0,
                      bytes_sent=channel.bytes_received, bytes_received=channel.bytes_sent)
    if opened:
        _target_stats(stats, opened[0], dry_run, pulled_from)
    if committed is not None:
        stats.target = target_report(committed.info)
        if dry_run:
            stats.target_root_hash = committed.root.hex()
        else:
            stats.generation = committed.generation or None
            stats.created = stats.generation == 1
            stats.unchanged, stats.pruned = commit_outcome(committed.info)
    return stats


def _target_stats(stats: PushStats, store: WireStore, dry_run: bool,
                  pulled_from: str | None) -> None:
    shape = Shape(store.hello.size, store.chunk_size, store.fanout)
    stats.size, stats.chunk_size, stats.chunks = shape.size, shape.chunk_size, shape.chunks
    stats.target_root_hash = str(store.info.get("root", ""))
    stats.resumed = bool(store.info.get("resumed"))
    note_shrink(stats, store.info)
    stored = store.store.stored
    stats.differing_ranges = list(stored.byte_ranges(shape))
    stats.chunks_differing = stored.chunks
    stats.chunk_bytes_differing = sum(n for _o, n in stats.differing_ranges)
    if store.done is None:
        return
    root, info = store.done
    stats.root_hash = root.hex()
    stats.read_errors = [(int(o), int(n)) for o, n in info.get("read_errors") or []]
    stats.map = str(info.get("map") or "full")
    stats.map_fallback = str(info.get("map_fallback") or "")
    source = f"{pulled_from}: " if pulled_from else ""
    stats.warnings += [f"{source}{w}" for w in info.get("map_warnings") or []]
    changed = int(info.get("source_changed_chunks") or 0)
    if changed and pulled_from is not None:
        stats.warnings.append(f"{pulled_from}: the source changed during the pull: {changed} "
                              f"chunk(s) differ from its scan (use a snapshot there)")
    if dry_run:  # no chunks travel in a dry run: the source counted them
        stats.chunks_differing = int(info.get("chunks_differing", 0))
        stats.chunk_bytes_differing = int(info.get("chunk_bytes_differing", 0))
        stats.differing_ranges = [(int(o), int(n)) for o, n in info.get("differing_ranges") or []]
