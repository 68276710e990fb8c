"""The writer's used space (issue 16): what a transaction must not overwrite.

``Transaction._used`` walks the live trees side by side (each against the one before it) and
gathers the extents into ``UsedSpace`` runs, instead of remembering every page offset it saw.
These tests hold it to the old method (a set of every page offset, each tree walked against
it) on random generation histories: commits with resizes, checkpoints resumed, prunes,
readers pinning pruned generations (zombies), and torn commits that leave the other
superblock slot naming an older table with its own generations, checkpoint and zombies. And
every generation a reader may still open reads back as written: a byte freed too early is
overwritten by a later push and fails its hash.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskrsync.compression import image as image_mod
from diskrsync.compression.alloc import UsedSpace
from diskrsync.compression.codec import Kind
from diskrsync.compression.format import iter_entries
from diskrsync.compression.image import Image, Snapshot, Transaction, TreeView

pytestmark = pytest.mark.inproc

CS = 16384


def merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of extents as sorted disjoint (offset, length), not touching (plain code:
    the reference for ``UsedSpace``)."""
    out: list[list[int]] = []
    for off, length in sorted(e for e in extents if e[1] > 0):
        if out and off <= out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length)
        else:
            out.append([off, off + length])
    return [(a, b - a) for a, b in out]


def seen_walk(tree: TreeView, seen: set[int]) -> Iterator[tuple[int, int]]:
    """The walk the writer used before: every page offset seen is remembered in ``seen``."""
    shape = tree.shape
    if shape.chunks == 0:
        return
    stack = [(shape.top_level, 0, tree.ref.offset, tree.ref.length)]
    while stack:
        level, index, off, length = stack.pop()
        if off in seen:
            continue
        seen.add(off)
        yield off, length
        entries = tree.page(level, index)
        for k, (_h, offset, n, kind) in enumerate(iter_entries(entries)):
            if level > 1:
                stack.append((level - 1, index * shape.fanout + k, offset, n))
            elif kind != Kind.ZERO:
                yield offset, n


def reference_used(tx: Transaction, state: Any) -> list[tuple[int, int]]:
    tables, live = tx._live(state)
    used = list(tables)
    seen: set[int] = set()
    for rec in live:
        used += seen_walk(TreeView(tx._store, rec.tree, tx.chunk_size, tx.fanout), seen)
    return merged(used)


@pytest.fixture
def checked_used(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every transaction's used space is checked against the reference; returns a list
    that counts the checks."""
    calls: list[int] = []
    original = Transaction._used

    def used(self: Transaction, state: Any) -> list[tuple[int, int]]:
        got = original(self, state)
        assert got == merged(got), "runs not sorted, disjoint and apart"
        assert got == reference_used(self, state)
        calls.append(len(got))
        return got

    monkeypatch.setattr(Transaction, "_used", used)
    return calls


# -- UsedSpace --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=60))
def test_used_space_is_the_union(extents: list[tuple[int, int]]) -> None:
    used = UsedSpace()
    for off, length in extents:
        used.add(off, length)
    runs = used.runs()
    assert runs == merged(extents)
    assert len(used) == len(runs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 9), st.booleans()), max_size=40))
def test_used_space_gives_back_what_it_holds(ops: list[tuple[int, int, bool]]) -> None:
    """Extents added apart (what a writer's pending space is) and some taken out again:
    the union of what is left, byte for byte."""
    used, model = UsedSpace(), set[int]()
    for pos, length, take in ops:
        off = pos * 10
        if take and model:
            held = sorted(model)
            start = held[pos % len(held)]
            n = 1
            while start + n in model and n < length:
                n += 1
            used.remove(start, n)
            model -= set(range(start, start + n))
        elif not model & set(range(off, off + length)):
            used.add(off, length)
            model |= set(range(off, off + length))
    assert used.runs() == merged([(b, 1) for b in model])
    with pytest.raises(ValueError):
        used.remove(10_000, 1)


def test_used_space_follows_runs_not_extents() -> None:
    """A million adjacent chunk extents in any of a few orders are one run (memory)."""
    used = UsedSpace()
    for base in (3 << 30, 0, 1 << 30):
        for i in range(100_000):
            used.add(base + i * 4096, 4096)
    assert used.runs() == [(0, 100_000 * 4096), (1 << 30, 100_000 * 4096),
                           (3 << 30, 100_000 * 4096)]


# -- random histories -----------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.integers(0, 60), st.integers(1, 4)),  # chunks, keep
        st.tuples(st.just("resize"), st.integers(0, 60), st.integers(1, 4)),
        st.tuples(st.just("checkpoint"), st.integers(0, 60), st.just(0)),
        st.tuples(st.just("torn"), st.integers(0, 60), st.integers(1, 4)),
        st.tuples(st.just("pin"), st.integers(0, 10), st.just(0)),
        st.tuples(st.just("unpin"), st.integers(0, 10), st.just(0)),
        st.tuples(st.just("prune"), st.integers(1, 3), st.just(0)),
    ),
    min_size=1,
    max_size=14,
)


class History:
    """An image and what each of its generations (and the checkpoint) must read back as."""

    def __init__(self, path: str, fanout: int, rnd: random.Random) -> None:
        self.img = Image.create(path, chunk_size=CS, fanout=fanout)
        self.rnd = rnd
        self.model: dict[int, bytes] = {}  # generation number -> content
        self.pending: bytes | None = None  # a checkpoint's content (the next push resumes it)
        self.pins: list[tuple[int, Snapshot]] = []

    def newest(self) -> bytes:
        gens = self.img.generations()
        return self.model[gens[-1].number] if gens else b""

    def write(self, tx: Transaction, base: bytes, chunks: int, size: int | None) -> bytes:
        data = bytearray(base)
        if size is not None:
            tx.resize(size)
            data = data[:size].ljust(size, b"\0")
        n = -(-len(data) // CS)
        for _ in range(min(chunks, n) if n else 0):
            c = self.rnd.randrange(n)
            length = min(CS, len(data) - c * CS)
            piece = bytes([self.rnd.randrange(256)]) * length if self.rnd.random() < 0.3 \
                else self.rnd.randbytes(length)
            if self.rnd.random() < 0.15:
                piece = bytes(length)  # a zero chunk stores nothing
            tx.write_chunk(c, piece)
            data[c * CS : c * CS + length] = piece
        return bytes(data)

    def commit(self, chunks: int, keep: int, size: int | None = None, *, torn: bool = False,
               checkpoint: bool = False) -> None:
        img = self.img
        tx = img.begin()
        base = self.pending if self.pending is not None else self.newest()
        if size is None and not base and not img.generations() and self.pending is None:
            size = 8 * CS  # a first push
        data = self.write(tx, base, chunks, size)
        if checkpoint:
            tx.checkpoint()
            tx.abort()  # a push cut short: the next one resumes from the checkpoint
            self.pending = data
            img.refresh()
            return
        if torn:  # power lost after superblock slot 0 was written, before slot 1
            store = tx._store
            real = store.write_head
            slots: list[int] = []

            def write_head(offset: int, blob: bytes) -> None:
                if slots:
                    raise OSError(errno.EIO, "lost power")
                slots.append(offset)
                real(offset, blob)

            store.write_head = write_head
            number = img.table.next_number
            with pytest.raises(Exception, match="Input/output error"):
                tx.commit(keep=keep)
            tx.close()
        else:
            number = tx.commit(keep=keep).number
        self.model[number] = data
        self.pending = None
        img.refresh()

    def check(self) -> None:
        """Every generation, the checkpoint and every pinned zombie read back as written."""
        img = self.img
        img.refresh()
        for g in img.generations():
            with img.snapshot(g.number) as s:
                assert s.read(0, s.size) == self.model[g.number], g.number
        for number, snap in self.pins:
            assert snap.read(0, snap.size) == self.model[number], number

    def close(self) -> None:
        for _n, snap in self.pins:
            snap.close()
        self.img.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops=OPS, fanout=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**32))
def test_used_space_equals_the_old_walk_on_random_histories(
        tmp_path_factory: pytest.TempPathFactory, checked_used: list[int],
        ops: list[tuple[str, int, int]], fanout: int, seed: int) -> None:
    path = str(tmp_path_factory.mktemp("h") / "a.spgz")
    h = History(path, fanout, random.Random(seed))
    checks = len(checked_used)
    try:
        for op, x, y in ops:
            if op == "commit":
                h.commit(x, y)
            elif op == "resize":
                h.commit(x % 8, y, size=x * CS // 3 + x)
            elif op == "checkpoint":
                h.commit(x, 0, checkpoint=True)
            elif op == "torn":
                h.commit(x, y, torn=True)
            elif op == "pin":
                gens = h.img.generations()
                if gens:
                    g = gens[x % len(gens)].number
                    h.pins.append((g, h.img.snapshot(g)))
            elif op == "unpin":
                if h.pins:
                    h.pins.pop(x % len(h.pins))[1].close()
            elif op == "prune" and h.img.generations():
                h.img.prune(x)
                h.img.refresh()
            h.check()
        h.commit(3, 2)  # one more transaction sees the final history
        h.check()
    finally:
        h.close()
    assert len(checked_used) > checks


def test_torn_commit_leaves_the_other_slot_older(tmp_path: Any, checked_used: list[int]) -> None:
    """The history test's torn commit does what it stands for: the two slots name different
    tables, and the next writer keeps the older slot's generations and zombies."""
    h = History(str(tmp_path / "a.spgz"), 4, random.Random(1))
    try:
        for _ in range(3):
            h.commit(4, 2)
        g = h.img.generations()[0].number
        h.pins.append((g, h.img.snapshot(g)))
        h.commit(4, 1, torn=True)
        store = image_mod.FileStore(h.img.store.fd, h.img.path)
        state = image_mod._read_state(store, h.img.path)
        tables = [s.table for s in state.slots if s.table is not None]
        assert len(tables) == 2 and tables[0] != tables[1]
        h.commit(5, 1)
        h.check()
    finally:
        h.close()
