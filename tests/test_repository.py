"""Deduplicating repositories (compression/repository.py, docs/repository.md) on both
backends: a local directory and a real S3 service (tests/support/swift.py). Writing and
reading generations, deduplication across generations and disks, encryption, damage found,
leases, resuming a killed push, two writers of one generation number."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.swift import BACKENDS, Fault, FaultProxy, SwiftServer, backend_store, credentials

from diskrsync.base import merkle
from diskrsync.base.errors import BusyError, CorruptChunkError, DataError, UsageError
from diskrsync.compression.api import DiskImage, DiskSnapshot
from diskrsync.compression.crypto import Envelope, KdfParams, Keyring, MasterKey
from diskrsync.compression.image import Image
from diskrsync.compression.importer import write_new_image
from diskrsync.compression.objstore import DirStore, ObjectStore, S3Store
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repository import (
    GenerationInfo,
    Lease,
    RepoConfig,
    RepoDisk,
    Repository,
    RepoSource,
    check_disk_name,
    list_locks,
)

CHUNK = 16 * 1024
FANOUT = 4  # small, so that a small disk has three levels of pages
PACK = 64 * 1024
PASS = b"repository test passphrase"

@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    return backend_store(request, tmp_path, monkeypatch)


def disk(n: int, seed: int = 1, size: int | None = None) -> bytes:
    """A disk of n chunks: random, text-like and zero chunks mixed, a short last chunk."""
    rng = random.Random(seed)
    parts = []
    for i in range(n):
        k = i % 3
        parts.append(rng.randbytes(CHUNK) if k == 0 else bytes(CHUNK) if k == 1 else
                     (f"line {i} {rng.random()}\n" * 2000).encode()[:CHUNK])
    data = b"".join(parts)
    return data[: size if size is not None else len(data) - 1000]


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def push(repo: Repository, name: str, data: bytes, *, base: bool = False,
         only: list[int] | None = None) -> tuple[int, dict[str, int]]:
    with repo.writer(name) as w:
        w.begin(len(data), repo.snapshot(name) if base else None)
        for i, c in enumerate(chunks_of(data)):
            if only is None or i in only:
                w.put_chunk(i, c)
        m = w.commit(source=f"/dev/{name}")
        return m.number, dict(w.stats)


def read_all(repo: Repository, name: str, number: int | None = None) -> bytes:
    snap = repo.snapshot(name, number)
    return snap.read(0, snap.size)


def new_repo(store: ObjectStore, **kw: object) -> Repository:
    return Repository.init(store, chunk_size=CHUNK, fanout=FANOUT, pack_size=PACK, **kw)


def test_write_and_read_back_generations(store: ObjectStore) -> None:
    repo = new_repo(store)
    one = disk(40)
    number, stats = push(repo, "vm1", one)
    assert number == 1 and stats["packs"] >= 3
    repo = Repository.open(store)  # a fresh reader: nothing cached
    assert repo.disks() == ["vm1"]
    assert read_all(repo, "vm1") == one
    snap = repo.snapshot("vm1")
    # the generation's root is an image's root for the same bytes (plain repository)
    leaves = [merkle.leaf_hash(c) for c in chunks_of(one)]
    assert snap.manifest.root == merkle.tree_root(len(one), CHUNK, FANOUT, leaves)
    assert snap.read(CHUNK - 10, 30) == one[CHUNK - 10 : CHUNK + 20]
    assert snap.read(len(one) - 5, 100) == one[-5:]
    assert snap.manifest.source == "/dev/vm1"

    # change two chunks on top of generation 1: only they (and pages above them) are stored
    two = bytearray(one)
    two[3 * CHUNK : 3 * CHUNK + 5] = b"HELLO"
    two[30 * CHUNK : 30 * CHUNK + 5] = b"WORLD"
    number, stats = push(repo, "vm1", bytes(two), base=True, only=[3, 30])
    assert number == 2 and stats["chunks_stored"] == 2
    assert read_all(repo, "vm1", 1) == one and read_all(repo, "vm1", 2) == bytes(two)
    assert [g.number for g in repo.generations("vm1")] == [1, 2]


def test_deduplication_across_disks(store: ObjectStore) -> None:
    repo = new_repo(store)
    base = disk(30, seed=7)
    push(repo, "template", base)
    clone = bytearray(base)
    clone[6 * CHUNK] ^= 1
    _, stats = push(repo, "clone", bytes(clone))
    assert stats["chunks_stored"] == 1  # the one changed chunk
    assert stats["chunks_deduplicated"] >= 18
    assert read_all(Repository.open(store), "clone") == bytes(clone)
    assert Repository.open(store).disks() == ["clone", "template"]


def test_empty_and_grown_disks(store: ObjectStore) -> None:
    repo = new_repo(store)
    push(repo, "empty", b"")
    assert read_all(repo, "empty") == b""
    small = disk(3, size=2 * CHUNK + 7)
    push(repo, "grow", small)
    bigger = small + b"\1" * (3 * CHUNK)
    with repo.writer("grow") as w:  # the short last chunk grows: it must be written again
        w.begin(len(bigger), repo.snapshot("grow"))
        for i in range(2, 6):
            w.put_chunk(i, bigger[i * CHUNK : (i + 1) * CHUNK])
        w.commit()
    assert read_all(repo, "grow") == bigger and read_all(repo, "grow", 1) == small


def test_encrypted_repository(store: ObjectStore, tmp_path: Path) -> None:
    key = MasterKey.generate()
    env = Envelope.wrap(key, PASS, KdfParams(1024, 1, 1))
    repo = new_repo(store, key=key, envelope=env)
    secret = b"TOP SECRET CONTENT " * (CHUNK // 19 + 1)
    data = secret[:CHUNK] + disk(10, seed=3, size=10 * CHUNK)
    push(repo, "vm", data)
    for obj in store.list(""):  # neither the data nor the source path is visible
        raw = store.get(obj.key)
        assert b"TOP SECRET" not in raw and b"/dev/vm" not in raw
    with pytest.raises(UsageError, match="needs its key"):
        Repository.open(store)
    with pytest.raises(UsageError, match="wrong passphrase"):
        Repository.open(store, Keyring(lambda why, new: b"wrong"))
    repo = Repository.open(store, Keyring(lambda why, new: PASS))
    assert read_all(repo, "vm") == data
    # equal chunks still deduplicate, at other positions and in other disks
    _, stats = push(repo, "vm2", data[CHUNK:] + data[:CHUNK])
    assert stats["chunks_stored"] == 0
    # a manifest moved to another disk's name does not open there
    gen = repo.generations("vm")[0]
    store.put(f"disks/vm3/{gen.key.rsplit('/', 1)[1]}", store.get(gen.key))
    with pytest.raises(DataError, match="does not authenticate"):
        Repository.open(store, Keyring(lambda why, new: PASS)).snapshot("vm3")


def test_a_damaged_or_missing_pack_fails_only_its_chunks(store: ObjectStore) -> None:
    repo = new_repo(store)
    data = disk(40, seed=5)
    push(repo, "vm", data)
    snap = Repository.open(store).snapshot("vm")
    snap.leaves()
    index = snap.repo.index()
    loc = index[snap.leaf(6)]  # chunk 6: random data
    victim = f"packs/{loc.pack.hex()[:2]}/{loc.pack.hex()}"
    raw = bytearray(store.get(victim))
    raw[loc.offset + 100] ^= 0xFF
    store.put(victim, bytes(raw))
    with pytest.raises(CorruptChunkError, match=r"chunk 6 .*disk vm generation 1"):
        snap.read_chunk(6)
    in_other_packs = [i for i in range(0, 40, 3) if index[snap.leaf(i)].pack != loc.pack]
    assert in_other_packs
    for i in in_other_packs:
        assert snap.read_chunk(i) == data[i * CHUNK : (i + 1) * CHUNK]
    assert snap.read_chunk(1) == bytes(CHUNK)  # zeros need no pack
    store.delete(victim)
    with pytest.raises(DataError, match=r"pack .* is missing"):
        snap.read_chunk(6)


def test_damaged_objects_are_data_errors(store: ObjectStore) -> None:
    repo = new_repo(store)
    push(repo, "vm", disk(9))
    gen = repo.generations("vm")[0]
    raw = bytearray(store.get(gen.key))
    raw[10] ^= 1
    store.put(gen.key, bytes(raw))
    with pytest.raises(DataError, match="damaged"):
        repo.snapshot("vm")
    cfg = bytearray(store.get("config"))
    cfg[cfg.index(b"131072") if b"131072" in cfg else cfg.index(b"16384")] = ord("9")
    store.put("config", bytes(cfg))
    with pytest.raises(DataError, match="config is damaged"):
        Repository.open(store)


@pytest.mark.inproc
def test_config_and_names(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path))
    with pytest.raises(UsageError, match="not a diskrsync repository"):
        Repository.open(store)
    new_repo(store)
    with pytest.raises(UsageError, match="already holds a repository"):
        new_repo(store)
    for bad in ("", ".hidden", "a/b", "x" * 129, "sp ace"):
        with pytest.raises(UsageError, match="bad disk name"):
            check_disk_name(bad)
    assert check_disk_name("vm-01.disk_a") == "vm-01.disk_a"
    raw = RepoConfig("x", CHUNK, FANOUT, PACK).encode()
    doc = json.loads(raw)
    doc["version"] = 2
    with pytest.raises(DataError, match="version 2"):
        RepoConfig.decode(json.dumps(doc).encode(), "c")


def test_one_writer_per_disk(store: ObjectStore) -> None:
    repo = new_repo(store)
    with repo.writer("vm") as w:
        with pytest.raises(BusyError, match=r"write lock on disk vm held by pid \d+"):
            repo.writer("vm").__enter__()
        with repo.writer("other") as w2:  # other disks never conflict
            w2.begin(0)
            w2.commit()
        w.begin(CHUNK)
        w.put_chunk(0, b"x" * CHUNK)
        w.commit()
    assert [k.kind for k in list_locks(store)] == []  # released
    with repo.writer("vm") as w:  # free again
        w.begin(0)
        w.commit()
    assert [g.number for g in repo.generations("vm")] == [1, 2]


@pytest.mark.inproc
def test_stale_locks_are_ignored_and_leases_refresh(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path))
    repo = new_repo(store)
    old = time.time() - 3600
    store.put("locks/dead", json.dumps({"kind": "write", "disk": "vm", "host": "gone",
                                        "pid": 1, "created": old, "refreshed": old,
                                        "lease": 600}).encode())
    with repo.writer("vm", lease=0.5) as w:
        assert store.head("locks/dead") is None  # removed by whoever finds it
        first = json.loads(store.get(w.lease.info.key))["refreshed"]
        deadline = time.monotonic() + 30
        while json.loads(store.get(w.lease.info.key))["refreshed"] == first:
            assert time.monotonic() < deadline, "the lease was never refreshed"
            time.sleep(0.05)
        time.sleep(0.6)  # longer than the lease: refreshed meanwhile, so still held
        w.begin(0)
        w.commit()


def test_a_killed_push_is_resumed_by_deduplication(store: ObjectStore) -> None:
    repo = new_repo(store)
    data = disk(60, seed=11)
    with repo.writer("vm") as w:
        w.packer.packs_per_index = 2
        w.begin(len(data))
        for i, c in enumerate(chunks_of(data)[:45]):
            w.put_chunk(i, c)
        w.packer.wait()
        # killed here: no commit, no manifest
    repo = Repository.open(store)
    assert repo.generations("vm") == []
    indexed = len(repo.index())
    assert indexed > 0
    _, stats = push(repo, "vm", data)
    assert stats["chunks_deduplicated"] >= 10  # what the killed push's index objects name
    assert read_all(Repository.open(store), "vm") == data


@pytest.mark.inproc
def test_two_commits_of_one_number_keep_both(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer whose lease failed it (a listing that lagged) commits the number another
    took first: both generations stay, the later one renumbered."""
    store = DirStore(str(tmp_path))
    repo = new_repo(store)
    a, b = disk(5, seed=1), disk(5, seed=2)
    with repo.writer("vm") as wb:
        wb.session = "f" * 16  # larger than any other session id
        wb.begin(len(b))
        for i, c in enumerate(chunks_of(b)):
            wb.put_chunk(i, c)
        # another writer commits generation 1 meanwhile, unseen by wb's lease
        real = Repository.generations
        with Repository.writer(repo, "other") as wa:
            wa.disk = "vm"
            wa.session = "0" * 16
            wa.begin(len(a))
            for i, c in enumerate(chunks_of(a)):
                wa.put_chunk(i, c)
            calls = {"n": 0}

            def lagging(self: Repository, name: str) -> list[GenerationInfo]:
                calls["n"] += 1
                return [] if calls["n"] == 1 else real(self, name)

            wa.commit()
            monkeypatch.setattr(Repository, "generations", lagging)
            m = wb.commit()
            monkeypatch.setattr(Repository, "generations", real)
    assert m.number == 2
    gens = repo.generations("vm")
    assert [(g.number, g.session) for g in gens] == [(1, "0" * 16), (2, "f" * 16)]
    assert read_all(repo, "vm", 1) == a and read_all(repo, "vm", 2) == b


@pytest.mark.process
@pytest.mark.s3
def test_through_5xx_and_slow_answers(swift: SwiftServer, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    credentials(monkeypatch)
    bucket = swift.new_bucket()
    port = int(swift.endpoint.rsplit(":", 1)[1])
    rng = random.Random(3)

    def chaos(method: str, path: str) -> Fault | None:
        r = rng.random()
        return Fault(status=503) if r < 0.15 else Fault(delay=0.2) if r < 0.2 else None

    with FaultProxy(("127.0.0.1", port), chaos) as proxy:
        store = S3Store(bucket, "r", swift.options(proxy.endpoint))
        repo = new_repo(store)
        data = disk(30, seed=9)
        push(repo, "vm", data)
        assert read_all(Repository.open(store), "vm") == data
        assert proxy.faults > 0


@pytest.mark.inproc
def test_write_disk_stores_only_what_changed(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path))
    repo = new_repo(store)
    one = disk(50, seed=21)
    m, stats = write_disk(repo, "vm", lambda off, n: one[off : off + n], len(one))
    assert m.number == 1 and stats["chunks_stored"] == 33  # 17 of the 50 are zeros
    two = bytearray(one)
    two[9 * CHUNK] ^= 0xFF
    m, stats = write_disk(repo, "vm", lambda off, n: bytes(two[off : off + n]), len(two))
    assert (m.number, stats["chunks_stored"], stats["chunks_deduplicated"]) == (2, 1, 0)
    assert read_all(Repository.open(store), "vm") == bytes(two)
    assert read_all(Repository.open(store), "vm", 1) == one


@pytest.mark.process
def test_a_dead_local_owner_makes_its_lock_stale(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path))
    repo = new_repo(store)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lease = Lease(store, "write", "vm")
    store.put("locks/dead", json.dumps({
        "kind": "write", "disk": "vm", "host": lease.info.host, "pid": proc.pid,
        "started": 12345, "created": time.time() - 5, "refreshed": time.time(),
        "lease": 600}).encode())
    with repo.writer("vm") as w:  # not busy: that process is gone
        w.begin(0)
        w.commit()
    alive = dict(json.loads(store.get(f"{lease.acquire().info.key}")))
    lease.release()
    store.put("locks/alive", json.dumps({**alive, "created": time.time() - 5}).encode())
    with pytest.raises(BusyError):  # this very process, started when it says: alive
        repo.writer("vm").__enter__()


@pytest.mark.inproc
def test_an_encrypted_repository_rolled_back_is_refused(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path))
    key = MasterKey.generate()
    repo = new_repo(store, key=key, envelope=Envelope.wrap(key, PASS, KdfParams(1024, 1, 1)))
    push(repo, "vm", disk(4, seed=1))
    push(repo, "vm", disk(4, seed=2))
    reader = Repository.open(store, Keyring(lambda why, new: PASS))
    assert reader.snapshot("vm").manifest.number == 2
    newest = reader.generations("vm")[-1]
    saved = store.get(newest.key)
    store.delete(newest.key)  # the store drops the newest generation
    with pytest.raises(DataError, match=r"rolled back.*seen generation 2"):
        Repository.open(store, Keyring(lambda why, new: PASS)).snapshot("vm", 1)
    store.put(newest.key, saved)
    assert Repository.open(store, Keyring(lambda why, new: PASS)).snapshot("vm").size


@pytest.mark.inproc
def test_a_lease_not_refreshed_in_time_is_lost(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path))
    now = [1000.0]
    lease = Lease(store, "write", "vm", lease=60, clock=lambda: now[0]).acquire()
    try:
        lease.check()
        now[0] += 61  # the refresh thread never got to write (a paused process)
        with pytest.raises(BusyError, match="lost the repository lock"):
            lease.check()
    finally:
        lease.release()


@pytest.mark.inproc
def test_a_generation_as_a_source(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path / "r"))
    (tmp_path / "r").mkdir()
    repo = new_repo(store)
    data = disk(30, seed=4)  # every third chunk zeros, a short last chunk
    push(repo, "vm", data)
    src = RepoSource(repo.pin("vm"))
    try:
        assert src.size == len(data) and "disk vm generation 1" in src.description
        assert src.read(5000, 70000) == data[5000:75000]
        extents = list(src.extents())
        assert extents[0] == (0, CHUNK) and extents[1] == (2 * CHUNK, 2 * CHUNK)
        covered = bytearray(len(data))
        for off, n in extents:
            covered[off : off + n] = data[off : off + n]
        assert bytes(covered) == data  # everything outside the extents is zeros
        with pytest.raises(UsageError, match="past the end"):
            src.read(len(data) - 10, 20)
        image = tmp_path / "restored.spgz"
        write_new_image(src.read, src.size, str(image), chunk_size=CHUNK)
        with Image.open(str(image)) as img:
            snap = img.snapshot()
            assert snap.read(0, len(data)) == data
            snap.close()
    finally:
        src.close()
    assert list_locks(store) == []  # the read lease went with it


@pytest.mark.inproc
def test_a_long_lived_reader_sees_newer_generations(tmp_path: Path) -> None:
    store = DirStore(str(tmp_path))
    repo = new_repo(store)
    push(repo, "vm", disk(6, seed=1))
    reader = Repository.open(store)
    assert read_all(reader, "vm") == disk(6, seed=1)  # its index is loaded now
    push(repo, "vm", disk(6, seed=2))  # new packs and index objects it has not seen
    assert read_all(reader, "vm") == disk(6, seed=2)


@pytest.mark.inproc
def test_a_repository_disk_through_the_read_api(tmp_path: Path) -> None:
    """What the mount, restore and verify use: api.DiskImage / DiskSnapshot."""
    store = DirStore(str(tmp_path))
    repo = new_repo(store)
    one, two = disk(9, seed=1), disk(12, seed=2)
    push(repo, "vm", one)
    push(repo, "vm", two)
    image: DiskImage = RepoDisk(Repository.open(store), "vm")
    gens = image.generations()
    assert [(g.number, g.size, g.source) for g in gens] == [(1, len(one), "/dev/vm"),
                                                            (2, len(two), "/dev/vm")]
    snap: DiskSnapshot = image.snapshot(1)
    try:
        assert snap.info.root_hash == gens[0].root_hash and snap.chunk_count == 9
        assert snap.chunk_is_zero(1) and not snap.chunk_is_zero(0)
        assert snap.read_chunk(8) == one[8 * CHUNK :]
        assert snap.read(0, len(one) + 100) == one
        assert [k.kind for k in list_locks(store)] == ["read"]  # pinned
    finally:
        snap.close()
    assert list_locks(store) == []
    push(repo, "vm", disk(3, seed=3))
    image.refresh()
    assert len(image.generations()) == 3
    image.close()
