#!/usr/bin/env python3
"""Time against history (issue 16): a script, not a test.

    .venv/bin/python tests/bench/bench_history.py [--generations 1000] [--work DIR]

Builds an image of N generations cheaply through the image API (a 1 MiB disk of 16 KiB
chunks, one chunk changed per generation), then times whole commands on it: ``info``,
``ls generations/`` on a mount, a push of a changed file that keeps them all
(``--keep-last N+10``), ``prune --keep-last N/2`` and two pushes after it. Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
EXE = str(REPO / ".venv" / "bin" / "diskrsync")

from diskrsync.compression.image import Image  # noqa: E402

CS = 16384


def build(path: Path, n: int) -> bytes:
    img = Image.create(str(path), chunk_size=CS, fanout=128)
    data = bytearray(os.urandom(64 * CS))
    for g in range(n):
        tx = img.begin()
        tx.resize(len(data))
        c = g % 64
        data[c * CS : c * CS + 8] = g.to_bytes(8, "little")
        if g == 0:
            for k in range(64):
                tx.write_chunk(k, bytes(data[k * CS : (k + 1) * CS]))
        else:
            tx.write_chunk(c, bytes(data[c * CS : (c + 1) * CS]))
        tx.commit(source="bench", keep=n + 10)
        img.refresh()
    img.close()
    return bytes(data)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    global EXE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=None)
    ap.add_argument("--exe", default=EXE, help="the diskrsync to measure (another build)")
    args = ap.parse_args()
    EXE = args.exe
    n = args.generations
    work = Path(tempfile.mkdtemp(prefix="history-", dir=args.work))
    try:
        base = work / "base.spgz"
        t = time.perf_counter()
        data = build(base, n)
        print(f"built {n} generations in {time.perf_counter() - t:.1f} s", flush=True)
        src = work / "src.raw"
        out: dict[str, list[float]] = {"info": [], "mount start": [],
                                       "mount ls generations/": [], "push": [],
                                       "prune": [], "push 1 after prune": [],
                                       "push 2 after prune": []}
        mnt = work / "mnt"
        mnt.mkdir()
        for run in range(args.runs):
            img = work / "img.spgz"
            shutil.copyfile(base, img)
            out["info"].append(timed([EXE, "info", str(img)]))
            proc = subprocess.Popen([EXE, "mount", "-f", str(img), str(mnt)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                t = time.perf_counter()
                while not os.path.ismount(mnt):
                    if proc.poll() is not None or time.perf_counter() - t > 600:
                        sys.exit("the mount did not start")
                    time.sleep(0.01)
                out["mount start"].append(time.perf_counter() - t)
                out["mount ls generations/"].append(timed(["ls", "-l", str(mnt / "generations")]))
            finally:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
                proc.wait(30)
            src.write_bytes(data[:-8] + run.to_bytes(8, "little"))
            out["push"].append(timed([EXE, "push", "--keep-last", str(n + 10), str(src),
                                      str(img)]))
            out["prune"].append(timed([EXE, "prune", "--keep-last", str(n // 2), str(img)]))
            # the next two pushes open the image with the pruned ones as zombies in a slot
            for i in (1, 2):
                src.write_bytes(data[:-8] + (run + 100 * i).to_bytes(8, "little"))
                out[f"push {i} after prune"].append(timed([EXE, "push", "--keep-last",
                                                           str(n + 10), str(src), str(img)]))
        for k, v in out.items():
            print(f"{k}: {statistics.median(v):.3f} s (median of {len(v)})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
