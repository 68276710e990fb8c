#!/usr/bin/env python3
"""A push from a cold source (issue 16): a script, not a test. Needs root (drop_caches).

    .venv/bin/python tests/bench/bench_cold.py --data /work/bench-data --scratch DIR [--runs 5]

Each case runs after ``sync; echo 3 > /proc/sys/vm/drop_caches``, interleaved in every run
(so a noisy neighbour hits all cases alike), and the medians and the per-run ratio to ``cat``
are printed:

- ``cat``: ``cat synth.img > /dev/null``, the reference; ``dd``: ``dd bs=4M`` of it;
- ``startup``: ``diskrsync --version`` (the interpreter and its imports read cold);
- ``nochange``: ``diskrsync push synth.img IMG`` where IMG already holds it (whole command);
- ``nochange-before`` (with ``--before EXE``): the same with another build;
- ``first``: a push into a new image; ``changed``: a 1%-changed push (synth2.img and synth.img
  pushed in turn into a second image, each differing from the one before by 1%).

Per push it also reports what the process read from storage (``read_bytes`` of
``/proc/PID/io``, the same counter as ``getrusage``'s ``ru_inblock``), what it asked for
through ``read``/``pread`` (``rchar``: a second read of the same bytes shows there even when
the page cache answers it), and what of the source and of IMG is left in the page cache after
the command (``fincore``: the target's index pages read by a no-change push, and whether the
source's pages were dropped after reading).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXE = str(REPO / ".venv" / "bin" / "diskrsync")
MiB = 1 << 20


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cached(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def run(cmd: str | list[str]) -> dict[str, float]:
    """Wall seconds of a command after dropping the caches, with what it read: ``read_bytes``
    (exact, from the children's ``ru_inblock``) and ``rchar`` (the last value polled from
    ``/proc/PID/io`` before it exited)."""
    drop_caches()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    child = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    rchar = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
            rchar = max(rchar, int(fields["rchar"]))
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode:
        assert child.stderr is not None
        sys.exit(f"failed ({child.returncode}): {cmd}\n{child.stderr.read().decode()}")
    return {"seconds": wall, "read_bytes": (after.ru_inblock - before.ru_inblock) * 512,
            "rchar": rchar, "cpu": (after.ru_utime - before.ru_utime)
            + (after.ru_stime - before.ru_stime)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--scratch", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cases", default="cat,dd,startup,nochange,first,changed")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--before", metavar="EXE",
                    help="another build's diskrsync (e.g. of the commit before a change): "
                         "its no-change push runs in the same runs as case nochange-before")
    args = ap.parse_args()
    if os.geteuid():
        sys.exit("needs root: drop_caches")
    src, src2 = args.data / "synth.img", args.data / "synth2.img"
    args.scratch.mkdir(parents=True, exist_ok=True)
    same, changed, first = (args.scratch / n for n in ("same.spgz", "changed.spgz",
                                                      "first.spgz"))
    for img in (same, changed):  # set up warm: not measured
        if not img.exists():
            subprocess.run([EXE, "push", "--quiet", str(src), str(img)], check=True)
    flip = [src2, src]  # what changed.spgz is pushed from next: 1% differs each time

    def first_push() -> list[str]:
        first.unlink(missing_ok=True)
        return [EXE, "push", "--quiet", str(src), str(first)]

    def changed_push() -> list[str]:
        flip.reverse()
        return [EXE, "push", "--quiet", str(flip[1]), str(changed)]

    commands: dict[str, Callable[[], str | list[str]]] = {
        "cat": lambda: f"cat {src} > /dev/null",
        "dd": lambda: f"dd if={src} of=/dev/null bs=4M status=none",
        "startup": lambda: [EXE, "--version"],
        "nochange": lambda: [EXE, "push", "--quiet", str(src), str(same)],
        "first": first_push,
        "changed": changed_push,
    }
    if args.before:
        commands["nochange-before"] = lambda: [args.before, "push", "--quiet", str(src),
                                               str(same)]
    cases = args.cases.split(",") + (["nochange-before"] if args.before else [])
    results: dict[str, list[dict[str, float]]] = {c: [] for c in cases}
    for r in range(args.runs):
        for case in cases:
            res = run(commands[case]())
            if case.startswith("nochange"):
                res["src_cached"] = cached(src)
                res["img_cached"] = cached(same)
            results[case].append(res)
            print(f"run {r + 1} {case:15s} {res['seconds']:6.2f} s  read_bytes "
                  f"{res['read_bytes'] / MiB:8.1f} MiB  rchar {res['rchar'] / MiB:8.1f} MiB",
                  flush=True)
    first.unlink(missing_ok=True)
    size = src.stat().st_size
    print(f"\n{platform.node()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"source {size / MiB:.0f} MiB, medians of {args.runs}")
    summary: dict[str, dict[str, float]] = {}
    for case, rows in results.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        if "cat" in results:
            med["x_cat"] = statistics.median(row["seconds"] / c["seconds"]
                                             for row, c in zip(rows, results["cat"],
                                                               strict=True))
        summary[case] = med
        extra = "".join(f"  {k} {med[k] / MiB:.1f} MiB" for k in ("src_cached", "img_cached")
                        if k in med)
        ratio = f"  {med['x_cat']:.2f}x cat" if "x_cat" in med else ""
        print(f"{case:15s} {med['seconds']:6.2f} s{ratio}  {size / med['seconds'] / 1e6:6.0f} "
              f"MB/s  read_bytes {med['read_bytes'] / MiB:7.1f} MiB  rchar "
              f"{med['rchar'] / MiB:7.1f} MiB  cpu {med['cpu']:.2f} s{extra}")
    if args.before and "nochange" in results:
        pairs = [a["seconds"] / b["seconds"] for a, b in zip(results["nochange"],
                                                             results["nochange-before"],
                                                             strict=True)]
        print(f"nochange / nochange-before, median of the runs' ratios: "
              f"{statistics.median(pairs):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "medians": summary}, indent=1))


if __name__ == "__main__":
    main()
