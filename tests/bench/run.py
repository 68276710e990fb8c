#!/usr/bin/env python3
"""Benchmarks for the image format and the sync engine, each next to a physical reference
measured in the same run (these machines are shared and noisy: medians and ratios count).

    .venv/bin/python tests/bench/run.py [--data DIR] [--repeat 5] [--json FILE]

DIR holds the images from ../shared/bench/gen_synth.py (generated there if missing: ~8 GiB).
Every case runs in a fresh process (`run.py --case NAME`) that prints its own timing and peak
RSS as JSON, so interpreter start-up is not counted and memory is per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
CS = 128 * 1024
REPO = Path(__file__).resolve().parents[2]

# -- cases (run inside a child process) ----------------------------------------------------


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def _copy_synced(src: Path, dst: Path) -> None:
    """Copy a base image and flush it, so the timed work's fsyncs flush only its own writes."""
    shutil.copyfile(src, dst)
    os.sync()
    time.sleep(0.5)  # the copy's writeback and page reclaim are setup, not the measured work


def ref_scan(data: Path) -> dict:
    """Scan floor: read the source and BLAKE3 each chunk, one thread."""
    import blake3

    src = data / "synth2.img"
    _warm(src)
    t = time.perf_counter()
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            for i in range(0, n, CS):
                blake3.blake3(view[i : min(i + CS, n)]).digest()
    return {"seconds": time.perf_counter() - t}


def ref_read(data: Path) -> dict:
    """Reading the raw file (warm), the bar for restore."""
    src = data / "synth.img"
    _warm(src)
    t = time.perf_counter()
    buf = bytearray(4 * MiB)
    with open(src, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return {"seconds": time.perf_counter() - t}


def ref_zstd(data: Path) -> dict:
    """zstd -1 compressing the non-zero chunks of synth.img in one thread."""
    import zstandard

    src = data / "synth.img"
    _warm(src)
    c = zstandard.ZstdCompressor(level=1)
    zero = bytes(CS)
    stored = 0
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as f:
        while chunk := f.read(CS):
            if chunk != zero:
                stored += min(len(c.compress(chunk)), len(chunk))
    return {"seconds": time.perf_counter() - t, "stored": stored}


def write_direct(data: Path) -> dict:
    """The image format's own write speed: read, hash, compress on two threads, store
    (compression.importer, what `convert` uses)."""
    from diskrsync.compression.importer import write_new_image

    src, dst = data / "synth.img", data / "bench-direct.spgz"
    dst.unlink(missing_ok=True)
    _warm(src)
    fd = os.open(src, os.O_RDONLY)
    t = time.perf_counter()
    write_new_image(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size, str(dst),
                    source="bench")
    secs = time.perf_counter() - t
    return {"seconds": secs, "file_size": dst.stat().st_size,
            "allocated": dst.stat().st_blocks * 512}


def _push(data: Path, src: str, dst: str, *, fresh: bool = False, base: str | None = None,
          delay: float = 0.0) -> dict:
    from diskrsync.synccore.channel import delayed_pair
    from diskrsync.synccore.push import PushRequest, local_push

    target = data / dst
    if fresh:
        target.unlink(missing_ok=True)
    if base:
        _copy_synced(data / base, target)
    _warm(data / src)
    channels = delayed_pair(delay / 2) if delay else None
    t = time.perf_counter()
    stats = local_push(str(data / src), str(target), PushRequest(), channels=channels)
    secs = time.perf_counter() - t
    return {"seconds": secs, "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received, "chunks_differing": stats.chunks_differing,
            "allocated": target.stat().st_blocks * 512}


def push_first(data: Path) -> dict:
    return _push(data, "synth.img", "bench-first.spgz", fresh=True)


def push_same(data: Path) -> dict:
    return _push(data, "synth.img", "bench-same.spgz", base="bench-base.spgz")


def push_1pct(data: Path) -> dict:
    return _push(data, "synth2.img", "bench-1pct.spgz", base="bench-base.spgz")


def push_1pct_rtt50(data: Path) -> dict:
    return _push(data, "synth2.img", "bench-1pct-rtt.spgz", base="bench-base.spgz", delay=0.05)


def push_grow(data: Path) -> dict:
    return _push(data, "synth_grow.img", "bench-grow.spgz", base="bench-base.spgz")


def push_shrink(data: Path) -> dict:
    return _push(data, "synth_shrink.img", "bench-shrink.spgz", base="bench-base.spgz")


def push_image_first(data: Path) -> dict:
    """Copy an image into a new one: every stored chunk is read out, verified and sent."""
    return _push(data, "bench-base.spgz", "bench-img-first.spgz", fresh=True)


def push_image_1pct(data: Path) -> dict:
    """Image to image, 1% differing: pages compared from both indexes, 163 chunks sent."""
    return _push(data, "bench-base2.spgz", "bench-img-1pct.spgz", base="bench-base.spgz")


def commit_1pct(data: Path) -> dict:
    """Committing the 1% change alone (163 chunks into the 2 GiB image), no scan."""
    from diskrsync.compression.image import Image

    target = data / "bench-commit.spgz"
    _copy_synced(data / "bench-base.spgz", target)
    changed = [int(x) for x in (data / "synth2.changed_blocks.txt").read_text().split()]
    fd = os.open(data / "synth2.img", os.O_RDONLY)
    blocks = {c: os.pread(fd, CS, c * CS) for c in changed}
    t = time.perf_counter()
    tx = Image.open(str(target)).begin()
    for c, blob in blocks.items():
        tx.write_chunk(c, blob)
    tx.commit(source="bench")
    return {"seconds": time.perf_counter() - t, "chunks": len(changed)}


def restore_null(data: Path) -> dict:
    from diskrsync.compression.image import Image
    from diskrsync.compression.maintenance import restore

    img = Image.open(str(data / "bench-base.spgz"))
    _warm(data / "bench-base.spgz")
    t = time.perf_counter()
    with img.snapshot() as snap:
        restore(snap, "/dev/null")
    return {"seconds": time.perf_counter() - t}


def index_ram(data: Path) -> dict:
    """Bytes of Python heap held per chunk once a 2 GiB generation's whole index is loaded."""
    import tracemalloc

    from diskrsync.compression.image import Image

    img = Image.open(str(data / "bench-base.spgz"))
    snap = img.snapshot()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for page in range(snap.tree.shape.count(1)):
        snap.tree.page(1, page)
    after = tracemalloc.get_traced_memory()[0]
    return {"seconds": 0.0, "bytes_per_chunk": (after - before) / snap.chunk_count}


CASES: dict[str, Callable[[Path], dict]] = {f.__name__: f for f in (
    ref_scan, ref_read, ref_zstd, write_direct, push_first, push_same, push_1pct,
    push_1pct_rtt50, push_grow, push_shrink, push_image_first, push_image_1pct, commit_1pct,
    restore_null, index_ram)}


def child(name: str, data: Path) -> None:
    sys.path.insert(0, str(REPO))
    out = CASES[name](data)
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


# -- driver ------------------------------------------------------------------------------


def run_case(name: str, data: Path, repeat: int) -> dict:
    results = []
    for _ in range(repeat):
        os.sync()  # let the previous run's writeback finish: it would steal this run's time
        time.sleep(1)
        r = subprocess.run([sys.executable, __file__, "--case", name, "--data", str(data)],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            raise SystemExit(f"case {name} failed:\n{r.stderr}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in results) for k in results[0]
           if isinstance(results[0][k], (int, float))}
    med["runs"] = [round(r["seconds"], 3) for r in results]
    return med


def ensure_data(data: Path) -> None:
    if not (data / "synth.img").exists():
        gen = REPO.parent / "shared" / "bench" / "gen_synth.py"
        if not gen.exists():
            gen = Path("/work/shared/bench/gen_synth.py")
        data.mkdir(parents=True, exist_ok=True)
        print(f"generating benchmark images in {data} (about 8 GiB)...", flush=True)
        subprocess.run([sys.executable, str(gen), str(data)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "bench-data")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--case")
    ap.add_argument("--only", help="comma-separated cases to run (no summary table)")
    ap.add_argument("--json", type=Path, help="also write all results here")
    args = ap.parse_args()
    if args.case:
        child(args.case, args.data)
        return
    data = args.data
    ensure_data(data)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, "
          f"median of {args.repeat}", flush=True)
    # the base image every incremental case starts from
    base = data / "bench-base.spgz"
    base.unlink(missing_ok=True)
    from diskrsync.synccore.push import PushRequest, local_push

    local_push(str(data / "synth.img"), str(base), PushRequest())
    base2 = data / "bench-base2.spgz"
    base2.unlink(missing_ok=True)
    local_push(str(data / "synth2.img"), str(base2), PushRequest())
    r: dict[str, dict] = {}
    for name in args.only.split(",") if args.only else CASES:
        r[name] = run_case(name, data, 1 if name == "index_ram" else args.repeat)
        print(f"  {name:16} {r[name]['seconds']:7.3f} s  runs {r[name]['runs']}  "
              f"rss {r[name]['maxrss_mib']:.0f} MiB", flush=True)
    if args.only:
        if args.json:
            args.json.write_text(json.dumps(r, indent=2))
        return
    scan = r["ref_scan"]["seconds"]
    size = (data / "synth.img").stat().st_size
    changed_stored = 0
    from diskrsync.compression import codec

    fd = os.open(data / "synth2.img", os.O_RDONLY)
    for c in (int(x) for x in (data / "synth2.changed_blocks.txt").read_text().split()):
        blob = os.pread(fd, CS, c * CS)
        changed_stored += len(codec.encode(blob)[1])
    rows = [
        ("Image: write synth.img into a new image", f"{r['write_direct']['seconds']:.2f} s",
         f"zstd -1 alone, one thread: {r['ref_zstd']['seconds']:.2f} s",
         f"{r['ref_zstd']['seconds'] / r['write_direct']['seconds']:.2f}x faster",
         ">= 1.3x (Go 21.6 s)"),
        ("Image: allocated after first write", f"{r['write_direct']['allocated'] / 1e6:.0f} MB",
         f"zstd -1 stores {r['ref_zstd']['stored'] / 1e6:.0f} MB",
         f"{r['write_direct']['allocated'] / r['ref_zstd']['stored']:.3f}", "<= 990 MB (Go)"),
        ("Image: restore to /dev/null", f"{size / r['restore_null']['seconds'] / 1e6:.0f} MB/s",
         f"raw read {size / r['ref_read']['seconds'] / 1e6:.0f} MB/s",
         f"{r['ref_read']['seconds'] / r['restore_null']['seconds']:.2f}",
         ">= 1000 MB/s and >= 0.5 (Go 248 MB/s)"),
        ("Image: commit the 1% change", f"{r['commit_1pct']['seconds']:.3f} s",
         f"whole write {r['write_direct']['seconds']:.2f} s",
         f"{r['commit_1pct']['seconds'] / r['write_direct']['seconds'] * 100:.2f}%", "< 3%"),
        ("Image: peak RSS while writing", f"{r['write_direct']['maxrss_mib']:.0f} MiB", "", "",
         "< 150 MB"),
        ("Image: index RAM per chunk", f"{r['index_ram']['bytes_per_chunk']:.0f} B", "", "", ""),
        ("Push: nothing changed", f"{r['push_same']['seconds']:.2f} s",
         f"scan floor {scan:.2f} s", f"{r['push_same']['seconds'] / scan:.2f}",
         "<= 1.3 (Go 10.1 s)"),
        ("Push: 1% changed", f"{r['push_1pct']['seconds']:.2f} s", f"scan floor {scan:.2f} s",
         f"{r['push_1pct']['seconds'] / scan:.2f}", "<= 1.5 (Go 15.1 s)"),
        ("Push: 1% changed, bytes sent", f"{r['push_1pct']['bytes_sent'] / 1e6:.2f} MB",
         f"changed chunks stored {changed_stored / 1e6:.2f} MB",
         f"{r['push_1pct']['bytes_sent'] / (1.05 * changed_stored + 0.005 * size):.3f} of limit",
         "<= 1.05 x stored + 0.5% (Go 21.4 MB)"),
        ("Push: 1% changed, 50 ms RTT", f"{r['push_1pct_rtt50']['seconds']:.2f} s",
         f"without {r['push_1pct']['seconds']:.2f} s",
         f"+{r['push_1pct_rtt50']['seconds'] - r['push_1pct']['seconds']:.2f} s",
         "<= +2 s (Go 118 s)"),
        ("Push: first push", f"{r['push_first']['seconds']:.2f} s",
         f"direct write {r['write_direct']['seconds']:.2f} s",
         f"{r['push_first']['seconds'] / r['write_direct']['seconds']:.2f}",
         "<= 1.10 (Go 21.6 s)"),
        ("Push: grow 64 MiB / shrink to 1.5 GiB",
         f"{r['push_grow']['seconds']:.2f} / {r['push_shrink']['seconds']:.2f} s",
         f"scan floor {scan:.2f} s", "", "(Go 12.6 / 9.2 s)"),
        ("Push: image to new image (every chunk verified)",
         f"{r['push_image_first']['seconds']:.2f} s",
         f"first push from the raw file {r['push_first']['seconds']:.2f} s",
         f"{r['push_image_first']['seconds'] / r['push_first']['seconds']:.2f}", ""),
        ("Push: image to image, 1% changed", f"{r['push_image_1pct']['seconds']:.2f} s",
         f"scan floor {scan:.2f} s", f"{r['push_image_1pct']['seconds'] / scan:.2f}", ""),
        ("Push: peak RSS (both ends, 2 GiB)",
         f"{max(r[k]['maxrss_mib'] for k in r if k.startswith('push')):.0f} MiB", "", "", ""),
    ]
    print()
    print("| figure | measured | reference (same run) | ratio | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    for f in data.glob("bench-*.spgz"):
        f.unlink()


if __name__ == "__main__":
    main()
