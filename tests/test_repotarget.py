"""Pushing into a repository over the native sync protocol (compression/repotarget.py):
the real SourceSession and serve_target, with a RepoStore as the target's store. Only what
differs from the disk's newest generation travels; chunks another disk already stored are
not stored again; a broken-off push is resumed by deduplication; the source's root is
checked before the generation becomes visible."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from support.swift import BACKENDS, backend_store

from diskrsync.base import merkle
from diskrsync.base.errors import UsageError
from diskrsync.compression.crypto import Envelope, KdfParams, MasterKey
from diskrsync.compression.objstore import DirStore, ObjectStore
from diskrsync.compression.repomaint import usage, verify
from diskrsync.compression.repository import Repository
from diskrsync.compression.repotarget import RepoStore
from diskrsync.compression.sources import open_source
from diskrsync.compression.targets import TargetOptions
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import channel_pair
from diskrsync.synccore.source import PushStats, SourceOptions, SourceSession
from diskrsync.synccore.target import WireStore, serve_target

CHUNK = 128 * 1024

@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    return backend_store(request, tmp_path / "repo", monkeypatch)


def push(repo: Repository, disk: str, src: Path) -> tuple[p.Committed, PushStats]:
    a, b = channel_pair()
    result: dict[str, Any] = {}

    def opener(hello: p.Hello) -> WireStore:
        store = RepoStore(repo, disk, hello.size, TargetOptions(),
                          source=str(hello.info.get("source", "")))
        return WireStore(cast(Any, store), hello)

    def run() -> None:
        try:
            result["committed"] = serve_target(b, opener, verify=True)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    reader = open_source(str(src))
    try:
        stats = SourceSession(a, reader, SourceOptions(info={"name": disk})).run()
    finally:
        reader.close()
        thread.join(60)
    if "error" in result:
        raise result["error"]
    return result["committed"], stats


def make_disk(path: Path, chunks: int, seed: int) -> bytes:
    rng = random.Random(seed)
    data = b"".join(rng.randbytes(CHUNK) if i % 3 == 0 else bytes(CHUNK) if i % 3 == 1
                    else (f"{i} text {rng.random()}\n" * 6000).encode()[:CHUNK]
                    for i in range(chunks))[:-777]
    path.write_bytes(data)
    return data


def read_all(repo: Repository, disk: str, number: int | None = None) -> bytes:
    snap = repo.snapshot(disk, number)
    return snap.read(0, snap.size)


def test_pushes_send_only_what_changed(store: ObjectStore, tmp_path: Path) -> None:
    repo = Repository.init(store)
    src = tmp_path / "disk.img"
    one = make_disk(src, 48, 1)
    committed, stats = push(repo, "vm", src)
    assert committed.generation == 1 and stats.chunks_differing == 32  # all but zeros
    leaves = [merkle.leaf_hash(one[i : i + CHUNK]) for i in range(0, len(one), CHUNK)]
    assert committed.root == merkle.tree_root(len(one), CHUNK, 128, leaves)
    assert read_all(Repository.open(store), "vm") == one

    two = bytearray(one)
    two[3 * CHUNK + 5] ^= 1
    two[30 * CHUNK + 9] ^= 1
    src.write_bytes(bytes(two))
    before = usage(repo).stored_bytes
    committed, stats = push(Repository.open(store), "vm", src)
    assert committed.generation == 2 and stats.chunks_differing == 2
    assert usage(repo).stored_bytes - before < 3 * CHUNK + 64 * 1024  # two chunks, a page
    repo = Repository.open(store)
    assert read_all(repo, "vm", 2) == bytes(two) and read_all(repo, "vm", 1) == one
    assert verify(repo).ok


@pytest.mark.inproc
def test_a_second_disk_with_the_same_content_stores_nothing_new(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    store = DirStore(str(tmp_path / "repo"))
    repo = Repository.init(store)
    src = tmp_path / "disk.img"
    data = make_disk(src, 30, 2)
    push(repo, "template", src)
    before = usage(repo).stored_bytes
    _committed, stats = push(Repository.open(store), "clone", src)
    assert stats.chunks_differing == 20  # the protocol compares with this disk: none yet
    assert usage(repo).stored_bytes == before  # but the repository has every chunk and page
    assert read_all(Repository.open(store), "clone") == data


@pytest.mark.inproc
def test_an_encrypted_repository_is_refused_for_now(tmp_path: Path) -> None:
    key = MasterKey.generate()
    repo = Repository.init(DirStore(str(tmp_path)), key=key,
                           envelope=Envelope.wrap(key, b"pw", KdfParams(1024, 1, 1)))
    with pytest.raises(UsageError, match="encrypted"):
        RepoStore(repo, "vm", 0, TargetOptions())
