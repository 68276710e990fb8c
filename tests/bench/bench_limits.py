#!/usr/bin/env python3
"""Peak memory against disk size (issue 16): a script, not a test.

    .venv/bin/python tests/bench/bench_limits.py [--sizes 8G,1T] [--work DIR]

For each size a sparse file of that size (a few MiB of data at its start, middle and end; the
rest holes, which ``SEEK_DATA`` lets the scan skip) is pushed into a new image, then pushed
again unchanged, three ways, each process's peak RSS (``VmHWM``, polled) reported:

* ``local``: ``diskrsync push SRC IMG`` (source and target in one process);
* ``push``/``serve``: the same no-change push through ``--rsh`` to a stand-in ``ssh`` that runs
  the remote command on this machine, so the source and ``serve`` are separate processes;
* ``mount``: ``diskrsync mount`` of the image, ``ls -R`` of it and a read of 64 MiB of
  ``disk.raw`` (start, middle, end) — the mount's chunk cache (``--cache-size``, 256M) aside.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXE = str(REPO / ".venv" / "bin" / "diskrsync")

FAKE_SSH = """#!{py}
import os, subprocess, sys, time
args = sys.argv[1:]
while args and args[0].startswith("-"):  # options (with a value where ssh takes one)
    opt = args.pop(0)
    if opt in ("-o", "-p", "-l", "-i", "-F", "-c", "-S"):
        args.pop(0)
cmd = " ".join(args[1:])
child = subprocess.Popen(["sh", "-c", "exec " + cmd])
peak = 0
while child.poll() is None:
    try:
        with open(f"/proc/{{child.pid}}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.02)
with open({out!r}, "w") as f:
    f.write(str(peak))
sys.exit(child.returncode)
"""


def parse_size(s: str) -> int:
    units = {"G": 1 << 30, "T": 1 << 40, "M": 1 << 20}
    return int(s[:-1]) * units[s[-1]]


def peak_of(cmd: list[str], **kw: object) -> tuple[float, int, str]:
    """(seconds, peak RSS in KiB, stdout) of a command, its VmHWM polled until it exits."""
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, **kw)  # type: ignore[call-overload]
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    out, err = child.communicate()
    if child.returncode:
        sys.exit(f"failed ({child.returncode}): {' '.join(cmd)}\n{err}")
    return time.perf_counter() - t, peak, out


def make_sparse(path: Path, size: int, layout: str = "three") -> None:
    """``three``: 12 MiB of data at the start, middle and end; ``scattered``: 4 KiB every
    16 MiB, one chunk in each index page (of 128 KiB chunks, 128 a page), so a first push
    dirties every page of the index (what ``DIRTY_INDEX_BYTES`` bounds)."""
    with open(path, "wb") as f:
        f.truncate(size)
        if layout == "scattered":
            block = os.urandom(4096)
            for off in range(0, size, 16 << 20):
                f.seek(off)
                f.write(block[:8] + off.to_bytes(8, "little") + block[16:])
            return
        for off in (0, size // 2, size - (4 << 20)):
            f.seek(off)
            f.write(os.urandom(1 << 20) * 4)


def vmhwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def mount_case(img: Path, work: Path, size: int) -> tuple[float, int]:
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([EXE, "mount", "-f", str(img), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)
        t = time.perf_counter()
        subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, check=True)
        with open(mnt / "disk.raw", "rb") as f:
            for off in (0, size // 2, size - (4 << 20)):
                f.seek(off)
                for _ in range(16):
                    f.read(1 << 20)
        elapsed = time.perf_counter() - t
        peak = vmhwm(proc.pid)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.wait(30)
    return elapsed, peak


def main() -> None:
    global EXE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8G,1T")
    ap.add_argument("--work", default=None, help="a directory for the sparse files and images")
    ap.add_argument("--no-mount", action="store_true")
    ap.add_argument("--layout", choices=("three", "scattered"), default="three",
                    help="where the sparse file's data is (see make_sparse)")
    ap.add_argument("--exe", default=EXE, help="the diskrsync to measure (another build)")
    args = ap.parse_args()
    EXE = args.exe
    work = Path(tempfile.mkdtemp(prefix="limits-", dir=args.work))
    fake = work / "fakessh"
    try:
        results = []
        for label in args.sizes.split(","):
            size = parse_size(label)
            src, img = work / f"src-{label}.raw", work / f"img-{label}.spgz"
            make_sparse(src, size, args.layout)
            first, first_peak, _ = peak_of([EXE, "push", "--json", str(src), str(img)])
            local, local_peak, _ = peak_of([EXE, "push", "--json", str(src), str(img)])
            out = work / "serve-peak"
            fake.write_text(FAKE_SSH.format(py=sys.executable, out=str(out)))
            fake.chmod(0o755)
            remote, push_peak, _ = peak_of([EXE, "push", "--json", "--rsh", str(fake),
                                            "--remote-cmd", EXE, str(src),
                                            f"localhost:{img}"])
            serve_peak = int(out.read_text())
            row = {"size": label, "first_s": round(first, 2), "first_peak_mib": first_peak >> 10,
                   "local_s": round(local, 2), "local_peak_mib": local_peak >> 10,
                   "remote_s": round(remote, 2), "push_peak_mib": push_peak >> 10,
                   "serve_peak_mib": serve_peak >> 10}
            if not args.no_mount:
                m, mount_peak = mount_case(img, work, size)
                row.update(mount_s=round(m, 2), mount_peak_mib=mount_peak >> 10)
            print(json.dumps(row), flush=True)
            results.append(row)
            src.unlink()
            img.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
