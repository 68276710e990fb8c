"""Throughput and latency of the mount (a script, not a test). Run as root from the repo:

    .venv/bin/python tests/support/fsmount_bench.py [--size-mib 1024] [--chunk-kib 64]

Mounts (in a subprocess, via mountlauncher) an in-memory fake image whose chunks are
zstd-compressed text, then measures: sequential MB/s of ``disk.raw`` (cold: every chunk is
decompressed once; then hot: from the kernel page cache), and p50/p99 latency of random 4 KiB
reads (cold chunks: a decompression in a worker thread each; warm chunks: served from the chunk
cache on the loop; both with the page cache bypassed by FADV_RANDOM on fresh pages).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.fakeimage import FakeImage

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if more no "
    "disk image chunk block partition generation mount read write backup restore file system"
)
WORDS = tuple(_WORD_TEXT.split())


def text_disk(size: int, seed: int = 7) -> bytes:
    """``size`` bytes of word salad, varied so that no two 64 KiB pieces are equal."""
    rng = random.Random(seed)
    base = " ".join(rng.choice(WORDS) for _ in range(800_000)).encode()  # ~4 MiB
    out = bytearray()
    i = 0
    while len(out) < size:
        shift = (i * 7919) % (len(base) - 65536)
        out += f"[block {i}] ".encode() + base[shift : shift + 65536 - 20]
        i += 1
    return bytes(out[:size])


def bench_image(spec: str) -> FakeImage:
    """Opener for mountlauncher: ``spec`` is ``"<size MiB>:<chunk KiB>"``."""
    size_mib, chunk_kib = (int(x) for x in spec.split(":"))
    image = FakeImage(chunk_kib * 1024, compress=True)
    image.add_generation(text_disk(size_mib * 1024 * 1024))
    return image


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def random_reads(path: Path, offsets: list[int]) -> list[float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        times = []
        for off in offsets:
            t = time.perf_counter()
            os.pread(fd, 4096, off)
            times.append(time.perf_counter() - t)
        return times
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    chunk = args.chunk_kib * 1024
    with tempfile.TemporaryDirectory() as tmp:
        mp = Path(tmp) / "mnt"
        mp.mkdir()
        rfd, wfd = os.pipe()
        options = {"foreground": True, "ready_fd": wfd, "log_file": f"{tmp}/log"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "mountlauncher.py"),
             "support.fsmount_bench:bench_image", f"{args.size_mib}:{args.chunk_kib}", str(mp),
             json.dumps(options)], pass_fds=(wfd,),
        )
        os.close(wfd)
        with os.fdopen(rfd, "rb") as ready:
            if not ready.readline().startswith(b"READY"):
                print("mount failed", file=sys.stderr)
                return 1
        print(f"image built and mounted in {time.perf_counter() - t0:.1f} s "
              f"({args.size_mib} MiB, {args.chunk_kib} KiB zstd chunks)")
        disk = mp / "disk.raw"
        try:
            for label in ("sequential (cold: every chunk decompressed)",
                          "sequential (again: kernel page cache)"):
                t = time.perf_counter()
                with open(disk, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass
                dt = time.perf_counter() - t
                print(f"{label}: {size / dt / 1e6:.0f} MB/s ({dt:.2f} s)")
            subprocess.run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=False)
            rng = random.Random(1)
            # Random 4 KiB reads into chunks not in the chunk cache (it holds the last 256 MiB
            # read): each is a miss, decompressed in a worker thread.
            pool = range(max(1, (size - (320 << 20)) // chunk))
            cold_chunks = rng.sample(pool, min(args.samples, len(pool)))
            cold = random_reads(disk, [c * chunk + rng.randrange(chunk // 4096) * 4096
                                       for c in cold_chunks])
            # Another page of each of those chunks: FUSE requests answered from the chunk cache.
            warm = random_reads(disk, [c * chunk + (chunk // 2 if chunk > 4096 else 0)
                                       for c in cold_chunks])
            for name, times in (("random 4 KiB, chunk miss", cold),
                                ("random 4 KiB, chunk-cache hit", warm)):
                print(f"{name}: p50 {statistics.median(times) * 1e6:.0f} us, "
                      f"p99 {percentile(times, 0.99) * 1e6:.0f} us (n={len(times)})")
        finally:
            subprocess.run(["fusermount3", "-u", str(mp)], check=False)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
