"""Throughput, latency and memory of ``diskrsync mount`` on real images (a script, not a test).

Run as root from the repository (it drops the page cache between runs and loop-mounts)::

    .venv/bin/python tests/bench/bench_mount.py [--synth bench-data/synth.img] [--runs 3]

What it measures, each as the median of ``--runs`` runs, every run on a fresh mount with the page
cache dropped (``echo 3 > /proc/sys/vm/drop_caches``) so the image file is read from disk too:

* sequential ``dd bs=1M`` of ``disk.raw`` of ``synth.img`` pushed into an image (issue target:
  at least 500 MB/s), against ``diskrsync restore IMAGE /dev/null`` in the same run, and a
  second ``dd`` on the same mount (the kernel page cache);
* pyfuse3's ceiling in the same runs: ``dd bs=1M`` of a file of the same size served from
  memory by ``pyfuse3_ceiling.py`` (its own process, the same mount options and
  ``read_ahead_kb``), also on a fresh mount after dropping the page cache; the ratio mount /
  ceiling (issue 16 target: at least 0.9);
* random 4 KiB reads of ``disk.raw``: p50/p99 cold (in chunks that hold data, so each read is a
  chunk read and decoded), chunk-cache hits (another page of a chunk read before: the mount's
  LRU, no decompression) and page-cache hits (the same pages again);
* the same random reads in the other half of those chunks with the image file in the page
  cache (a chunk decoded per read, no disk read);
* one chunk's decode as the mount's reader does it (zstd decompress and BLAKE3 check of the
  stored bytes, in memory), over the same chunks, and the whole ``read_chunk`` with the image
  file cold; the ratio random p99 / decode median (issue 16 target: at most 2);
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

from diskrsync.compression.codec import ChunkAt  # noqa: E402
from diskrsync.compression.container import open_image  # noqa: E402
from diskrsync.compression.image import Image, Snapshot  # noqa: E402

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
    with serving(
        [sys.executable, "-m", "diskrsync.cli", "mount", "-f", str(image), str(mp), *extra],
        mp, log,
    ) as pid:
        yield pid


@contextmanager
def ceiling_mounted(size: int, mp: Path, log: Path) -> Iterator[int]:
    """``pyfuse3_ceiling.py``: a file ``data`` of ``size`` bytes served from memory."""
    script = Path(__file__).with_name("pyfuse3_ceiling.py")
    with serving([sys.executable, str(script), str(mp), "--size", str(size)], mp, log) as pid:
        yield pid


@contextmanager
def serving(cmd: list[str], mp: Path, log: Path) -> Iterator[int]:
    """Run a FUSE server in the foreground until it logs "mounted on"; unmount at the end."""
    mp.mkdir(exist_ok=True)
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stderr=err)
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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of process ``pid``: its main thread, and all others."""
    tick = os.sysconf("SC_CLK_TCK")
    main = others = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(task) == pid:
            main = seconds
        else:
            others += seconds
    return main, others


def dd_cpu(path: Path, pid: int, size: int) -> tuple[float, float, float]:
    """``dd`` of ``path`` served by ``pid``: (MB/s, CPU s of the server's main thread (the trio
    loop), CPU s of its other threads)."""
    main0, others0 = cpu_seconds(pid)
    rate = size / timed(partial(dd, path)) / 1e6
    main1, others1 = cpu_seconds(pid)
    return rate, main1 - main0, others1 - others0


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


def data_chunks(image: Path) -> list[int]:
    """Indexes of the chunks of the newest generation that hold data (not zero chunks)."""
    with open_image(str(image)) as img:
        assert isinstance(img, Image)
        with img.snapshot() as snap:
            return [i for i in range(snap.chunk_count) if not snap.chunk_is_zero(i)]


def chunk_decode_times(image: Path, chunks: list[int]) -> tuple[list[float], list[float]]:
    """Per chunk: (decode in memory, ``read_chunk`` with the image file cold).

    The first is what the mount's reader does once the stored bytes are read: the codec's
    decode (zstd) and the BLAKE3 check against the index entry (``decode_checked`` less the
    pread); the second is the whole ``read_chunk`` after dropping the page cache, its pread
    from the disk included, as a random read pays it."""
    decode, cold = [], []
    with open_image(str(image)) as img:
        assert isinstance(img, Image)
        with img.snapshot() as snap:
            assert isinstance(snap, Snapshot)
            entries = [(i, snap.tree.entry(i)) for i in chunks]
            stored = [snap.store.read(e.offset, e.length, "chunk") for _, e in entries]
            codec, chunk = snap.codec, snap.chunk_size
            for (i, e), raw in zip(entries, stored, strict=True):
                length = min(chunk, snap.size - i * chunk)
                t = time.perf_counter()
                data = codec.decode(e.kind, raw, length, ChunkAt(i, e.hash))
                ok = codec.leaf_hash(data, i) == e.hash
                decode.append(time.perf_counter() - t)
                assert ok
    drop_caches()
    with open_image(str(image)) as img, img.snapshot() as snap:  # its index pages cold too
        for i in chunks:
            t = time.perf_counter()
            snap.read_chunk(i)
            cold.append(time.perf_counter() - t)
    return decode, cold


def bench_synth(args: argparse.Namespace, work: Path) -> None:
    synth = synth_image(Path(args.synth), work, args.synth_mib)
    size = synth.stat().st_size
    if args.image:
        image = Path(args.image)
    else:
        image = work / "synth.dimg"
        t = timed(lambda: cli("push", synth, image, "-q"))
        print(f"pushed {synth} ({size / MiB:.0f} MiB) into an image in {t:.1f} s")
    mp, log = work / "mnt", work / "mount.log"
    seq: list[float] = []
    ceiling: list[float] = []
    ceiling_loop: list[float] = []
    seq_loop: list[float] = []
    seq_workers: list[float] = []
    again: list[float] = []
    restore: list[float] = []
    hwm: list[float] = []
    cold, chunk_hit, page_hit = [], [], []
    decode, cold_chunk, warm = [], [], []
    rng = random.Random(1)
    chunk = 128 * 1024
    with_data = data_chunks(image)
    for _run in range(args.runs):
        drop_caches()
        restore.append(size / timed(lambda: cli("restore", image, "/dev/null", "-q")) / 1e6)
        drop_caches()
        with ceiling_mounted(size, mp, work / "ceiling.log") as pid:
            rate, loop, _ = dd_cpu(mp / "data", pid, size)
            ceiling.append(rate)
            ceiling_loop.append(loop)
        drop_caches()
        with mounted(image, mp, log, *args.mount_options) as pid:
            disk = mp / "disk.raw"
            rate, loop, workers = dd_cpu(disk, pid, size)
            seq.append(rate)
            seq_loop.append(loop)
            seq_workers.append(workers)
            again.append(size / timed(partial(dd, disk)) / 1e6)
            hwm.append(peak_rss_kib(pid))
        chunks = rng.sample(with_data, min(args.samples, len(with_data)))
        drop_caches()
        with mounted(image, mp, log, *args.mount_options) as pid:
            offsets = [c * chunk + rng.randrange(chunk // 8192) * 4096 for c in chunks]
            cold += random_reads(mp / "disk.raw", offsets)
            # another page of the same chunks: the mount's chunk cache, no decompression
            chunk_hit += random_reads(mp / "disk.raw", [o + chunk // 2 for o in offsets])
            page_hit += random_reads(mp / "disk.raw", offsets)
            hwm[-1] = max(hwm[-1], peak_rss_kib(pid))
        # the same chunks' other half with the image file in the page cache: a decode per
        # read but no disk read (what the mount adds to a decode)
        with open(image, "rb") as f:
            while f.read(16 * MiB):
                pass
        with mounted(image, mp, log, *args.mount_options):
            warm += random_reads(mp / "disk.raw", [o + chunk // 2 for o in offsets])
        times = chunk_decode_times(image, chunks)
        decode += times[0]
        cold_chunk += times[1]
    print(f"sequential dd bs=1M of disk.raw, cold:  {median(seq):.0f} MB/s "
          f"(runs {', '.join(f'{v:.0f}' for v in seq)}; target >= 500)")
    print(f"pyfuse3 ceiling, dd bs=1M, same options: {median(ceiling):.0f} MB/s "
          f"(runs {', '.join(f'{v:.0f}' for v in ceiling)})")
    print(f"  ratio mount / ceiling: {median(seq) / median(ceiling):.2f} (target >= 0.9)")
    print(f"  CPU s during the dd: ceiling's loop {median(ceiling_loop):.2f}; the mount's loop "
          f"{median(seq_loop):.2f}, its decoding threads {median(seq_workers):.2f}")
    print(f"diskrsync restore IMAGE /dev/null, cold: {median(restore):.0f} MB/s "
          f"(runs {', '.join(f'{v:.0f}' for v in restore)})")
    print(f"  ratio mount / restore: {median(seq) / median(restore):.2f}")
    print(f"sequential again (kernel page cache):   {median(again):.0f} MB/s")
    print(f"random 4 KiB, cold (chunk decoded):     {us(cold)} (n={len(cold)})")
    print(f"random 4 KiB, image file warm:          {us(warm)} (a chunk decoded, no disk)")
    print(f"random 4 KiB, chunk-cache hit:          {us(chunk_hit)}")
    print(f"random 4 KiB, page-cache hit:           {us(page_hit)}")
    print(f"one chunk's decode (zstd + BLAKE3):     {us(decode)}")
    print(f"one read_chunk, image file cold:        {us(cold_chunk)}")
    p99 = percentile(cold, 0.99)
    print(f"  ratio random cold p99 / decode p50: {p99 / median(decode):.2f} (target <= 2), "
          f"/ decode p99: {p99 / percentile(decode, 0.99):.2f}; "
          f"/ cold read_chunk p99: {p99 / percentile(cold_chunk, 0.99):.2f}")
    print(f"  random cold p50 less cold read_chunk p50 (what the mount adds): "
          f"{(median(cold) - median(cold_chunk)) * 1e6:.0f} us")
    print(f"  ratio random image-warm p99 / decode p99: "
          f"{percentile(warm, 0.99) / percentile(decode, 0.99):.2f}, p50 / decode p50: "
          f"{median(warm) / median(decode):.2f}")
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
    parser.add_argument("--image", help="an image of --synth made before (skips the push)")
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
