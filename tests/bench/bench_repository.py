#!/usr/bin/env python3
"""Repositories on the local Swift against their references, measured in the same run
(docs/benchmarks.md, "Object storage"; the issue's targets):

    .venv/bin/python tests/bench/bench_repository.py [--data /work/bench-data] [--runs 1]

DIR holds synth.img and synth2.img (../shared/bench/gen_synth.py). Cases, in order, each run
on a fresh bucket: the first push of synth.img (compression/repoimport.write_disk) against
uploading as many bytes as it stored as 16 MiB objects with the same client and four
threads; a no-change push against a no-change local push into an image file; synth2.img (1%
changed) on top: bytes uploaded against the stored size of the changed chunks; a sequential
restore (four threads over 16 MiB spans) against GETting the packs whole; ten disks made
from synth.img with 1% of chunks changed each, against one disk's stored size plus the
changed chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.swift import ACCESS_KEY, REGION, SECRET_KEY, SwiftServer

from diskrsync.base.parallel import ordered_map
from diskrsync.compression.codec import STANDARD, ChunkAt
from diskrsync.compression.objstore import S3Options, S3Store
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repomaint import usage
from diskrsync.compression.repository import Repository
from diskrsync.synccore.push import PushRequest, local_push

CHUNK = 128 << 10


def _reader(path: Path) -> Callable[[int, int], bytes]:
    fd = os.open(path, os.O_RDONLY)
    return lambda off, n: os.pread(fd, n, off)


def _store(srv: SwiftServer) -> S3Store:
    return S3Store(srv.new_bucket(), "repo", S3Options(endpoint=srv.endpoint, region=REGION))


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_run(srv: SwiftServer, data: Path, tmp: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    synth, synth2 = data / "synth.img", data / "synth2.img"
    size = synth.stat().st_size
    store = _store(srv)
    repo = Repository.init(store)
    out["first_push_s"] = _timed(lambda: write_disk(repo, "vm", _reader(synth), size))
    stored = usage(repo).stored_bytes
    out["stored_MB"] = stored / 1e6
    blob = os.urandom(16 << 20)
    ref = _store(srv)
    n = -(-stored // len(blob))
    with ThreadPoolExecutor(4) as pool:
        out["bulk_put_s"] = _timed(lambda: list(pool.map(
            lambda i: ref.put(f"bulk/{i}", blob), range(n))))
    out["first_push_ratio"] = out["bulk_put_s"] / out["first_push_s"]  # target >= 0.7

    out["nochange_push_s"] = _timed(lambda: write_disk(repo, "vm", _reader(synth), size))
    image = tmp / "ref.spgz"
    local_push(str(synth), str(image), PushRequest())
    out["nochange_image_push_s"] = _timed(lambda: local_push(str(synth), str(image),
                                                             PushRequest()))
    out["nochange_ratio"] = out["nochange_push_s"] / out["nochange_image_push_s"]  # <= 2

    before = usage(repo).stored_bytes
    out["pct1_push_s"] = _timed(lambda: write_disk(repo, "vm", _reader(synth2), size))
    uploaded = usage(repo).stored_bytes - before
    changed = [int(x) for x in (data / "synth2.changed_blocks.txt").read_text().split()]
    read2 = _reader(synth2)
    changed_stored = sum(len(STANDARD.encode(read2(c * CHUNK, CHUNK), ChunkAt(c))[1])
                         for c in changed)
    out["pct1_uploaded_MB"] = uploaded / 1e6
    out["pct1_changed_stored_MB"] = changed_stored / 1e6
    out["pct1_ratio"] = uploaded / changed_stored  # target <= 1.1 (index included)

    snap = Repository.open(store).snapshot("vm")
    snap.leaves()
    span = 16 << 20

    def restore() -> None:
        for _ in ordered_map(lambda off: snap.read(off, span), range(0, size, span),
                             workers=4, window=8):
            pass

    out["restore_s"] = _timed(restore)
    keys = [o.key for o in store.list("packs/")]
    with ThreadPoolExecutor(4) as pool:
        out["bulk_get_s"] = _timed(lambda: list(pool.map(store.get, keys)))
    packs_mb = sum(o.size for o in store.list("packs/")) / 1e6
    out["restore_MBps_stored"] = packs_mb / out["restore_s"]
    out["restore_ratio"] = out["bulk_get_s"] / out["restore_s"]  # target >= 0.6
    return out


def dedup(srv: SwiftServer, data: Path) -> dict[str, float]:
    synth = data / "synth.img"
    size = synth.stat().st_size
    read = _reader(synth)
    chunks = size // CHUNK
    store = _store(srv)
    repo = Repository.init(store)
    write_disk(repo, "base", read, size)
    one = usage(repo).stored_bytes
    changed_total = 0
    for k in range(10):
        rng = random.Random(k)
        picks = set(rng.sample(range(chunks), chunks // 100))
        fresh = {c: rng.randbytes(CHUNK) for c in picks}
        changed_total += len(fresh) * CHUNK  # random: stored raw

        def read_k(off: int, n: int, fresh: dict[int, bytes] = fresh) -> bytes:
            buf = bytearray(read(off, n))
            for c in range(off // CHUNK, (off + n) // CHUNK):
                if c in fresh:
                    buf[c * CHUNK - off : (c + 1) * CHUNK - off] = fresh[c]
            return bytes(buf)

        write_disk(repo, f"vm{k}", read_k, size)
    ten = usage(repo).stored_bytes - one  # the ten clones; the base disk stands for "one"
    return {"dedup_one_disk_MB": one / 1e6, "dedup_ten_disks_MB": ten / 1e6,
            "dedup_changed_MB": changed_total / 1e6,
            "dedup_ratio": (one + ten) / (1.2 * one + changed_total)}  # target <= 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/bench-data")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-dedup", action="store_true")
    args = ap.parse_args()
    data = Path(args.data)
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
    os.environ.setdefault("DISKRSYNC_STATE_DIR", tempfile.mkdtemp(prefix="bench-state-"))
    runs = []
    with SwiftServer() as srv, tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            runs.append(one_run(srv, data, Path(tmp)))
        extra = {} if args.no_dedup else dedup(srv, data)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                      "cpus": os.cpu_count(), "runs": args.runs, "median": med, **extra},
                     indent=1))


if __name__ == "__main__":
    main()
