"""Repository maintenance (compression/repomaint.py): verify names what a missing or
damaged pack affects; prune removes generations, repacks, condemns and, a grace period
later, deletes, never under a reader; usage figures show the deduplication."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from support.swift import BACKENDS, backend_store

from diskrsync.base.errors import BusyError
from diskrsync.compression.objstore import DirStore, ObjectStore
from diskrsync.compression.repomaint import prune, usage, verify
from diskrsync.compression.repository import GenerationInfo, Lease, Repository

CHUNK = 16 * 1024
PACK = 64 * 1024

@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    return backend_store(request, tmp_path, monkeypatch)


@pytest.fixture
def dirstore(tmp_path: Path) -> ObjectStore:
    return DirStore(str(tmp_path))


def data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n * CHUNK)


def push(repo: Repository, disk: str, content: bytes) -> int:
    with repo.writer(disk) as w:
        w.begin(len(content))
        for i in range(0, len(content), CHUNK):
            w.put_chunk(i // CHUNK, content[i : i + CHUNK])
        return w.commit().number


def read(repo: Repository, disk: str, number: int | None = None) -> bytes:
    snap = repo.snapshot(disk, number)
    return snap.read(0, snap.size)


def objects(store: ObjectStore) -> dict[str, int]:
    return {o.key: o.size for o in store.list("") if not o.key.startswith("locks/")}


def gen(repo: Repository, disk: str, number: int) -> GenerationInfo:
    return next(g for g in repo.generations(disk) if g.number == number)


def new_repo(store: ObjectStore) -> Repository:
    return Repository.init(store, chunk_size=CHUNK, fanout=8, pack_size=PACK)


def test_verify_names_the_generations_a_damaged_or_missing_pack_affects(
        store: ObjectStore) -> None:
    repo = new_repo(store)
    shared = data(8, 1)
    push(repo, "a", shared + data(8, 2))
    push(repo, "b", data(8, 3) + shared)
    push(repo, "a", data(16, 4))
    report = verify(Repository.open(store))
    assert report.ok and report.generations == 3 and report.blobs > 40
    # a chunk shared by a1 and b1
    snap = repo.snapshot("a", 1)
    loc = repo.index()[snap.leaf(2)]
    key = f"packs/{loc.pack.hex()[:2]}/{loc.pack.hex()}"
    raw = bytearray(store.get(key))
    raw[loc.offset + 7] ^= 0x40
    store.put(key, bytes(raw))
    report = verify(Repository.open(store))
    affected = set(report.affected)
    assert ("a", 1) in affected and ("b", 1) in affected and ("a", 2) not in affected
    assert any("content hash mismatch" in why or "does not" in why
               for why in report.affected[("a", 1)])
    store.delete(key)
    report = verify(Repository.open(store))
    assert {"a", "b"} == {d for d, _ in report.affected}
    assert any("is missing" in why for why in report.affected[("a", 1)])
    assert ("a", 2) not in report.affected


def test_prune_condemns_then_deletes_after_the_grace_period(store: ObjectStore) -> None:
    repo = new_repo(store)
    first, second = data(20, 5), data(20, 6)
    push(repo, "vm", first)
    push(repo, "vm", second)
    before = usage(repo)
    state = objects(store)
    dry = prune(repo, [gen(repo, "vm", 1)], dry_run=True, grace=0)
    assert objects(store) == state  # nothing changed
    report = prune(repo, [gen(repo, "vm", 1)], grace=0)
    assert report.condemned == dry.condemned > 0 and report.deleted == 0
    assert [g.number for g in repo.generations("vm")] == [2]
    again = prune(Repository.open(store), [], grace=0)
    assert again.deleted == report.condemned and again.waiting == 0
    repo = Repository.open(store)
    assert read(repo, "vm") == second
    assert verify(repo).ok
    after = usage(repo)
    assert after.generations == 1 and after.stored_bytes < before.stored_bytes * 0.6


@pytest.mark.inproc
def test_dry_run_changes_nothing(dirstore: ObjectStore) -> None:
    repo = new_repo(dirstore)
    push(repo, "vm", data(10, 1))
    push(repo, "vm", data(10, 2))
    state = objects(dirstore)
    report = prune(repo, [gen(repo, "vm", 1)], dry_run=True, grace=0)
    assert report.dry_run and report.condemned > 0 and report.removed == [("vm", 1)]
    assert objects(dirstore) == state


@pytest.mark.inproc
def test_a_reader_keeps_its_packs_past_the_grace_period(dirstore: ObjectStore) -> None:
    repo = new_repo(dirstore)
    old = data(12, 7)
    push(repo, "vm", old)
    push(repo, "vm", data(12, 8))
    with Repository.open(dirstore).pin("vm", 1) as reader:
        reader.leaves()
        first = prune(repo, [gen(repo, "vm", 1)], grace=0)
        assert first.condemned > 0
        second = prune(Repository.open(dirstore), [], grace=0)
        assert second.deleted == 0 and second.waiting == first.condemned
        assert reader.read(0, reader.size) == old  # the pruned generation still reads
    third = prune(Repository.open(dirstore), [], grace=0)
    assert third.deleted == first.condemned


@pytest.mark.inproc
def test_partly_used_packs_are_repacked(dirstore: ObjectStore) -> None:
    repo = new_repo(dirstore)
    one = bytearray(data(32, 9))
    push(repo, "vm", bytes(one))
    two = bytearray(one)
    for i in range(0, 32, 2):  # half the chunks change: every pack of gen 1 half used
        two[i * CHUNK : i * CHUNK + 8] = b"CHANGED!"
    push(repo, "vm", bytes(two))
    report = prune(repo, [gen(repo, "vm", 1)], grace=0)
    assert report.repacked > 0 and report.repacked_bytes > 0
    prune(Repository.open(dirstore), [], grace=0)
    repo = Repository.open(dirstore)
    assert read(repo, "vm") == bytes(two)
    assert verify(repo).ok
    u = usage(repo)
    assert u.stored_bytes < 1.5 * 32 * CHUNK  # the dead halves are gone


class StageRecorder:
    def __init__(self) -> None:
        self.stages: list[tuple[str, int, str, int]] = []  # desc, total, unit, done

    def stage(self, desc: str, total: int, unit: str = "B") -> None:
        self.stages.append((desc, total, unit, 0))

    def update(self, n: int, sent: int | None = None) -> None:
        desc, total, unit, done = self.stages[-1]
        self.stages[-1] = (desc, total, unit, done + n)


@pytest.mark.inproc
def test_prune_reports_each_step_up_to_its_total(dirstore: ObjectStore) -> None:
    """Marking, repacking and deleting each report progress that reaches their totals (a
    prune of a large repository ran without a word until its table)."""
    repo = new_repo(dirstore)
    one = bytearray(data(32, 9))
    push(repo, "vm", bytes(one))
    two = bytearray(one)
    for i in range(0, 32, 2):
        two[i * CHUNK : i * CHUNK + 8] = b"CHANGED!"
    push(repo, "vm", bytes(two))
    push(repo, "vm", bytes(two[::-1]))
    first = StageRecorder()
    report = prune(repo, [gen(repo, "vm", 1)], grace=0, progress=first)
    steps = {desc: (total, unit, done) for desc, total, unit, done in first.stages}
    assert steps["prune: marking"] == (2, "generations", 2)
    assert steps["prune: repacking"] == (report.repacked_bytes, "B", report.repacked_bytes) \
        and report.repacked_bytes > 0
    second = StageRecorder()
    again = prune(Repository.open(dirstore), [], grace=0, progress=second)
    assert again.deleted > 0
    deleting = [s for s in second.stages if s[0] == "prune: deleting"]
    assert deleting == [("prune: deleting", again.deleted, "packs", again.deleted)]


@pytest.mark.inproc
def test_prune_and_writers_exclude_each_other(dirstore: ObjectStore) -> None:
    repo = new_repo(dirstore)
    push(repo, "vm", data(4, 1))
    with repo.writer("vm"), pytest.raises(BusyError, match="write lock on disk vm"):
        prune(repo, [])
    with Lease(dirstore, "prune", None), pytest.raises(BusyError, match="prune lock"):
        repo.writer("other").__enter__()


@pytest.mark.inproc
def test_packs_of_a_killed_push_are_collected(dirstore: ObjectStore) -> None:
    repo = new_repo(dirstore)
    push(repo, "vm", data(4, 1))
    with repo.writer("vm") as w:  # killed before its index object and manifest
        w.packer.packs_per_index = 1000
        w.begin(16 * CHUNK)
        for i in range(16):
            w.put_chunk(i, data(1, 100 + i))
        w.packer.wait()
    orphans = [k for k in objects(dirstore) if k.startswith("packs/")]
    first = prune(Repository.open(dirstore), [], grace=0)
    assert first.condemned >= 3
    second = prune(Repository.open(dirstore), [], grace=0)
    assert second.deleted == first.condemned
    assert len([k for k in objects(dirstore) if k.startswith("packs/")]) < len(orphans)
    assert verify(Repository.open(dirstore)).ok


@pytest.mark.inproc
def test_usage_shows_deduplication(dirstore: ObjectStore) -> None:
    repo = new_repo(dirstore)
    base = data(16, 3)
    for n in range(4):
        clone = bytearray(base)
        clone[n * CHUNK] ^= 1
        push(repo, f"vm{n}", bytes(clone))
    u = usage(Repository.open(dirstore))
    assert u.disks == 4 and u.generations == 4
    assert u.logical_bytes == 4 * 16 * CHUNK
    assert u.stored_bytes < 1.4 * 16 * CHUNK  # one copy plus four changed chunks and pages
