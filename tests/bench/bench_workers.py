#!/usr/bin/env python3
"""Worker threads against time (issue 16): a script, not a test.

    .venv/bin/python tests/bench/bench_workers.py --data bench-data [--workers 1,2] [--runs 3]

For each worker count (``--workers N``), whole commands on ``synth.img`` (2 GiB, page cache
warm): a first push into a new image, a no-change push into it, ``restore IMG /dev/null`` and
``verify IMG``. Prints per case the median wall time and the median CPU time (user + system,
all threads): the inputs of the model in docs/benchmarks.md (Amdahl: wall = serial +
parallel / workers, fitted from the two counts).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXE = str(REPO / ".venv" / "bin" / "diskrsync")


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of a command."""
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    src = Path(args.data) / "synth.img"
    with open(src, "rb") as f:  # warm
        while f.read(16 << 20):
            pass
    with tempfile.TemporaryDirectory(prefix="workers-") as tmp:
        img = Path(tmp) / "img.spgz"
        for w in [int(x) for x in args.workers.split(",")]:
            opt = ["--workers", str(w)]
            cases: dict[str, list[tuple[float, float]]] = {
                "first push": [], "no-change push": [], "restore": [], "verify": []}
            for _ in range(args.runs):
                if img.exists():
                    os.unlink(img)
                cases["first push"].append(timed([EXE, "push", "-q", *opt, str(src), str(img)]))
                cases["no-change push"].append(timed([EXE, "push", "-q", *opt, str(src),
                                                      str(img)]))
                cases["restore"].append(timed([EXE, "restore", "-q", "-f", *opt, str(img),
                                               "/dev/null"]))
                cases["verify"].append(timed([EXE, "verify", *opt, str(img)]))
            for name, runs in cases.items():
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                print(f"workers {w}: {name}: {wall:.2f} s wall, {cpu:.2f} s CPU "
                      f"(median of {len(runs)})", flush=True)


if __name__ == "__main__":
    main()
