"""Throughput, latency and memory of ``diskrsync mount`` on real images (a script, not a test).

Run as root from the repository (it drops the page cache between runs and loop-mounts)::

    .venv/bin/python tests/bench/bench_mount.py [--synth bench-data/synth.img] [--runs 3]

What it measures, each as the median of ``--runs`` runs, every run on a fresh mount with the page
cache dropped (``echo 3 > /proc/sys/vm/drop_caches``) so the image file is read from disk too:

* sequential ``dd bs=1M`` of ``disk.raw`` of ``synth.img`` pushed into an image (issue target:
  at least 500 MB/s), against ``diskrsync restore IMAGE /dev/null`` in the same run, and a
  second ``dd`` on the same mount (the kernel page cache);
* random 4 KiB reads of ``disk.raw``: p50/p99 cold (a chunk read and decompressed per read),
  chunk-cache hits (another page of a chunk read before: the mount's LRU, no decompression) and
  page-cache hits (the same pages again);
* reading a 100 MiB file of text-like data from an ext4 loop-mounted from ``partitions/p1``,
  against the same ext4 loop-mounted straight from the raw disk file;
* the mount process's peak RSS (VmHWM) after the sequential and random reads.

``synth.img`` comes from ``shared/bench/gen_synth.py`` (2 GiB); when it is missing a 512 MiB
file is made with the same recipe (``--synth-mib``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.diskbuild import make_ext4  # noqa: E402
from support.paths import shared_dir  # noqa: E402

MiB = 1024 * 1024


def sh(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check)


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "diskrsync.cli", *args)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def gen_synth_module() -> object:
    path = shared_dir("bench") / "gen_synth.py"
    spec = importlib.util.spec_from_file_location("gen_synth", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    argv = sys.argv
    sys.argv = [str(path), "unused"]  # it checks its command line when loaded
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = argv
    return module


def synth_image(path: Path, work: Path, mib: int) -> Path:
    if path.exists():
        return path
    out = work / "synth.img"
    print(f"{path} is missing: making a {mib} MiB one with gen_synth's recipe")
    gen = gen_synth_module()
    with open(out, "wb") as f:
        gen.write_mixed(f, mib, 1)  # type: ignore[attr-defined]
    return out


def text_bytes(size: int) -> bytes:
    gen = gen_synth_module()
    r = random.Random(99)
    out = bytearray()
    while len(out) < size:
        out += gen.text_piece(r)  # type: ignore[attr-defined]
    return bytes(out[:size])


@contextmanager
def mounted(image: Path, mp: Path, log: Path, *extra: str) -> Iterator[int]:
    """A foreground ``diskrsync mount`` (so its pid is known); yields the pid."""
    mp.mkdir(exist_ok=True)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diskrsync.cli", "mount", "-f", str(image), str(mp), *extra],
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while "mounted on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mount failed: {log.read_text()}")
            time.sleep(0.02)
        yield proc.pid
    finally:
        sh("fusermount3", "-u", "-z", mp, check=False)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def timed(func: Callable[[], object]) -> float:
    t = time.perf_counter()
    func()
    return time.perf_counter() - t


def dd(path: Path) -> None:
    sh("dd", f"if={path}", "of=/dev/null", "bs=1M")


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


def us(values: list[float]) -> str:
    return f"p50 {median(values) * 1e6:.0f} us, p99 {percentile(values, 0.99) * 1e6:.0f} us"


def bench_synth(args: argparse.Namespace, work: Path) -> None:
    synth = synth_image(Path(args.synth), work, args.synth_mib)
    size = synth.stat().st_size
    image = work / "synth.dimg"
    t = timed(lambda: cli("push", synth, image, "-q"))
    print(f"pushed {synth} ({size / MiB:.0f} MiB) into an image in {t:.1f} s")
    mp, log = work / "mnt", work / "mount.log"
    seq: list[float] = []
    again: list[float] = []
    restore: list[float] = []
    hwm: list[float] = []
    cold, chunk_hit, page_hit = [], [], []
    rng = random.Random(1)
    chunk = 128 * 1024
    for _run in range(args.runs):
        drop_caches()
        restore.append(size / timed(lambda: cli("restore", image, "/dev/null", "-q")) / 1e6)
        drop_caches()
        with mounted(image, mp, log, *args.mount_options) as pid:
            disk = mp / "disk.raw"
            seq.append(size / timed(partial(dd, disk)) / 1e6)
            again.append(size / timed(partial(dd, disk)) / 1e6)
            hwm.append(peak_rss_kib(pid))
        drop_caches()
        with mounted(image, mp, log, *args.mount_options) as pid:
            chunks = rng.sample(range(size // chunk), min(args.samples, size // chunk))
            offsets = [c * chunk + rng.randrange(chunk // 8192) * 4096 for c in chunks]
            cold += random_reads(mp / "disk.raw", offsets)
            # another page of the same chunks: the mount's chunk cache, no decompression
            chunk_hit += random_reads(mp / "disk.raw", [o + chunk // 2 for o in offsets])
            page_hit += random_reads(mp / "disk.raw", offsets)
            hwm[-1] = max(hwm[-1], peak_rss_kib(pid))
    print(f"sequential dd bs=1M of disk.raw, cold:  {median(seq):.0f} MB/s "
          f"(runs {', '.join(f'{v:.0f}' for v in seq)}; target >= 500)")
    print(f"diskrsync restore IMAGE /dev/null, cold: {median(restore):.0f} MB/s "
          f"(runs {', '.join(f'{v:.0f}' for v in restore)})")
    print(f"  ratio mount / restore: {median(seq) / median(restore):.2f}")
    print(f"sequential again (kernel page cache):   {median(again):.0f} MB/s")
    print(f"random 4 KiB, cold (chunk read):        {us(cold)} (n={len(cold)})")
    print(f"random 4 KiB, chunk-cache hit:          {us(chunk_hit)}")
    print(f"random 4 KiB, page-cache hit:           {us(page_hit)}")
    print(f"mount peak RSS (VmHWM):                 {median(hwm) / 1024:.0f} MiB "
          f"(runs {', '.join(f'{v / 1024:.0f}' for v in hwm)})")


def bench_ext4(args: argparse.Namespace, work: Path) -> None:
    disk = work / "ext4disk.img"
    with open(disk, "wb") as f:
        f.truncate(160 * MiB)
    sh("sgdisk", "-n", "1:2048:0", "-c", "1:bench", disk)
    start, end = 2048 * 512, (160 * MiB // 512 - 34) * 512
    fs = work / "ext4.fs"
    make_ext4(fs, end - start, "bench", {"big.txt": text_bytes(100 * MiB)}, work)
    with open(fs, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(start)
        shutil.copyfileobj(src, dst, 4 * MiB)
    fs.unlink()
    shutil.rmtree(work / "ext4.fs.src", ignore_errors=True)
    image = work / "ext4.dimg"
    cli("push", disk, image, "-q")
    where = work / "ext4"
    where.mkdir()

    def read_file() -> None:
        with open(where / "big.txt", "rb") as f:
            while f.read(MiB):
                pass

    def loop_read(file: Path, offset: int | None) -> float:
        extra = ["-o", str(offset)] if offset is not None else []
        dev = sh("losetup", "-r", "-f", "--show", *extra, file).stdout.strip()
        try:
            sh("mount", "-t", "ext4", "-o", "ro,noload", dev, where)
            try:
                drop_caches()
                return 100 * MiB / timed(read_file) / 1e6
            finally:
                sh("umount", where)
        finally:
            sh("losetup", "-d", dev)

    via_mount, direct = [], []
    mp, log = work / "mnt", work / "mount-ext4.log"
    for _run in range(args.runs):
        with mounted(image, mp, log, *args.mount_options):
            via_mount.append(loop_read(mp / "partitions" / "p1", None))
        direct.append(loop_read(disk, start))
    print(f"100 MiB text file from ext4 via partitions/p1, cold: {median(via_mount):.0f} MB/s "
          f"(runs {', '.join(f'{v:.0f}' for v in via_mount)})")
    print(f"  the same ext4 straight from the raw disk file:      {median(direct):.0f} MB/s; "
          f"ratio {median(via_mount) / median(direct):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth", default=str(REPO / "bench-data" / "synth.img"))
    parser.add_argument("--synth-mib", type=int, default=512,
                        help="size of the synth image made when --synth is missing")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000, help="random reads per run")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--skip-ext4", action="store_true")
    parser.add_argument("--mount-option", dest="mount_options", action="append", default=[],
                        help="extra option for diskrsync mount (repeatable)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (drop_caches, loop devices)")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        bench_synth(args, work)
        if not args.skip_ext4:
            bench_ext4(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
