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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXE = str(REPO / ".venv" / "bin" / "diskrsync")


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def per_thread(cmd: list[str]) -> tuple[float, list[float]]:
    """(wall seconds, CPU seconds of each thread, the main thread first then the others by
    decreasing CPU), the threads' counters polled every 10 ms until the command exits."""
    tick = os.sysconf("SC_CLK_TCK")
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, float] = {}
    while child.poll() is None:
        try:
            for tid in os.listdir(f"/proc/{child.pid}/task"):
                with open(f"/proc/{child.pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                seen[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
        time.sleep(0.01)
    wall = time.perf_counter() - t
    main_cpu = seen.pop(child.pid, 0.0)
    return wall, [main_cpu, *sorted(seen.values(), reverse=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", action="store_true",
                    help="instead: CPU seconds of each thread of each case (one run)")
    args = ap.parse_args()
    src = Path(args.data) / "synth.img"
    with open(src, "rb") as f:  # warm
        while f.read(16 << 20):
            pass
    with tempfile.TemporaryDirectory(prefix="workers-") as tmp:
        img = Path(tmp) / "img.spgz"
        if args.threads:
            for w in [int(x) for x in args.workers.split(",")]:
                if img.exists():
                    os.unlink(img)
                for name, cmd in (("first push", ["push", "-q", str(src), str(img)]),
                                  ("no-change push", ["push", "-q", str(src), str(img)]),
                                  ("restore", ["restore", "-q", "-f", str(img), "/dev/null"]),
                                  ("verify", ["verify", str(img)])):
                    wall, cpu = per_thread([EXE, cmd[0], "--workers", str(w), *cmd[1:]])
                    print(f"workers {w}: {name}: {wall:.2f} s wall; CPU s per thread (main "
                          f"first): {' '.join(f'{c:.2f}' for c in cpu if c >= 0.01)}",
                          flush=True)
            return
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
                cpu_s = statistics.median(r[1] for r in runs)
                print(f"workers {w}: {name}: {wall:.2f} s wall, {cpu_s:.2f} s CPU "
                      f"(median of {len(runs)})", flush=True)


if __name__ == "__main__":
    main()
