"""Whole-image operations behind `info`, `verify` and `restore` (file I/O lives here, the format
logic in image.py and spgz.py)."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from diskrsync.base.errors import (
    CorruptChunkError,
    DataError,
    DiskrsyncError,
    UsageError,
    from_oserror,
    stat_or_none,
)
from diskrsync.base.merkle import root_hash
from diskrsync.base.parallel import ordered_map
from diskrsync.compression.codec import ChunkCodec, Kind, is_zero, zeros
from diskrsync.compression.crypto import OpaqueCodec, SealedCodec
from diskrsync.compression.destination import open_dest
from diskrsync.compression.format import ENTRY_SIZE, TreeRef, iter_entries
from diskrsync.compression.image import (
    FileStore,
    Image,
    Snapshot,
    TreeView,
    decode_checked,
    fsync_dir,
)
from diskrsync.compression.spgz import SpgzImage

BATCH = 8  # chunks per parallel task: amortises the thread hand-off


def image_info(img: Image | SpgzImage) -> dict[str, Any]:
    """What `diskrsync info` shows, as plain data."""
    gens = img.generations()
    cur = gens[-1] if gens else None
    st = os.stat(img.path)
    info: dict[str, Any] = {
        "path": img.path,
        "size": cur.size if cur else 0,
        "generations": [
            {
                "number": g.number,
                "time": g.commit_time,
                "size": g.size,
                "root_hash": g.root_hash.hex(),
                "source": g.source,
                **({"meta": g.meta} if g.meta else {}),
            }
            for g in gens
        ],
        "allocated_bytes": st.st_blocks * 512,
        "file_size": st.st_size,
    }
    if isinstance(img, Image):
        usage = img.usage()
        if img.encrypted:
            enc = img.table.encryption or {}
            unlocked = isinstance(img.codec, SealedCodec)
            info["encryption"] = {"key_id": enc.get("key_id"), "cipher": enc.get("cipher"),
                                  "key_in_image": bool(enc.get("envelope")),
                                  "unlocked": unlocked}
            for g, rec in zip(info["generations"], img.table.generations, strict=True):
                if unlocked:  # the client's own record, authenticated
                    sealed = img.sealed_record(rec)
                    g["source"] = str(sealed.get("source", ""))
                    g["time"] = sealed.get("time", g["time"])
                    if sealed.get("meta"):
                        g["meta"] = sealed["meta"]
                else:
                    g["source"] = "(encrypted)"
        info.update(
            format=f"diskrsync image v{img.table.version}"
                   + (" (encrypted)" if img.encrypted else ""),
            chunk_size=img.chunk_size,
            fanout=img.fanout,
            stored_bytes=usage["stored"],
            checkpoint=bool(img.table.checkpoint),
        )
    else:
        info.update(format="SPGZ0001 (Go diskrsync)", chunk_size=img.block_size)
        info["stored_bytes"] = st.st_blocks * 512
    logical = info["size"]
    info["ratio"] = round(info["stored_bytes"] / logical, 4) if logical else None
    return info


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)  # anything that makes the image bad
    warnings: list[str] = field(default_factory=list)  # redundancy lost, still fully readable
    # one entry per bad stored chunk: "generations" lists every retained generation that
    # references it ("generation" is the first of them)
    bad_chunks: list[dict[str, Any]] = field(default_factory=list)
    chunks_checked: int = 0
    unchecked: str = ""  # what could not be checked (an encrypted image without its key)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_chunks


def verify_chunks(img: Image | SpgzImage, generation: int | None = None) -> int:
    """How many chunks ``verify`` reports to its ``progress`` (0: it reports none)."""
    if isinstance(img, SpgzImage):
        return 0
    records = [img.record(generation)] if generation is not None else img.table.generations
    return sum(-(-rec.tree.size // img.chunk_size) for rec in records)


def verify(img: Image | SpgzImage, generation: int | None = None,
           progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check metadata and every chunk of the chosen (default: every retained) generation.
    ``progress(n)``: n more chunks dealt with (checked, or shared with a generation already
    checked), ``verify_chunks`` in all."""
    tick = progress or (lambda _n: None)
    report = VerifyReport()
    if isinstance(img, SpgzImage):
        for block, offset, problem in img.verify():
            report.bad_chunks.append({"chunk": block, "offset": offset, "problem": problem})
        report.chunks_checked = img.snapshot().chunk_count
        return report
    report.warnings.extend(img.redundancy_warnings)
    report.problems.extend(img.lost_commits)
    if isinstance(img.codec, OpaqueCodec):
        report.unchecked = (
            "the image is encrypted and was checked without its key: superblocks, "
            "generation tables, every index page and its digest chain, and each chunk's "
            "stored size; chunk contents and generation seals need the key (give the "
            "passphrase to check them)")
    records = [img.record(generation)] if generation is not None else img.table.generations
    done: set[int] = set()  # stored offsets already checked (generations share chunks)
    bad: dict[int, tuple[int, str]] = {}  # stored offset -> (chunk, problem)
    for rec in records:
        with _view(img, rec.tree) as view:
            _verify_tree(view, img.codec, rec.number, rec.root_hash, report, done, bad, tick)
    # a bad chunk is bad in every generation sharing it: name them all, so that "restore
    # another generation" is not advice to restore one that is broken too
    users: dict[int, list[int]] = {off: [] for off in bad}
    if bad:
        for rec in img.table.generations:
            with _view(img, rec.tree) as view:
                for off in _references(view, bad):
                    users[off].append(rec.number)
    for off, (c, msg) in bad.items():
        gens = users[off]
        report.bad_chunks.append({"generation": gens[0], "generations": gens, "chunk": c,
                                  "offset": c * img.chunk_size, "problem": msg})
    return report


@contextlib.contextmanager
def _view(img: Image, tree: TreeRef) -> Iterator[TreeView]:
    """A tree of ``img`` read through its own open of the file (verify reads in threads)."""
    store = FileStore(os.open(img.path, os.O_RDONLY | os.O_CLOEXEC), img.path)
    try:
        yield TreeView(store, tree, img.chunk_size, img.fanout)
    finally:
        store.close()


def _references(view: TreeView, offsets: dict[int, Any]) -> set[int]:
    """Which of ``offsets`` (stored chunks) the tree references (unreadable pages skipped)."""
    found: set[int] = set()
    for page in range(view.shape.count(1)):
        with contextlib.suppress(DataError):
            for _h, off, _length, kind in iter_entries(view.page(1, page)):
                if kind != Kind.ZERO and off in offsets:
                    found.add(off)
    return found


def _verify_tree(
    view: TreeView,
    codec: ChunkCodec,
    number: int,
    want_root: bytes,
    report: VerifyReport,
    done: set[int],
    bad: dict[int, tuple[int, str]],
    tick: Callable[[int], None],
) -> None:
    shape = view.shape
    got_root = root_hash(shape.size, shape.chunk_size, shape.fanout, view.ref.hash)
    if got_root != want_root:
        report.problems.append(f"generation {number}: root hash does not match its tree")
    todo: list[int] = []
    for page in range(shape.count(1)):
        try:
            entries = view.page(1, page)
        except DataError as e:
            start, stop = shape.chunk_range(1, page)
            report.problems.append(
                f"generation {number}: {e.message} (chunks {start}-{stop - 1} unreadable)"
            )
            continue
        for k in range(len(entries) // ENTRY_SIZE):
            c = page * shape.fanout + k
            off = int.from_bytes(entries[k * ENTRY_SIZE + 32 : k * ENTRY_SIZE + 40], "little")
            kind = entries[k * ENTRY_SIZE + 44]
            if kind != Kind.ZERO and off not in done:
                done.add(off)
                todo.append(c)

    def check(batch: list[int]) -> list[tuple[int, int, str]]:
        out = []
        for c in batch:
            e = view.entry(c)
            try:
                if isinstance(codec, OpaqueCodec):  # no key: what a host can check
                    try:
                        codec.check_shape(e.kind, e.length, shape.chunk_length(c))
                        view.store.read(e.offset, e.length, f"chunk {c}")
                    except (ValueError, DataError) as err:
                        raise CorruptChunkError(c, c * shape.chunk_size, str(err)) from None
                else:
                    decode_checked(view.store, codec, c, e, shape.chunk_length(c),
                                   shape.chunk_size)
            except CorruptChunkError as err:
                out.append((e.offset, c, err.message))
        return out

    tick(shape.chunks - len(todo))  # zero, shared with a generation checked, or unreadable
    batches = [todo[i : i + BATCH] for i in range(0, len(todo), BATCH)]
    for batch, found in zip(batches, ordered_map(check, batches), strict=True):
        for off, c, msg in found:
            bad[off] = (c, msg)
        tick(len(batch))
    report.chunks_checked += len(todo)


def iter_chunks(snap: Snapshot | Any) -> Iterator[tuple[int, bytes | None]]:
    """(index, bytes) of every chunk in order, decoded on the worker threads; None for zero chunks.

    Each chunk is read once and its bytes compared with zeros (a memcmp): an image answers a
    zero chunk without I/O anyway, and an SPGZ0001 raw slot is not read twice."""

    def load(batch: range) -> list[tuple[int, bytes | None]]:
        out: list[tuple[int, bytes | None]] = []
        for i in batch:
            data = snap.read_chunk(i)
            out.append((i, None if is_zero(data) else data))
        return out

    n = snap.chunk_count
    batches = [range(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]
    for out in ordered_map(load, batches):
        yield from out


def restore(
    snap: Snapshot | Any,
    dest: str,
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a snapshot's bytes to a file (sparse), a block device, a character device or a
    FIFO (streamed), or "-".

    Nothing is replaced: an existing file is rewritten in place (``force`` unless it is
    empty), keeping its inode, owner and mode; a new one is created with the umask's mode and
    removed again if the restore fails. A block device is opened exclusively, so a mounted
    one is refused.
    """
    if dest == "-":
        _stream(snap, sys.stdout.buffer, sparse=False, progress=progress)
        return
    st = stat_or_none(dest, "cannot restore to")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{dest} is a directory; name the file to restore into")
    fd, st, created = open_dest(dest, streams=True)
    is_file = stat.S_ISREG(st.st_mode)
    writing = False
    try:
        with os.fdopen(fd, "wb", buffering=0, closefd=True) as f:
            if is_file and st.st_size > 0 and not force:
                raise UsageError(f"{dest} exists and is not empty; pass --force to overwrite it")
            if stat.S_ISBLK(st.st_mode):
                dev_size = f.seek(0, os.SEEK_END)
                if dev_size < snap.size:
                    raise UsageError(f"{dest} holds {dev_size} bytes, the disk needs {snap.size}")
                f.seek(0)
            writing = True
            if is_file:
                f.truncate(0)  # then written sparse: skipped zero chunks read as zeros
            _stream(snap, f, sparse=is_file, progress=progress)
            if is_file:
                f.truncate(snap.size)
            if is_file or stat.S_ISBLK(st.st_mode):
                os.fsync(f.fileno())
            if created:
                fsync_dir(dest)  # else a power cut may lose the restored file's name
    except BaseException as e:
        with contextlib.suppress(OSError):
            if created and os.lstat(dest).st_ino == st.st_ino:  # ours, incomplete
                os.unlink(dest)
        err = from_oserror(e, f"restoring to {dest}") if isinstance(e, OSError) else e
        if isinstance(err, DiskrsyncError) and writing and not created:
            err.message = f"{err.message}; {dest} is left partly rewritten"
            err.args = (err.message,)
        if err is e:
            raise
        raise err from None


def _stream(
    snap: Any, f: BinaryIO, *, sparse: bool, progress: Callable[[int], None] | None
) -> None:
    cs = snap.chunk_size
    for i, data in iter_chunks(snap):
        if data is None:
            length = min(cs, snap.size - i * cs)
            if sparse:
                f.seek(length, os.SEEK_CUR)
            else:
                _write_all(f, zeros(length))
        else:
            _write_all(f, data)
        if progress:
            progress(len(data) if data is not None else min(cs, snap.size - i * cs))


def _write_all(f: BinaryIO, data: bytes) -> None:
    """Unbuffered writes may take part of the data (a nearly full disk): write the rest, so
    a full disk ends in an error, never in a short file reported as restored."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if n is None:  # non-blocking stdout not ready: fall back to a blocking flush
            f.flush()
            continue
        view = view[n:]
