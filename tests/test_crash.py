"""Crash safety: a writer SIGKILLed at any moment leaves an image that opens, verifies, and holds
exactly the last generation it reported committed, or the one it was committing.

The writer is a child process (``support/crashwriter.py``) committing generations whose bytes
are a function of (seed, generation number) (``support/crashplan.py``), so after every kill the
parent checks every retained generation byte for byte. Kills come two ways: at a random moment,
and by the child itself at its N-th pwrite/fsync (random N), before, after or halfway through
the call, which lands in every step of a commit (chunk and page writes, the generation table,
both fsyncs, the superblock write).

The seed is printed (``seed=...``); set DISKRSYNC_CRASH_SEED to replay a run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO

import pytest
from support.crashplan import CS, FANOUT, KEEP, SIZES, Model

from diskrsync.base.errors import EXIT_REDUNDANCY_LOST
from diskrsync.compression.image import Image

pytestmark = pytest.mark.process

WRITER = Path(__file__).parent / "support" / "crashwriter.py"
SEED = int(os.environ.get("DISKRSYNC_CRASH_SEED") or random.randrange(2**32))
RANDOM_KILLS = 25
SELF_KILLS = 45
# live data is at most a few generations of the largest size (keep=2, the older superblock's
# table, a checkpoint, pinned nothing): a leak would grow the file kill after kill
MAX_FILE = 12 * max(SIZES)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diskrsync.cli", *args],
        capture_output=True, text=True, timeout=60,
    )


def spawn(path: str, seed: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), path, str(seed), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class Lines:
    """The one reader of a child's stdout and stderr until they close: a thread each, every
    line kept (a readline() followed by communicate() can lose what the first buffered)."""

    def __init__(self, child: subprocess.Popen[str]) -> None:
        self.out: list[str] = []
        self.err: list[str] = []
        self.ready = threading.Event()
        assert child.stdout is not None and child.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(child.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(child.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)
            if line == "ready\n":
                self.ready.set()
        self.ready.set()  # closed: nothing more will come

    def join(self, timeout: float) -> tuple[str, str]:
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), "the child's output did not close"
        return "".join(self.out), "".join(self.err)


def reported(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed ")]


def check(path: str, model: Model, last: int) -> int:
    """The image after a kill: current is ``last`` or ``last + 1``, every retained generation
    reads back exactly, verify passes. Returns the current generation number (0: none)."""
    with Image.open(path) as img:
        gens = [g.number for g in img.generations()]
        cur = gens[-1] if gens else 0
        assert cur in (last, last + 1), f"current generation {cur}, child reported {last}"
        assert gens == list(range(max(1, cur - KEEP + 1), cur + 1))
        for number in gens:
            with img.snapshot(number) as snap:
                got = snap.read(0, snap.size)
            want = model[number]
            assert len(got) == len(want), f"generation {number} has the wrong size"
            assert got == want, f"generation {number} does not read back exactly"
        damaged = img.damaged_slots
    r = cli("verify", path)
    # a superblock torn by the kill costs its copy of the previous commit only (exit 12)
    assert r.returncode == (EXIT_REDUNDANCY_LOST if damaged else 0), \
        f"verify failed after a kill:\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stdout + r.stderr
    assert os.path.getsize(path) <= MAX_FILE, "the image keeps growing across kills"
    return cur


def finish(path: str, seed: int, model: Model, last: int) -> None:
    """After all the kills, an unharmed writer still commits on top of the image."""
    child = spawn(path, seed, "--max-gens", "3")
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    nums = reported(out)
    assert len(nums) == 3 and nums[0] in (last + 1, last + 2)
    check(path, model, nums[-1])


def new_image(tmp_path: Path) -> str:
    path = str(tmp_path / "crash.img")
    Image.create(path, chunk_size=CS, fanout=FANOUT).close()
    return path


def test_killed_at_random_moments(tmp_path):
    print(f"seed={SEED}")
    rnd = random.Random(SEED)
    path = new_image(tmp_path)
    model = Model(SEED)
    last = 0
    kills = 0
    for _ in range(RANDOM_KILLS):
        child = spawn(path, SEED)
        lines = Lines(child)
        try:
            assert lines.ready.wait(60), "the child never got ready"
            assert lines.out[:1] == ["ready\n"], "".join(lines.err)
            time.sleep(rnd.uniform(0, 0.03))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
            out, err = lines.join(60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, err
        kills += 1
        nums = reported(out)
        if nums:
            assert nums[0] in (last + 1, last + 2), "the child did not continue from the image"
            last = nums[-1]
        last = check(path, model, last)
    print(f"random kills: {kills}, generations reached: {last}")
    assert last > RANDOM_KILLS // 2, "the kills hardly let the child commit anything"
    finish(path, SEED, model, last)


# (target, how, largest N): which I/O call the child dies at
KILL_POINTS = [
    ("any", "before", 60),
    ("any", "after", 60),
    ("any", "torn", 60),
    ("fsync", "before", 8),
    ("fsync", "after", 8),
    ("sb", "before", 4),
    ("sb", "after", 4),
    ("sb", "torn", 4),
    ("table", "torn", 4),
]


def test_killed_inside_commits(tmp_path):
    print(f"seed={SEED}")
    rnd = random.Random(SEED + 1)
    path = new_image(tmp_path)
    model = Model(SEED)
    last = 0
    hits: Counter[str] = Counter()
    for i in range(SELF_KILLS):
        target, how, top = KILL_POINTS[i % len(KILL_POINTS)]
        nth = rnd.randint(1, top)
        cut = rnd.choice([1, 17, 100, 2048, 4095, 5000, 16383])
        child = spawn(path, SEED, "--target", target, "--how", how, "--nth", str(nth),
                      "--cut", str(cut))
        try:
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, f"child was not killed:\n{err}"
        killed = [line for line in out.splitlines() if line.startswith("KILL ")]
        assert len(killed) == 1, out
        what = killed[0]
        hits[f"{target}/{how}"] += 1
        if "pwrite sb" in what:
            hits["superblock write"] += 1
        if "fsync" in what:
            hits["fsync"] += 1
        nums = reported(out)
        if nums:
            last = nums[-1]
        last = check(path, model, last)
    print(f"self kills: {sum(hits[f'{t}/{h}'] for t, h, _ in KILL_POINTS)}, "
          f"generations reached: {last}, points: {dict(hits)}")
    assert hits["superblock write"] >= 6 and hits["fsync"] >= 8
    finish(path, SEED, model, last)


def test_torn_superblock_falls_back_and_verify_warns(tmp_path):
    """A half-written superblock (torn at the kill) is ignored: the previous generation is
    current, verify passes with a warning, and the next commit rewrites that slot."""
    print(f"seed={SEED}")
    path = new_image(tmp_path)
    model = Model(SEED)
    child = spawn(path, SEED, "--max-gens", "2")
    out, _ = child.communicate(timeout=60)
    assert reported(out) == [1, 2]
    child = spawn(path, SEED, "--target", "sb", "--how", "torn", "--nth", "1", "--cut", "60")
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL and "KILL torn pwrite sb" in out
    with Image.open(path) as img:
        assert len(img.damaged_slots) == 1
    assert check(path, model, 2) == 2
    r = cli("verify", path)
    assert r.returncode == EXIT_REDUNDANCY_LOST and "warning: superblock copy" in r.stderr
    finish(path, SEED, model, 2)
    with Image.open(path) as img:
        assert img.damaged_slots == ()
