"""The image format through its Python API: round trips, copy-on-write, pinning, locking."""

from __future__ import annotations

import os
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskrsync.base.errors import BusyError, DataError, UsageError
from diskrsync.base.merkle import leaf_hash, tree_root
from diskrsync.compression import targets
from diskrsync.compression.api import GenerationInfo
from diskrsync.compression.image import Image, TreeView
from diskrsync.compression.importer import BATCH_CHUNKS, write_new_image

pytestmark = pytest.mark.inproc

CS = 16384


def write_all(img: Image, data: bytes, **commit: Any) -> GenerationInfo:
    tx = img.begin()
    tx.resize(len(data))
    for i in range(0, len(data), CS):
        tx.write_chunk(i // CS, data[i : i + CS])
    return tx.commit(**commit)


def content(img: Image, number: int | None = None) -> bytes:
    with img.snapshot(number) as s:
        return s.read(0, s.size)


def test_round_trip_and_root(tmp_path):
    rnd = random.Random(5)
    data = rnd.randbytes(CS * 5) + bytes(CS * 7) + b"text " * 5000 + b"end"
    img = Image.create(str(tmp_path / "a.spgz"), chunk_size=CS, fanout=4)
    g = write_all(img, data, source="unit")
    img.refresh()
    assert content(img) == data
    leaves = [leaf_hash(data[i : i + CS]) for i in range(0, len(data), CS)]
    assert g.root_hash == tree_root(len(data), CS, 4, leaves)
    with img.snapshot() as s:
        assert [s.chunk_is_zero(i) for i in range(4, 13)] == [False] + [True] * 7 + [False]
    # zero chunks store nothing; the text compresses
    assert img.usage()["stored"] < CS * 5 + 30000


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, CS * 40), min_size=1, max_size=5),
    seed=st.integers(0, 10**6),
)
def test_generations_follow_a_model(tmp_path_factory, sizes, seed):
    """Any sequence of resizes and chunk writes reads back as the same edits on a bytearray,
    every retained generation keeps its bytes, and roots match the reference tree."""
    rnd = random.Random(seed)
    path = str(tmp_path_factory.mktemp("m") / "m.spgz")
    img = Image.create(path, chunk_size=CS, fanout=3)
    model = bytearray()
    history: dict[int, bytes] = {}
    for size in sizes:
        tx = img.begin()
        tx.resize(size)
        model = model[:size].ljust(size, b"\0")
        n = -(-size // CS)
        for c in rnd.sample(range(n), min(n, rnd.randint(0, 6))):
            fill: list[Callable[[int], bytes]] = [rnd.randbytes, bytes]
            blk = rnd.choice(fill)(min(CS, size - c * CS))
            model[c * CS : c * CS + len(blk)] = blk
            tx.write_chunk(c, blk)
        g = tx.commit(keep=3)
        history[g.number] = bytes(model)
        leaves = [leaf_hash(model[i : i + CS]) for i in range(0, size, CS)]
        assert g.root_hash == tree_root(size, CS, 3, leaves)
    img.refresh()
    kept = [g.number for g in img.generations()]
    assert kept == sorted(history)[-3:]
    for number in kept:
        assert content(img, number) == history[number]


def test_one_writer_at_a_time(tmp_path):
    img = Image.create(str(tmp_path / "w.spgz"), chunk_size=CS)
    tx = img.begin(what="push")
    with pytest.raises(BusyError, match=r"being written by another process \(push by pid"):
        Image.open(img.path).begin()
    tx.abort()
    Image.open(img.path).begin().abort()  # free again once the first lets go


def test_pinned_generation_survives_pruning_and_reuse(tmp_path):
    path = str(tmp_path / "p.spgz")
    img = Image.create(path, chunk_size=CS, fanout=4)
    first = os.urandom(CS * 20)
    write_all(img, first)
    img.refresh()
    snap = img.snapshot()  # pins generation 1
    for _ in range(4):  # each push rewrites everything and keeps only one generation
        write_all(Image.open(path), os.urandom(CS * 20), keep=1)
    assert snap.read(0, snap.size) == first
    snap.close()
    # once unpinned, the space is reused: the file does not keep growing
    size_before = os.path.getsize(path)
    for _ in range(3):
        write_all(Image.open(path), os.urandom(CS * 20), keep=1)
    assert os.path.getsize(path) <= size_before


def test_checkpoint_is_not_current_and_resumes(tmp_path):
    path = str(tmp_path / "c.spgz")
    img = Image.create(path, chunk_size=CS)
    old = os.urandom(CS * 8)
    write_all(img, old)
    new = os.urandom(CS * 8)
    tx = Image.open(path).begin()
    for c in range(4):
        tx.write_chunk(c, new[c * CS : (c + 1) * CS])
    tx.checkpoint(source="half")
    tx.abort()  # killed after the checkpoint
    img = Image.open(path)
    assert content(img) == old  # the checkpoint changed nothing current
    tx = img.begin()
    assert tx.resumed_from is not None
    assert [tx.chunk_hash(c) for c in range(4)] == [
        leaf_hash(new[c * CS : (c + 1) * CS]) for c in range(4)
    ]
    for c in range(4, 8):
        tx.write_chunk(c, new[c * CS : (c + 1) * CS])
    tx.commit()
    img.refresh()
    assert content(img) == new
    assert img.table.checkpoint is None


def test_commit_refuses_wrong_expected_root(tmp_path):
    path = str(tmp_path / "r.spgz")
    img = Image.create(path, chunk_size=CS)
    write_all(img, b"a" * CS)
    tx = Image.open(path).begin()
    tx.write_chunk(0, b"b" * CS)
    with pytest.raises(DataError, match="nothing committed"):
        tx.commit(expect_root=b"\0" * 32)
    tx.abort()
    assert content(Image.open(path)) == b"a" * CS


def test_bad_paths(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        Image.open(str(tmp_path))
    with pytest.raises(UsageError, match="No such file"):
        Image.open(str(tmp_path / "missing"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world" * 1000)
    with pytest.raises(DataError, match="not a diskrsync image"):
        Image.open(str(junk))


def test_write_new_image_in_one_pass(tmp_path):
    rnd = random.Random(7)
    data = (rnd.randbytes(CS * 40) + bytes(CS * 30) + b"text " * (CS * 3) + b"tail")
    assert len(data) > CS * BATCH_CHUNKS * 2  # several batches, a short last chunk
    seen: list[int] = []
    path = str(tmp_path / "n.spgz")
    g = write_new_image(lambda o, n: data[o : o + n], len(data), path, chunk_size=CS,
                        source="unit", progress=seen.append)
    assert sum(seen) == len(data)
    img = Image.open(path)
    assert content(img) == data
    leaves = [leaf_hash(data[i : i + CS]) for i in range(0, len(data), CS)]
    assert g.root_hash == tree_root(len(data), CS, 128, leaves)
    assert img.generations()[0].source == "unit"
    with img.snapshot() as s:
        assert sum(s.chunk_is_zero(i) for i in range(s.chunk_count)) == 30
    with pytest.raises(UsageError, match="already exists"):
        write_new_image(lambda o, n: data[o : o + n], len(data), path, chunk_size=CS)


def test_tree_walk_holds_a_bounded_number_of_index_pages(tmp_path):
    """Walking every chunk of a tree (a push's compare, the allocator's extents, a mount's
    read) keeps at most LEAF_PAGES level-1 pages, not the whole index (issue 16: 384 MiB for
    a 1 TiB disk)."""
    img = Image.create(str(tmp_path / "a.spgz"), chunk_size=CS, fanout=4)
    pages = TreeView.LEAF_PAGES * 3
    data = b"".join(i.to_bytes(4, "little") * (CS // 4) for i in range(pages * 4))
    write_all(img, data)
    img.refresh()
    with img.snapshot() as s:
        assert s.read(0, s.size) == data
        for p in range(pages):
            assert len(s.tree.leaf_hashes(p)) == 4
        upper = s.tree.shape.count(2) + s.tree.shape.count(3) + s.tree.shape.count(4) + 1
        assert s.tree.cached_pages() <= TreeView.LEAF_PAGES + upper
        extents = list(s.tree.extents_beside(None))
        assert len(extents) >= pages * 5  # a page and its 4 chunks each
        assert s.tree.cached_pages() <= TreeView.LEAF_PAGES + upper
        # an evicted page reads again, checked as the first time
        assert s.read(0, CS) == data[:CS]


def test_image_store_streams_page_digests_a_batch_at_a_time(tmp_path, monkeypatch):
    """The target sends its page digests as it walks the index, PAGE_BATCH at a time, the
    same digests as the whole list (which it no longer builds: 5 MiB per TiB)."""
    monkeypatch.setattr(targets, "PAGE_BATCH", 3)
    path = str(tmp_path / "a.spgz")
    img = Image.create(path, chunk_size=CS, fanout=4)
    data = b"".join(i.to_bytes(4, "little") * (CS // 4) for i in range(40))  # 10 pages
    write_all(img, data)
    img.close()
    store = targets.ImageStore(path, len(data), CS, targets.TargetOptions())
    try:
        got: list[tuple[int, bytes]] = []
        store.send_page_hashes(lambda start, hashes: got.append((start, hashes)))
        assert [(s, len(h) // 32) for s, h in got] == [(0, 3), (3, 3), (6, 3), (9, 1)]
        assert b"".join(h for _s, h in got) == b"".join(store.base.node_hashes(1))
    finally:
        store.abort(save=False)


def test_a_commit_writes_the_tree_holding_one_parent_per_level(tmp_path):
    """A first push of a big sparse disk rewrites every index page; the tree is written
    bottom-up as a stream, so the commit holds one open parent per level, not a pointer per
    page, and what was written since the last publish is kept as runs, not an entry per
    extent (issue 16: some 30 MiB per TiB of disk on a first push)."""
    img = Image.create(str(tmp_path / "a.spgz"), chunk_size=CS, fanout=4)
    pages = 16384
    tx = img.begin()
    tx.resize(pages * 4 * CS)
    tx.write_chunk(pages * 2, b"x" * CS)
    tracemalloc.start()
    try:
        tx.commit()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # (a dict of every page's pointer and one of every extent written: some 5 MiB)
    assert peak < 256 << 10
    img.refresh()
    with img.snapshot() as s:
        assert s.read(pages * 2 * CS, CS) == b"x" * CS
        assert s.read(0, 4 * CS) == bytes(4 * CS)
