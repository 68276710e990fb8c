"""Cost proportional to change (issue 14): sparse files and --skip-free-blocks, each against a
full scan of the same data in the same run (a script, not a test).

    .venv/bin/python tests/bench/bench_cbt.py [--runs 5] [--size-mib 2048] [--dir /var/tmp]

* sparse: a file of ``--size-mib`` with 10% allocated in 2 MiB runs (half random, half
  text-like), and the same bytes written out in full (its holes as real zeros): the first
  push of each into a new image, time and bytes read;
* free blocks: a GPT disk of ``--size-mib`` whose earlier life left random bytes everywhere,
  with one ext4 partition (made with ``-E nodiscard``, so its free blocks keep that garbage)
  20% full of files: the first push into a new image and a push with nothing changed, each
  with a full scan and with ``--skip-free-blocks``.

Every figure is the median of ``--runs`` runs, with a warm page cache, and "cold" with the
source file's own pages evicted before each run (``POSIX_FADV_DONTNEED``: the rest of the
machine's cache is left alone); needs e2fsprogs and gdisk.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from diskrsync.compression.partitions import read_partitions
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import PushStats, SourceOptions

MiB = 1 << 20


def blob(r: random.Random, n: int) -> bytes:
    if r.random() < 0.5:
        return r.randbytes(n)
    line = b"%d text-like content of a log line, %x\n" % (r.randrange(10**6), r.getrandbits(32))
    return (line * (n // len(line) + 1))[:n]


def drop(path: Path) -> None:
    """Evict this file's pages from the page cache (only its own: POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(16 * MiB):
            pass


Case = tuple[Callable[[], PushStats], Path | None]  # the push, the source to evict first


def interleaved(runs: int, cases: dict[str, Case]) -> dict[str, tuple[float, int]]:
    """Median time and bytes read of each case, the cases taking turns in every round (this
    machine's load changes from minute to minute; turns keep the ratios fair)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    read: dict[str, int] = {}
    for _ in range(runs):
        for name, (fn, cold) in cases.items():
            if cold is not None:
                drop(cold)
            t0 = time.perf_counter()
            stats = fn()
            times[name].append(time.perf_counter() - t0)
            read[name] = stats.bytes_read
    return {k: (statistics.median(v), read[k]) for k, v in times.items()}


def push(src: Path, dst: Path, *, skip: bool = False, fresh: bool = True) -> PushStats:
    if fresh and dst.exists():
        dst.unlink()
    req = PushRequest(source=SourceOptions(skip_free_blocks=skip))
    return local_push(str(src), str(dst), req)


def sparse_case(work: Path, size: int, runs: int) -> None:
    r = random.Random(14)
    sparse, dense, dst = work / "sparse", work / "dense", work / "dst.img"
    runs_of = size // (2 * MiB)
    chosen = sorted(r.sample(range(runs_of), runs_of // 10))
    with open(sparse, "wb") as s, open(dense, "wb") as d:
        s.truncate(size)
        pos = 0
        for i in chosen:
            data = blob(r, 2 * MiB)
            s.seek(i * 2 * MiB)
            s.write(data)
            d.write(bytes(i * 2 * MiB - pos))
            d.write(data)
            pos = (i + 1) * 2 * MiB
        d.write(bytes(size - pos))
    print(f"sparse file, {size // MiB} MiB, 10% allocated, first push:")
    for cache in ("warm", "cold"):
        for f in (sparse, dense):
            warm(f)
        cold = cache == "cold"
        res = interleaved(runs, {"dense": (lambda: push(dense, dst), dense if cold else None),
                                 "sparse": (lambda: push(sparse, dst), sparse if cold else None)})
        (t_dense, r_dense), (t_sparse, r_sparse) = res["dense"], res["sparse"]
        print(f"  {cache}: written out in full {t_dense:.2f} s, {r_dense / MiB:.0f} MiB read; "
              f"sparse {t_sparse:.2f} s, {r_sparse / MiB:.0f} MiB read "
              f"({t_sparse / t_dense:.2f}x the time, {r_sparse / r_dense:.2f}x the bytes)")
    for path in (sparse, dense, dst):
        path.unlink()


def free_blocks_case(work: Path, size: int, runs: int) -> None:
    r = random.Random(15)
    disk, files, dst = work / "disk", work / "files", work / "dst.img"
    with open(disk, "wb") as f:  # an old disk: garbage everywhere
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    subprocess.run(["sgdisk", "-n", "1:0:0", str(disk)], check=True, capture_output=True)
    fd = os.open(disk, os.O_RDONLY)
    try:
        (part,) = read_partitions(lambda o, n: os.pread(fd, n, o), size)
    finally:
        os.close(fd)
    files.mkdir()
    target = part.size // 5 - 40 * MiB  # 20% full counting the journal and inode tables
    made = 0
    while made < target:
        n = min(r.randrange(1, 16) * MiB, target - made)
        (files / f"f{made}").write_bytes(blob(r, n))
        made += n
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"nodiscard,offset={part.start}",
                    "-d", str(files), str(disk), f"{part.size // 1024}k"],
                   check=True, capture_output=True)
    shutil.rmtree(files)
    warm(disk)
    first = interleaved(runs, {"full": (lambda: push(disk, dst), None),
                               "skip": (lambda: push(disk, dst, skip=True), None)})
    again = interleaved(runs, {"full": (lambda: push(disk, dst, fresh=False), None),
                               "skip": (lambda: push(disk, dst, skip=True, fresh=False), None)})
    cold = interleaved(runs, {"full": (lambda: push(disk, dst, fresh=False), disk),
                              "skip": (lambda: push(disk, dst, skip=True, fresh=False), disk)})
    print(f"ext4 partition 20% full on a {size // MiB} MiB disk of old garbage:")
    for what, res in (("first push", first), ("nothing changed", again),
                      ("nothing changed, cold", cold)):
        full, skip = res["full"], res["skip"]
        print(f"  {what}: full scan {full[0]:.2f} s, {full[1] / MiB:.0f} MiB read; "
              f"--skip-free-blocks {skip[0]:.2f} s, {skip[1] / MiB:.0f} MiB read "
              f"({skip[0] / full[0]:.2f}x the time, {skip[1] / full[1]:.2f}x the bytes)")
    for path in (disk, dst):
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-cbt-") as d:
        sparse_case(Path(d), args.size_mib * MiB, args.runs)
        free_blocks_case(Path(d), args.size_mib * MiB, args.runs)


if __name__ == "__main__":
    main()
