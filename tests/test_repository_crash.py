"""SIGKILL of repository commands at random points (docs/repository.md, "Faults"): a push
killed anywhere leaves every committed generation intact and the next push completes
(reusing what the killed one stored); a killed prune leaves a repository that verifies and
the next prune completes. On a local directory and on the real S3 service."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.repochild import CHUNK, disk_bytes
from support.swift import SwiftServer, credentials

from diskrsync.compression.objstore import open_store
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repomaint import prune, verify
from diskrsync.compression.repository import Repository

CHILD = Path(__file__).parent / "support" / "repochild.py"
CHUNKS = 256  # 4 MiB: ~48 packs of 64 KiB


def run_child(args: list[str], *, kill_when: int | None = None,
              delay: float | None = None, store_url: str = "") -> int:
    """Run the child; SIGKILL it once the store holds ``kill_when`` packs or after
    ``delay`` seconds (whichever is given), unless it ends first. Its exit status."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen([sys.executable, str(CHILD), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = open_store(store_url) if kill_when is not None else None
    before = sum(1 for _ in store.list("packs/")) if store is not None else 0
    deadline = time.monotonic() + 120
    try:
        start = time.monotonic()
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the child hung"
            if delay is not None and time.monotonic() - start >= delay:
                break
            if store is not None and sum(1 for _ in store.list("packs/")) - before >= (
                    kill_when or 0):
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    return proc.returncode


def check_resumes(url: str, seed: int) -> None:
    repo = Repository.open(open_store(url))
    committed = {g.number: repo.snapshot("vm", g.number).manifest.root
                 for g in repo.generations("vm")}
    data = disk_bytes(seed, CHUNKS)
    write_disk(repo, "vm", lambda off, n: data[off : off + n], len(data))
    repo = Repository.open(open_store(url))
    assert verify(repo).ok
    snap = repo.snapshot("vm")
    assert snap.read(0, snap.size) == data
    for number, root in committed.items():  # nothing committed was lost or changed
        assert repo.snapshot("vm", number).manifest.root == root


def kill_pushes(url: str, rounds: int, rng: random.Random) -> None:
    assert run_child(["push", url, "vm", "1", str(CHUNKS)], store_url=url) == 0
    killed = 0
    for r in range(rounds):
        seed = 10 + r
        killed += run_child(["push", url, "vm", str(seed), str(CHUNKS)],
                            kill_when=rng.randint(1, 40), store_url=url) == -signal.SIGKILL
        check_resumes(url, seed)
    assert killed >= rounds - 1  # the kills happened mid-push


@pytest.mark.process
@pytest.mark.slow
def test_push_killed_at_random_points_dir(tmp_path: Path) -> None:
    kill_pushes(str(tmp_path), 4, random.Random(1))


@pytest.mark.process
@pytest.mark.s3
@pytest.mark.slow
def test_push_killed_at_random_points_s3(swift: SwiftServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", swift.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    kill_pushes(f"s3://{swift.new_bucket()}/r", 3, random.Random(2))


@pytest.mark.process
@pytest.mark.slow
def test_prune_killed_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(3)
    for r in range(4):
        url = str(tmp_path / f"r{r}")
        os.mkdir(url)
        for seed in (1, 2, 3):
            assert run_child(["push", url, "vm", str(seed), str(CHUNKS)]) == 0
        repo = Repository.open(open_store(url))
        keep = {n: repo.snapshot("vm", n).read(0, CHUNKS * CHUNK) for n in (2, 3)}
        run_child(["prune", url, "vm", "1"], delay=rng.uniform(0.05, 1.5))
        repo = Repository.open(open_store(url))
        assert verify(repo).ok
        assert [g.number for g in repo.generations("vm")] in ([1, 2, 3], [2, 3])
        for n, content in keep.items():
            assert repo.snapshot("vm", n).read(0, CHUNKS * CHUNK) == content
        # the next prune completes: the killed one's lock is stale at once (its process
        # no longer runs on this machine)
        prune(repo, [g for g in repo.generations("vm") if g.number == 1], grace=0)
        prune(Repository.open(open_store(url)), [], grace=0)
        assert verify(Repository.open(open_store(url))).ok


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(CHILD), *args],
                            env={**os.environ, "PYTHONSAFEPATH": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.process
@pytest.mark.slow
def test_two_pushes_of_one_disk_end_with_one_winner(tmp_path: Path) -> None:
    """Started together: one commits, the other either waits its turn (it started after
    the first finished) or fails busy (exit 4) without committing; nothing is lost. Pushes
    of two different disks never interfere."""
    url = str(tmp_path)
    assert run_child(["push", url, "base", "1", "8"]) == 0  # the repository exists
    outcomes = []
    for r in range(3):
        procs = [_start(["push", url, "vm", str(20 + r * 2 + i), str(4 * CHUNKS)])
                 for i in (0, 1)]
        codes = []
        for p in procs:
            _out, err = p.communicate(timeout=120)
            codes.append(p.returncode)
            if p.returncode:
                assert p.returncode == 4 and b"busy" in err and b"write lock on disk vm" in err
        assert 0 in codes
        outcomes.append(codes)
    # 16 MiB pushes started together overlap: the lock excluded one at least once
    assert any(4 in codes for codes in outcomes), outcomes
    repo = Repository.open(open_store(url))
    assert len(repo.generations("vm")) == sum(c.count(0) for c in outcomes)
    assert verify(repo).ok
    procs = [_start(["push", url, f"d{i}", str(40 + i), str(CHUNKS)]) for i in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for p in procs:
        assert p.stderr is not None
        p.stderr.close()


@pytest.mark.process
@pytest.mark.s3
@pytest.mark.slow
def test_the_store_stopped_mid_push_and_restarted(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    with SwiftServer(tmp_path / "swift") as srv:
        monkeypatch.setenv("AWS_ENDPOINT_URL", srv.endpoint)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        url = f"s3://{srv.new_bucket()}/r"
        assert run_child(["push", url, "vm", "1", str(CHUNKS)]) == 0
        proc = _start(["push", url, "vm", "2", str(CHUNKS)])
        store = open_store(url)
        before = sum(1 for _ in store.list("packs/"))
        deadline = time.monotonic() + 60
        while sum(1 for _ in store.list("packs/")) < before + 5 and proc.poll() is None:
            assert time.monotonic() < deadline, "the push never stored anything"
            time.sleep(0.01)
        srv.kill()  # the store dies mid-push
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 5), err  # it failed as the peer's fault, or was done
        srv.start()  # same ports: the client's endpoint still holds
        check_resumes(url, 2)
