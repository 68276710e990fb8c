"""Copying a disk with its generations between repositories (compression/repocopy.py):
only what the destination lacks is sent, a second copy sends nothing, generations keep
their order, times and sources, plain and encrypted repositories copy into each other, and
a damaged source blob is never copied."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from support.swift import SwiftServer, credentials

from diskrsync.base.errors import CorruptChunkError, UsageError
from diskrsync.compression.crypto import Envelope, KdfParams, Keyring, MasterKey
from diskrsync.compression.objstore import DirStore, S3Store
from diskrsync.compression.repocopy import copy_disk
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repomaint import verify
from diskrsync.compression.repository import Repository

CHUNK = 16 * 1024
PASS = b"copy test"


def new(path: Path, key: MasterKey | None = None) -> Repository:
    path.mkdir()
    env = Envelope.wrap(key, PASS, KdfParams(1024, 1, 1)) if key else None
    return Repository.init(DirStore(str(path)), chunk_size=CHUNK, fanout=8,
                           pack_size=64 * 1024, key=key, envelope=env)


def content(seed: int, n: int = 40) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(CHUNK) if i % 3 else bytes(CHUNK) for i in range(n))


def push(repo: Repository, disk: str, data: bytes) -> None:
    write_disk(repo, disk, lambda off, n: data[off : off + n], len(data), source=f"/src/{disk}")


def read(repo: Repository, disk: str, number: int | None = None) -> bytes:
    snap = repo.snapshot(disk, number)
    return snap.read(0, snap.size)


@pytest.mark.inproc
def test_copy_sends_only_what_the_destination_lacks(tmp_path: Path) -> None:
    src, dst = new(tmp_path / "src"), new(tmp_path / "dst")
    one = content(1)
    two = bytearray(one)
    two[5 * CHUNK] ^= 1
    push(src, "vm", one)
    push(src, "vm", bytes(two))
    push(dst, "other", one)  # the destination has generation 1's chunks already
    report = copy_disk(src, dst, "vm")
    assert report.copied == [1, 2] and report.blobs_sent == 1  # the one changed chunk
    assert read(dst, "vm", 1) == one and read(dst, "vm", 2) == bytes(two)
    m_src, m_dst = src.generation("vm", 2), dst.generation("vm", 2)
    assert (m_dst.root, m_dst.time, m_dst.source) == (m_src.root, m_src.time, m_src.source)
    again = copy_disk(src, dst, "vm")
    assert again.copied == [] and again.skipped == 2
    push(src, "vm", content(3))
    assert copy_disk(src, dst, "vm").copied == [3]
    assert verify(dst).ok
    with pytest.raises(UsageError, match="same disk"):
        copy_disk(src, src, "vm")


@pytest.mark.inproc
def test_copy_between_plain_and_encrypted(tmp_path: Path) -> None:
    plain = new(tmp_path / "plain")
    key = MasterKey.generate()
    enc = new(tmp_path / "enc", key)
    data = content(5)
    push(plain, "vm", data)
    report = copy_disk(plain, enc, "vm")
    assert report.copied == [1]
    enc = Repository.open(DirStore(str(tmp_path / "enc")), Keyring(lambda w, n: PASS))
    assert read(enc, "vm") == data
    back = new(tmp_path / "back")
    copy_disk(enc, back, "vm", dst_disk="restored")
    assert read(back, "restored") == data
    assert back.generation("restored").root == plain.generation("vm").root


@pytest.mark.inproc
def test_a_damaged_blob_is_not_copied(tmp_path: Path) -> None:
    src, dst = new(tmp_path / "src"), new(tmp_path / "dst")
    push(src, "vm", content(7))
    snap = src.snapshot("vm")
    loc = src.index()[snap.leaf(2)]
    path = tmp_path / "src" / "packs" / loc.pack.hex()[:2] / loc.pack.hex()
    raw = bytearray(path.read_bytes())
    raw[loc.offset + 9] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match="chunk 2 "):
        copy_disk(src, dst, "vm")
    assert dst.generations("vm") == []


@pytest.mark.process
@pytest.mark.s3
def test_copy_to_s3(tmp_path: Path, swift: SwiftServer,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    src = new(tmp_path / "src")
    data = content(9)
    push(src, "vm", data)
    store = S3Store(swift.new_bucket(), "offsite", swift.options())
    dst = Repository.init(store, chunk_size=CHUNK, fanout=8, pack_size=64 * 1024)
    assert copy_disk(src, dst, "vm").copied == [1]
    assert read(Repository.open(store), "vm") == data
