"""Copy a disk with its generations from one repository to another, sending only the
blobs the destination lacks (docs/repository.md, "Copy between stores": the offsite copy).

Between repositories with the same codec (both plain, or both encrypted with one key) a
blob's id is the same on both sides, so blobs move as they are stored (each decoded and
checked first: a damaged blob is never copied); otherwise every chunk is read, checked, and
written through the destination's codec. Generations go oldest first, keep their time,
source and metadata, and are numbered by the destination; one already copied (its
``copy_of`` names the same source repository and root) is skipped, so a copy that was
interrupted, or is run again later, sends only what is new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diskrsync.base import merkle
from diskrsync.base.errors import CorruptChunkError, UsageError
from diskrsync.base.merkle import HASH_SIZE
from diskrsync.compression.codec import ChunkAt
from diskrsync.compression.repository import (
    CHUNK,
    LEASE,
    GenerationWriter,
    Repository,
    RepoSnapshot,
)

BATCH = 64  # chunks fetched per ranged-read round


@dataclass
class CopyReport:
    copied: list[int]  # destination numbers of the generations written
    skipped: int  # generations the destination had already
    blobs_sent: int
    bytes_sent: int


def copy_disk(src: Repository, dst: Repository, disk: str, *, dst_disk: str | None = None,
              lease: float = LEASE, progress: Callable[[int], None] | None = None
              ) -> CopyReport:
    name = dst_disk or disk
    cfg_s, cfg_d = src.config, dst.config
    if cfg_s.id == cfg_d.id and name == disk:
        raise UsageError("source and destination are the same disk of the same repository")
    same = (src.codec.name == dst.codec.name
            and (cfg_s.chunk_size, cfg_s.fanout) == (cfg_d.chunk_size, cfg_d.fanout))
    report = CopyReport([], 0, 0, 0)
    sources = src.generations(disk)
    if not sources:
        raise UsageError(f"{src.store.url}: no disk {disk}")
    with dst.writer(name, lease=lease) as w:
        done = {str(dst.manifest(g).meta.get("copy_of")) for g in dst.generations(name)}
        for info in sources:
            m = src.manifest(info)
            tag = f"{cfg_s.id}:{m.root.hex()}"
            if tag in done:
                report.skipped += 1
                continue
            snap = RepoSnapshot(src, m)
            before = w.packer.bytes
            w.begin(m.size)
            if same:
                _copy_stored(snap, w, report)
                w.set_leaves(snap.leaves())
            else:
                for first in range(0, snap.shape.chunks, BATCH):
                    got = snap.read_chunks(list(range(first, min(first + BATCH,
                                                                 snap.shape.chunks))))
                    for i, data in got.items():
                        w.put_chunk(i, data)
            new = w.commit(source=m.source, meta={**m.meta, "copy_of": tag},
                           now=lambda m=m: m.time)
            done.add(tag)
            report.copied.append(new.number)
            report.bytes_sent += w.packer.bytes - before
            if progress is not None:
                progress(m.size)
    return report


def _copy_stored(snap: RepoSnapshot, w: GenerationWriter, report: CopyReport) -> None:
    src = snap.repo
    leaves = snap.leaves()
    index = src.index()
    wanted: dict[bytes, int] = {}  # chunk id -> a chunk number it is at (for messages)
    for i in range(snap.shape.chunks):
        bid = leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE]
        if bid != merkle.zero_hash(snap.shape.chunk_length(i)) and not w.knows(bid):
            wanted.setdefault(bid, i)
    ids = list(wanted)
    for first in range(0, len(ids), BATCH):
        batch = ids[first : first + BATCH]
        stored = src.read_blobs(batch, what=lambda b: snap.what)
        for bid in batch:
            loc, i = index[bid], wanted[bid]
            try:
                data = src.codec.decode(loc.kind, stored[bid], loc.length, ChunkAt(i, bid))
                if loc.type != CHUNK or src.codec.leaf_hash(data, i) != bid:
                    raise ValueError("content hash mismatch")
            except ValueError as e:
                raise CorruptChunkError(i, i * snap.chunk_size,
                                        f"{snap.what}, blob {bid.hex()[:16]}…: {e}") from None
            if w.put_blob(bid, CHUNK, loc.kind, loc.length, stored[bid]):
                report.blobs_sent += 1
