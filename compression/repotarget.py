"""A disk in a repository as the target of the native sync protocol: the store a push
writes into, with the interface of ``targets.ImageStore`` (digests of the newest
generation, chunks in, commit with the source's root).

The source scans and compares exactly as with an image: a plain repository's content ids
are the protocol's plain BLAKE3 leaf digests and its stored forms are the standard codec's
(zstd or raw), so the chunks that arrive go into packs as they are. What is missing from
the newest generation is the only thing sent; chunks the repository holds under another
disk or generation are not stored twice. A push that breaks off keeps what it uploaded
(indexed, so the next push reuses it: resuming is deduplication, docs/repository.md).

``synccore.push.local_push`` opens it for a repository location (``REPO#DISK``); an
encrypted repository is refused (its chunks need the content-keyed codec on the source's
side).
"""

from __future__ import annotations

import contextlib
from typing import Any

from diskrsync.base import merkle
from diskrsync.base.errors import DiskrsyncError, PeerError, UsageError
from diskrsync.base.merkle import HASH_SIZE, Shape, node_hash_packed, root_hash
from diskrsync.compression.codec import STANDARD, Kind
from diskrsync.compression.crypto import ContentSealedCodec
from diskrsync.compression.repository import LEASE, Repository
from diskrsync.compression.targets import (
    PAGE_BATCH,
    PageSink,
    StoredCounts,
    StoreResult,
    TargetOptions,
)


class RepoStore:
    def __init__(self, repo: Repository, disk: str, size: int, opts: TargetOptions, *,
                 source: str = "", lease: float = LEASE, label: str = "",
                 source_host: str = "") -> None:
        if isinstance(repo.codec, ContentSealedCodec) or repo.codec.name != STANDARD.name:
            raise UsageError(f"{repo.store.url} is encrypted: pushing into it over the sync "
                             f"protocol is not supported yet")
        self.repo = repo
        self.disk = disk
        self.source = source
        self.label, self.source_host = label, source_host
        self.opts = opts
        cfg = repo.config
        self.chunk_size, self.fanout = cfg.chunk_size, cfg.fanout
        # a dry run compares with the newest generation and writes nothing: no writer's
        # lease, no packs (its source sends no chunks)
        self.writer = None if opts.dry_run else repo.writer(disk, lease=lease).__enter__()
        self._open = True
        try:
            base = repo.snapshot(disk) if repo.generations(disk) else None
            self.leaves = base.leaves() if base is not None else b""
            self.base_shape = base.shape if base is not None else Shape(0, self.chunk_size,
                                                                         self.fanout)
            if self.writer is not None:
                self.writer.begin(size, base)
        except BaseException:
            self.close()
            raise
        self.base_size = self.base_shape.size
        self.base = base.manifest if base is not None else None
        top = base.manifest.top if base is not None else b""
        self.info: dict[str, Any] = {
            "kind": "repository", "url": repo.store.url, "disk": disk,
            "root": root_hash(self.base_size, self.chunk_size, self.fanout, top).hex()}
        self.stored = StoredCounts()

    def _leaf_page(self, page: int) -> bytes:
        a, b = self.base_shape.chunk_range(1, page)
        return self.leaves[a * HASH_SIZE : b * HASH_SIZE]

    def send_page_hashes(self, emit: PageSink) -> None:
        digests = [node_hash_packed(self._leaf_page(j)) for j in range(self.base_shape.count(1))]
        for i in range(0, len(digests), PAGE_BATCH):
            emit(i, b"".join(digests[i : i + PAGE_BATCH]))

    def check_space(self, info: dict[str, Any]) -> None:
        """A first push's estimate: an object store has no free space to compare it with."""

    def leaf_hashes(self, page: int) -> bytes:
        if page >= self.base_shape.count(1):
            return b""
        return self._leaf_page(page)

    def put(self, index: int, kind: int, digest: bytes, payload: bytes) -> None:
        if self.writer is None:
            raise PeerError("the source sent a chunk in a dry run")
        shape = self.writer.shape
        assert shape is not None
        if not 0 <= index < shape.chunks:
            raise PeerError(f"the source sent chunk {index} of a disk of {shape.chunks}")
        length = shape.chunk_length(index)
        if kind == Kind.ZERO:
            self.writer.set_leaf(index, merkle.zero_hash(length))
        elif kind in (Kind.RAW, Kind.ZSTD) and len(digest) == HASH_SIZE:
            self.writer.put_stored(index, digest, kind, payload, length)
        else:
            raise PeerError(f"the source sent chunk {index} of kind {kind}")
        self.stored.add(index)

    def finish(self, root: bytes, info: dict[str, Any]) -> StoreResult:
        meta = {k: v for k, v in info.items()
                if v and k not in ("dry_run", "seal", "source", "new_generation")}
        # a source names itself in Done; --label, or in a pull HOST: (as ImageStore.finish)
        said = str(info.get("source") or self.source)
        source = self.label or (f"{self.source_host}:{said}" if self.source_host else said)
        where = {"url": self.repo.store.url, "disk": self.disk}
        if self.writer is None:  # a dry run: the newest generation's root, nothing made
            self.close()
            return StoreResult(0, bytes.fromhex(self.info["root"]), {**where, "dry_run": True},
                               self.stored)
        # as an image: equal content is no new generation, unless asked for or the run read
        # zeros for unreadable sectors or saw the source change (manifests are immutable, so
        # the run is not recorded in the old one: `unchanged` says so to the source)
        new_generation = self.opts.always_new_generation or bool(
            meta.get("read_errors") or meta.get("source_changed_chunks")
            or info.get("new_generation") is True)
        if not new_generation and self.base is not None and self.base.root == root:
            self.close()
            return StoreResult(self.base.number, root, {**where, "unchanged": True},
                               self.stored)
        m = self.writer.commit(source=source, meta=meta, expect_root=root)
        self.close()
        return StoreResult(m.number, m.root, where, self.stored)

    def abort(self, save: bool) -> None:
        if save and self._open and self.writer is not None:
            # index what was uploaded: the next push reuses it
            with contextlib.suppress(DiskrsyncError, OSError):
                self.writer.packer.finish()
        self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            if self.writer is not None:
                self.writer.__exit__(None, None, None)
