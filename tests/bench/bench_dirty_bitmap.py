#!/usr/bin/env python3
"""Dirty-bitmap pushes (issue 14): a 2 GiB qcow2 served by qemu-storage-daemon over NBD, 1% of
its 128 KiB blocks written through NBD between pushes. Each run times, on the same disk state
and in rotating order, three pushes into three copies of the image, and counts the bytes each
read: the dirty-bitmap push (--qmp, point-in-time view); a full scan the same way (--qmp with
a bitmap the image's newest generation was not pushed with, so every block is read); and a
full scan of the live export without --qmp.

    .venv/bin/python tests/bench/bench_dirty_bitmap.py [--data DIR] [--work DIR] [--runs 5]

DIR holds synth.img from ../shared/bench/gen_synth.py (made there if missing); WORK (default a
temporary directory) gets the qcow2 and the two images, about 4 GiB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.qsd import QEMU_IMG, StorageDaemon  # noqa: E402

from diskrsync.compression.sources import NbdSource  # noqa: E402
from diskrsync.synccore.push import PushRequest, local_push  # noqa: E402

MiB = 1 << 20
BLOCK = 128 * 1024
SIZE = 2048 * MiB


def synth(data: Path) -> Path:
    """synth.img (2 GiB: 40% zeros, 30% random, 30% text), generated if missing."""
    img = data / "synth.img"
    if img.exists():
        return img
    gen = REPO.parent / "shared" / "bench" / "gen_synth.py"
    if not gen.exists():
        gen = Path("/work/shared/bench/gen_synth.py")
    spec = importlib.util.spec_from_file_location("gen_synth", gen)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data.mkdir(parents=True, exist_ok=True)
    with open(img, "wb") as f:
        mod.write_mixed(f, 2048, 1)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "bench-data")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    _count_reads()
    src = synth(a.data)
    work = Path(tempfile.mkdtemp(prefix="bench-bitmap-", dir=a.work))
    try:
        qcow2 = work / "disk.qcow2"
        subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(src), str(qcow2)],
                       check=True)
        subprocess.run([QEMU_IMG, "bitmap", "--add", str(qcow2), "b0"], check=True)
        rows = run(work, a.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, a.json)


SERVED = [0]  # bytes the NBD server sent us for reads, counted under every push's reader


def _count_reads() -> None:
    """Count what NbdSource reads from the server (QEMU keeps no statistics for exports):
    the push's own bytes_read could miss a second read of a chunk; this cannot."""
    plain = NbdSource.read

    def read(self: NbdSource, offset: int, length: int) -> bytes:
        SERVED[0] += length
        return plain(self, offset, length)

    NbdSource.read = read


def served_bytes(_d: StorageDaemon) -> int:
    return SERVED[0]


def run(work: Path, runs: int) -> list[dict[str, float]]:
    with StorageDaemon(work, SIZE) as d:
        managed = PushRequest(dirty_bitmap="b0", qmp=str(d.qmp_socket))
        full_pit = PushRequest(dirty_bitmap="full", qmp=str(d.qmp_socket))
        full_live = PushRequest()
        img_a, img_b, img_c = work / "a.img", work / "b.img", work / "c.img"
        local_push(d.url, str(img_a), managed)  # the first push: a full scan
        rows = []
        for r in range(runs):
            shutil.copyfile(img_a, img_b)
            shutil.copyfile(img_a, img_c)
            os.sync()
            rnd = random.Random(100 + r)
            blocks = rnd.sample(range(SIZE // BLOCK), SIZE // BLOCK // 100)
            for b in blocks:
                d.write(b * BLOCK, rnd.randbytes(BLOCK))
            changed = len(blocks) * BLOCK
            order = [("full", img_b, full_pit), ("live", img_c, full_live),
                     ("bitmap", img_a, managed)]
            order = order[r % 3:] + order[:r % 3]
            row: dict[str, float] = {"changed_bytes": changed}
            for name, img, req in order:
                served = served_bytes(d)
                t = time.perf_counter()
                stats = local_push(d.url, str(img), req)
                row[f"{name}_seconds"] = time.perf_counter() - t
                row[f"{name}_bytes_read"] = stats.bytes_read
                row[f"{name}_served_bytes"] = served_bytes(d) - served
                row[f"{name}_chunks_sent"] = stats.chunks_differing
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows


def report(rows: list[dict[str, float]], out: Path | None) -> None:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpus": os.cpu_count(), "runs": len(rows),
        "changed_bytes": med("changed_bytes"),
        "bitmap_bytes_read": med("bitmap_bytes_read"),
        "full_bytes_read": med("full_bytes_read"),
        "live_bytes_read": med("live_bytes_read"),
        "bitmap_served_bytes": med("bitmap_served_bytes"),
        "full_served_bytes": med("full_served_bytes"),
        "bitmap_seconds": med("bitmap_seconds"), "full_seconds": med("full_seconds"),
        "live_seconds": med("live_seconds"),
        "read_ratio": statistics.median(r["bitmap_bytes_read"] / r["changed_bytes"]
                                        for r in rows),
        "time_ratio": statistics.median(r["bitmap_seconds"] / r["full_seconds"] for r in rows),
        "time_ratio_live": statistics.median(r["bitmap_seconds"] / r["live_seconds"]
                                             for r in rows),
    }
    print(json.dumps(summary, indent=2))
    if out:
        out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
