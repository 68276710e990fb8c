"""Safety rails (issue 15): a first push that will not fit is refused before anything is
written, a --chunk-size an existing image ignores and a source that shrank are warned about
(also in --json), and ``restore IMAGE -`` refuses a terminal unless --force."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.imagetools import cli

from diskrsync.base.errors import LocalError
from diskrsync.compression import targets
from diskrsync.compression.sources import SAMPLE_BYTES, RawSource, space_estimate
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions

CS = 16 * 1024
MiB = 1 << 20
REQ = PushRequest(source=SourceOptions(chunk_size=CS))


def estimate(path: Path) -> dict[str, int]:
    reader = RawSource(str(path))
    try:
        return space_estimate(reader)
    finally:
        reader.close()


# -- the estimate ------------------------------------------------------------------------------


@pytest.mark.inproc
def test_estimate_of_a_small_source_is_exact(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.write_bytes(bytes(MiB))
    assert estimate(src) == {"stored": 0, "raw": 0, "sampled": MiB}
    src.write_bytes(os.urandom(MiB))
    got = estimate(src)
    assert got["raw"] == MiB and MiB <= got["stored"] < MiB + 4096  # stored raw
    src.write_bytes(b"the same words again " * (MiB // 21))
    assert estimate(src)["stored"] < MiB // 50  # text compresses


@pytest.mark.inproc
def test_estimate_of_a_large_source_samples_it(tmp_path: Path) -> None:
    """64 MiB, every other MiB random: 32 samples of 64 KiB read 2 MiB and find about half
    of it data, stored as it is (evenly spaced samples would all hit the zeros)."""
    src = tmp_path / "s"
    rnd = random.Random(5)
    with open(src, "wb") as f:
        for i in range(64):
            f.write(rnd.randbytes(MiB) if i % 2 == 0 else bytes(MiB))
    got = estimate(src)
    assert got["sampled"] == 32 * SAMPLE_BYTES
    assert 24 * MiB <= got["raw"] <= 40 * MiB
    assert got["raw"] <= got["stored"] <= got["raw"] * 1.01


# -- refusing a first push that will not fit --------------------------------------------------


@pytest.fixture
def little_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's filesystem has 512 KiB free (as statvfs would say)."""
    monkeypatch.setattr(targets, "free_bytes", lambda folder: 512 * 1024)


@pytest.mark.inproc
@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
def test_first_push_that_will_not_fit_is_refused(tmp_path: Path, little_space: None,
                                                 raw: bool) -> None:
    src, dst = tmp_path / "s", tmp_path / "out" / "t"
    dst.parent.mkdir()
    src.write_bytes(os.urandom(2 * MiB))
    req = PushRequest(source=REQ.source, raw_target=raw)
    with pytest.raises(LocalError, match=r"not enough space for a (first push into|new raw "
                                         r"file) .*: about 2\.\d MiB needed .*512\.0 KiB free "
                                         r"in .*nothing was written"):
        local_push(str(src), str(dst), req)
    assert list(dst.parent.iterdir()) == []  # nothing written, no temporary file left
    # what fits goes ahead; so does every later push into an image with a generation
    src.write_bytes(os.urandom(256 * 1024))
    assert local_push(str(src), str(dst), req).chunks_differing == 16
    src.write_bytes(os.urandom(2 * MiB))
    if not raw:
        assert local_push(str(src), str(dst), req).generation == 2


@pytest.mark.inproc
def test_empty_image_is_a_first_push_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         ) -> None:
    src, dst = tmp_path / "s", tmp_path / "t.spgz"
    src.write_bytes(os.urandom(2 * MiB))
    dst.write_bytes(b"")
    monkeypatch.setattr(targets, "free_bytes", lambda folder: 100 * 1024)
    with pytest.raises(LocalError, match="not enough space"):
        local_push(str(src), str(dst), REQ)
    assert dst.read_bytes() == b""  # the empty file is not made an image


@pytest.mark.inproc
def test_dry_run_is_not_checked(tmp_path: Path, little_space: None) -> None:
    src, dst = tmp_path / "s", tmp_path / "t.spgz"
    src.write_bytes(os.urandom(2 * MiB))
    dry = PushRequest(source=SourceOptions(chunk_size=CS, dry_run=True),
                      target=targets.TargetOptions(dry_run=True))
    assert local_push(str(src), str(dst), dry).chunks_differing == 2 * MiB // CS


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
@pytest.mark.process
def test_first_push_into_a_small_filesystem_is_refused(tmp_path: Path) -> None:
    """A real filesystem (tmpfs of 2 MiB): exit 3, one line, nothing written."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        src = tmp_path / "s"
        src.write_bytes(os.urandom(4 * MiB))
        r = cli("push", str(src), str(small / "t.spgz"))
        err = r.stderr.decode()
        assert r.returncode == 3 and err.count("\n") == 1, err
        assert "not enough space for a first push" in err and "nothing was written" in err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# -- warnings ------------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
def test_a_source_that_shrank_is_warned_about(tmp_path: Path, raw: bool) -> None:
    src, dst = tmp_path / "s", tmp_path / "t"
    src.write_bytes(os.urandom(4 * CS))
    extra = ["--no-compress"] if raw else []
    assert cli("push", "-q", *extra, str(src), str(dst)).returncode == 0
    src.write_bytes(src.read_bytes()[: 3 * CS])
    r = cli("push", "--json", *extra, str(src), str(dst))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shrunk_from"] == 4 * CS and out["size"] == 3 * CS
    assert any("smaller than the target's previous disk" in w for w in out["warnings"])
    assert "diskrsync: warning: the source (49152 bytes) is smaller" in r.stderr.decode()
    r = cli("push", "--json", *extra, str(src), str(dst))  # same size now: no warning
    assert json.loads(r.stdout)["shrunk_from"] is None and b"warning" not in r.stderr


@pytest.mark.process
def test_chunk_size_an_existing_image_ignores_is_warned_about(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "t.spgz"
    src.write_bytes(os.urandom(4 * CS))
    assert cli("push", "-q", "--chunk-size", "64K", str(src), str(dst)).returncode == 0
    r = cli("push", "--json", "--chunk-size", "128K", str(src), str(dst))
    out = json.loads(r.stdout)
    assert out["chunk_size_ignored"] is True and out["chunk_size"] == 64 * 1024
    assert "--chunk-size 128.0 KiB is ignored" in r.stderr.decode()
    for same in (["--chunk-size", "64K"], []):
        r = cli("push", "--json", *same, str(src), str(dst))
        assert json.loads(r.stdout)["chunk_size_ignored"] is False and not r.stderr


# -- restore to a terminal ----------------------------------------------------------------


@contextlib.contextmanager
def terminal() -> Iterator[tuple[int, bytearray]]:
    """A pseudo-terminal: (the end a child writes to, what arrived at the other end)."""
    master, slave = pty.openpty()
    got = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the last writer is gone
            while chunk := os.read(master, 65536):
                got.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield slave, got
    finally:
        os.close(slave)
        reader.join(30)
        os.close(master)


@pytest.mark.process
def test_restore_to_a_terminal_needs_force(tmp_path: Path) -> None:
    src, image = tmp_path / "s", tmp_path / "i.spgz"
    src.write_bytes(b"not for a screen " * 1000)
    assert cli("push", "-q", str(src), str(image)).returncode == 0
    cmd = [sys.executable, "-m", "diskrsync.cli", "restore", str(image), "-", "-q"]
    with terminal() as (tty, got):
        r = subprocess.run(cmd, stdout=tty, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 2 and b"refusing to write a disk to a terminal" in r.stderr
    assert r.stderr.count(b"\n") == 1 and b"screen" not in got
    with terminal() as (tty, got):
        r = subprocess.run([*cmd, "--force"], stdout=tty, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"not for a screen" in got
    r = subprocess.run(cmd, capture_output=True, timeout=60)  # a pipe needs no --force
    assert r.returncode == 0 and r.stdout == src.read_bytes()
