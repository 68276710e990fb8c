"""The repository's local blob cache (compression/blobcache.py): bounded, least recently
used out first, shared by later runs, and a damaged cache file is never served."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from diskrsync.base.errors import CorruptChunkError
from diskrsync.compression.blobcache import BlobCache
from diskrsync.compression.objstore import DirStore
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repository import Repository

CHUNK = 16 * 1024


@pytest.mark.inproc
def test_bounded_least_recently_used_first(tmp_path: Path) -> None:
    cache = BlobCache(str(tmp_path / "c"), 3000)
    ids = [bytes([i]) * 32 for i in range(4)]
    for bid in ids[:3]:
        cache.put(bid, b"x" * 1000)
    assert cache.get(ids[0]) == b"x" * 1000  # now the most recently used
    cache.put(ids[3], b"y" * 1000)  # evicts ids[1], the least recently used
    assert cache.get(ids[1]) is None and cache.get(ids[0]) is not None
    assert cache.total == 3000
    cache.put(b"\x09" * 32, b"z" * 5000)  # larger than the whole cache: not kept
    assert cache.get(b"\x09" * 32) is None
    again = BlobCache(str(tmp_path / "c"), 2000)  # a later run finds and bounds them
    assert again.total == 2000
    assert sum(again.get(b) is not None for b in ids) == 2


@pytest.mark.inproc
def test_reads_through_the_cache_and_never_serve_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    store = DirStore(str(tmp_path / "r"))
    repo = Repository.init(store, chunk_size=CHUNK, fanout=8, pack_size=64 * 1024)
    data = random.Random(1).randbytes(20 * CHUNK)
    write_disk(repo, "vm", lambda off, n: data[off : off + n], len(data))

    def reader() -> Repository:
        r = Repository.open(store)
        r.cache = BlobCache(str(tmp_path / "cache"), 10 << 20)
        return r

    snap = reader().snapshot("vm")
    assert snap.read(0, snap.size) == data
    cache = snap.repo.cache
    assert cache is not None and cache.misses > 20 and cache.total > 20 * CHUNK
    # a second reader takes everything from the cache, even with the packs gone
    for obj in list(store.list("packs/")):
        store.put(f"saved/{obj.key}", store.get(obj.key))
        store.delete(obj.key)
    snap2 = reader().snapshot("vm")
    assert snap2.read(0, snap2.size) == data
    assert snap2.repo.cache is not None and snap2.repo.cache.misses == 0
    for obj in list(store.list("saved/")):
        store.put(obj.key[len("saved/"):], store.get(obj.key))
    # a damaged cache file: dropped and fetched again from the store
    bid = snap2.leaf(3)
    path = tmp_path / "cache" / bid.hex()[:2] / bid.hex()
    path.write_bytes(b"garbage" + path.read_bytes()[7:])
    snap3 = reader().snapshot("vm")
    assert snap3.read_chunk(3) == data[3 * CHUNK : 4 * CHUNK]
    assert not path.read_bytes().startswith(b"garbage")  # fetched and cached again
    # damage in the store itself still fails the chunk
    path.write_bytes(b"garbage")
    loc = snap3.repo.index()[bid]
    key = f"packs/{loc.pack.hex()[:2]}/{loc.pack.hex()}"
    raw = bytearray(store.get(key))
    raw[loc.offset + 3] ^= 1
    store.put(key, bytes(raw))
    with pytest.raises(CorruptChunkError, match="chunk 3 "):
        reader().snapshot("vm").read_chunk(3)
