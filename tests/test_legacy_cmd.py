"""The Go-compatibility commands: diskrsync as the remote end of a Go client, ``push --legacy``
toward a Go server, ``convert``, and the hint a plain push gives when it meets the Go tool.

The remote end is tested as a whole program (``python -m diskrsync.cli --target ... PATH``,
what the Go client starts through ssh) against the transcripts recorded between two Go
processes; loopbacks connect our own client role to that program over pipes or a real sshd.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.legacy_vectors import (
    CASES,
    Case,
    MemoryStore,
    have_vectors,
    sha256,
    transcript,
    vector_input,
)
from support.paths import REPO, VECTORS

from diskrsync.base.errors import PeerError, UsageError
from diskrsync.cli import main
from diskrsync.cli.main import looks_like_go_remote
from diskrsync.cli.requests import remote_options
from diskrsync.compression.container import open_image, sniff
from diskrsync.compression.convert import convert_snapshot
from diskrsync.compression.go_target import ImageTargetStore, open_legacy_target
from diskrsync.compression.image import Image
from diskrsync.compression.maintenance import verify
from diskrsync.compression.sources import RawSource
from diskrsync.synccore.channel import FdStream, FramedChannel
from diskrsync.synccore.go_io import GoProgressLines, ProgressLineParser, run_machine
from diskrsync.synccore.go_remote import GO_CLIENT_SOURCE, legacy_push
from diskrsync.synccore.legacy import (
    MAGIC,
    LegacySource,
    go_tree_shape,
)
from diskrsync.synccore.location import parse_location
from diskrsync.synccore.protocol import Decoder, ForeignPeer
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.remote import RemoteOptions
from diskrsync.synccore.source import SourceOptions, SourceSession
from diskrsync.synccore.target import TargetOptions

K = 1024
M = 1024 * K
GO_BLOCK = 128 * K
TIMEOUT = 60

needs_vectors = pytest.mark.skipif(not have_vectors(), reason="Go vectors not found")
DISKRSYNC_BIN = REPO / ".venv" / "bin" / "diskrsync"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class BytesReader:
    """Size + thread-safe read over bytes: a source for LegacySource and convert_snapshot."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.description = "bytes"

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


def make_image(path: Path, data: bytes, chunk_size: int = 128 * K) -> None:
    convert_snapshot(BytesReader(data), str(path), chunk_size=chunk_size, source="test")


def image_content(path: Path, generation: int | None = None) -> bytes:
    img = open_image(str(path))
    try:
        snap = img.snapshot(generation)
        try:
            return snap.read(0, snap.size)
        finally:
            snap.close()
    finally:
        img.close()


def generations(path: Path) -> list[Any]:
    img = Image.open(str(path))
    try:
        return img.generations()
    finally:
        img.close()


def remote_argv(*words: str) -> list[str]:
    """How the Go client's remote command starts our program (minus ssh)."""
    return [sys.executable, "-m", "diskrsync.cli", *words]


def run_remote(words: list[str], stdin: bytes, tmp: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(remote_argv(*words), input=stdin, capture_output=True,
                          timeout=TIMEOUT, cwd=tmp)


def temps_beside(path: Path) -> list[str]:
    return glob.glob(glob.escape(str(path)) + ".diskrsync-*")


LINE = re.compile(rb"^(\[Start (calc|sync)\]|Size: \d+|Update: \d+|diskrsync: .*)$")


def progress_phases(stderr: bytes) -> dict[str, tuple[int, list[int]]]:
    """Parse stderr as the Go client does; every line must be well formed.

    Returns {phase: (size, [update positions])}, and checks the rules the Go client relies
    on: calc first (if at all: none when there is nothing to hash), each phase starts with
    [Start NAME] + Size, updates never go backwards and the last one equals the size (when
    the size is not 0).
    """
    lines = stderr.decode().splitlines()
    phases: dict[str, tuple[int, list[int]]] = {}
    order = []
    current = None
    i = 0
    while i < len(lines):
        line = lines[i]
        assert LINE.match(line.encode()), f"malformed stderr line {line!r}"
        if line.startswith("[Start "):
            current = line[len("[Start ") : -1]
            order.append(current)
            size_line = lines[i + 1]
            assert size_line.startswith("Size: "), lines
            phases[current] = (int(size_line[6:]), [])
            i += 2
            continue
        if line.startswith("Update: "):
            assert current is not None
            phases[current][1].append(int(line[8:]))
        i += 1
    assert "calc" not in order[1:], order
    for name, (size, updates) in phases.items():
        assert updates == sorted(updates), (name, updates)
        if size > 0:
            assert updates and updates[-1] == size, (name, size, updates)
        else:
            assert not updates
    return phases


class RemoteProgram:
    """Our remote program started over a pipe pair, as ssh would start it."""

    def __init__(self, words: list[str], tmp: Path) -> None:
        self.stderr_path = tmp / f"stderr-{time.monotonic_ns()}.txt"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(remote_argv(*words), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, cwd=tmp)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        return os.read(self.proc.stdout.fileno(), n)

    def close_send(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def finish(self) -> tuple[int, bytes, bytes]:
        """(exit status, rest of stdout, stderr)."""
        assert self.proc.stdout is not None
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        rest = self.proc.stdout.read()
        rc = self.proc.wait(TIMEOUT)
        self._stderr.close()
        return rc, rest, self.stderr_path.read_bytes()


def push_through_pipes(data: bytes, words: list[str], tmp: Path) -> tuple[int, bytes, bytes]:
    """Our client's source role against our remote target program."""
    remote = RemoteProgram(words, tmp)
    source = LegacySource(BytesReader(data), max_send=3 * GO_BLOCK)
    try:
        run_machine(source, recv=remote.recv, send=remote.send)
    finally:
        remote.close_send()
    return remote.finish()


# ---------------------------------------------------------------------------------------------
# The remote end, byte for byte against the recorded Go transcripts
# ---------------------------------------------------------------------------------------------


def _before(case: Case) -> bytes | None:
    return None if case.target_before is None else vector_input(case.target_before)


@needs_vectors
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.process
def test_remote_target_image_is_byte_exact(case: Case, tmp_path: Path) -> None:
    """The whole program, fed what a Go source sent, answers exactly what the Go target did,
    and the image's new generation is the source's content."""
    s2d, d2s = transcript(case.name)
    path = tmp_path / "backup.img"
    before = _before(case)
    if before is not None:
        make_image(path, before)
    r = run_remote(["--target", "--calc-progress", str(path)], s2d, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == d2s
    phases = progress_phases(r.stderr)
    common = min(len(before or b""), len(vector_input(case.source_input)))
    assert phases == ({"calc": phases["calc"]} if common else {})
    assert not common or phases["calc"][0] == common
    assert sha256(image_content(path)) == case.source_sha256
    gens = generations(path)
    assert len(gens) == (1 if before is None else 2)
    assert gens[-1].source == GO_CLIENT_SOURCE
    assert temps_beside(path) == []


@needs_vectors
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("flag", [" --no-compress", "--no-compress"], ids=["space", "plain"])
@pytest.mark.process
def test_remote_target_raw_is_byte_exact(case: Case, flag: str, tmp_path: Path) -> None:
    """--no-compress as the Go client writes it (leading space, if no shell re-split it) or
    re-split: a raw file updated in place, same bytes on the wire."""
    s2d, d2s = transcript(case.name)
    path = tmp_path / "backup.raw"
    before = _before(case)
    if before is not None:
        path.write_bytes(before)
    r = run_remote(["--target", flag, "--calc-progress", str(path)], s2d, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == d2s
    progress_phases(r.stderr)
    assert sha256(path.read_bytes()) == case.source_sha256


@needs_vectors
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("kind", ["image", "raw"])
@pytest.mark.process
def test_remote_source_is_byte_exact(case: Case, kind: str, tmp_path: Path) -> None:
    """--source: fed the Go target's stream, our program writes exactly the Go source's."""
    s2d, d2s = transcript(case.name)
    data = vector_input(case.source_input)
    path = tmp_path / f"disk.{kind}"
    if kind == "image":
        make_image(path, data)
    else:
        path.write_bytes(data)
    r = run_remote(["--source", "--calc-progress", str(path)], d2s, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == s2d
    progress_phases(r.stderr)


@needs_vectors
@pytest.mark.process
def test_remote_source_serves_an_spgz_file(tmp_path: Path) -> None:
    """An SPGZ0001 backup is served as what it holds (b1's source is small_256k)."""
    s2d, d2s = transcript("b1_new_target")
    path = tmp_path / "old.spgz"
    shutil.copy(VECTORS / "a_small_256k.diskrsync.spgz", path)
    r = run_remote(["--source", str(path)], d2s, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == s2d and r.stderr == b""


@needs_vectors
@pytest.mark.process
def test_sync_progress_lines_follow_the_go_client_reader(tmp_path: Path) -> None:
    """With --sync-progress a second phase follows calc; it ends exactly at the final size."""
    s2d, _d2s = transcript("b4_grow")
    path = tmp_path / "t.raw"
    path.write_bytes(vector_input("v1"))
    r = run_remote(["--target", "--calc-progress", "--sync-progress", str(path)], s2d, tmp_path)
    assert r.returncode == 0, r.stderr
    phases = progress_phases(r.stderr)
    assert phases["calc"][0] == 2 * M
    assert phases["sync"][0] == len(vector_input("v1_grow"))


@needs_vectors
@pytest.mark.parametrize("role", ["target", "source"])
@pytest.mark.parametrize("case", ["b1_new_target", "b3_changed"])
@pytest.mark.process
def test_go_verbose_client_progress_lines_match_the_go_tool(role: str, case: str,
                                                           tmp_path: Path) -> None:
    """A Go client with --verbose runs the remote with --calc-progress and draws a bar for
    each phase it reads. The Go tool writes no calc phase when there is nothing in common to
    hash (a new target: common size 0); a "Size: 0" calc phase made the Go client wait
    forever on a bar of total 0. Push (our remote is the target) and pull (the source)."""
    s2d, d2s = transcript(case)
    c = next(c for c in CASES if c.name == case)
    path = tmp_path / "disk.img"
    if role == "target":
        if c.target_before is not None:
            make_image(path, vector_input(c.target_before))
        r = run_remote(["--target", "--calc-progress", str(path)], s2d, tmp_path)
        assert r.stdout == d2s
    else:
        make_image(path, vector_input(c.source_input))
        r = run_remote(["--source", "--calc-progress", str(path)], d2s, tmp_path)
        assert r.stdout == s2d
    assert r.returncode == 0, r.stderr
    if c.target_before is None:
        assert r.stderr == b""
    else:
        common = min(len(vector_input(c.target_before)), len(vector_input(c.source_input)))
        assert progress_phases(r.stderr) == {"calc": (common, [common])}


@needs_vectors
@pytest.mark.process
def test_remote_target_verbose_logs_sizes_and_shape(tmp_path: Path) -> None:
    s2d, d2s = transcript("b3_changed")
    path = tmp_path / "t.img"
    make_image(path, vector_input("v1"))
    r = run_remote(["--target", " --verbose", str(path)], s2d, tmp_path)
    assert r.returncode == 0 and r.stdout == d2s
    err = r.stderr.decode()
    assert "local size: 2097152, remote size: 2097152" in err
    assert "levels: 5, order: 2" in err


@pytest.mark.pure
def test_remote_args_are_recognised() -> None:
    assert looks_like_go_remote(["--target", "p"])
    assert looks_like_go_remote([" --source", "p"])
    assert not looks_like_go_remote(["push", "a", "b"])


@pytest.mark.process
def test_remote_bad_words_are_one_line_errors(tmp_path: Path) -> None:
    r = run_remote(["--target", "--bogus", "x"], b"", tmp_path)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().strip().splitlines() == [
        "diskrsync: remote command: unexpected argument '--bogus'"
    ]


@pytest.mark.process
def test_remote_target_refuses_garbage_and_keeps_the_image(tmp_path: Path) -> None:
    path = tmp_path / "t.img"
    make_image(path, b"x" * 300_000)
    before = generations(path)
    r = run_remote(["--target", str(path)], b"NOTGO000" + bytes(8), tmp_path)
    assert r.returncode == 5
    assert b"bad protocol magic" in r.stderr and b"Traceback" not in r.stderr
    assert r.stdout[:8] == MAGIC  # our header went out before the peer's arrived
    assert generations(path) == before and image_content(path) == b"x" * 300_000


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.process
def test_remote_target_refuses_the_wrong_kind_of_file(raw: bool, tmp_path: Path) -> None:
    path = tmp_path / "t"
    if raw:
        make_image(path, b"abc" * 1000)  # an image given --no-compress
        words = ["--target", "--no-compress", str(path)]
    else:
        path.mkdir()
        words = ["--target", str(path)]
    r = run_remote(words, b"", tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1


@pytest.mark.process
def test_remote_target_updates_a_foreign_file_raw_like_go(tmp_path: Path) -> None:
    """A non-empty file that is neither an image nor SPGZ0001 is updated raw, with a note."""
    path = tmp_path / "disk.bin"
    path.write_bytes(random.Random(1).randbytes(700_000))
    data = random.Random(2).randbytes(900_000)
    rc, rest, err = push_through_pipes(data, ["--target", str(path)], tmp_path)
    assert rc == 0, err
    assert rest == b""
    assert path.read_bytes() == data
    assert b"updating it in place as a raw file" in err


# ---------------------------------------------------------------------------------------------
# Tree shapes beyond the recorded sizes, through the whole program
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "levels", "order"),
    [
        (GO_BLOCK - 1, 1, 1),  # no whole block: one leaf
        (3 * M + 777, 5, 2),  # below 8 MiB: binary, levels = log2(blocks) + 1
        (8 * M - 1, 6, 2),  # 63 whole blocks
        (8 * M, 8, 2),  # from 8 MiB: eight levels, the order grows with the size
        (12 * M, 8, 2),
        (2 << 30, 8, 4),  # 2 GiB: 4^7 = 16384 leaves of exactly 128 KiB
    ],
)
@pytest.mark.pure
def test_go_tree_shapes_by_size(size: int, levels: int, order: int) -> None:
    shape = go_tree_shape(size)
    assert (shape.levels, shape.order) == (levels, order)
    if size == 2 << 30:
        assert shape.leaf_count == 16384 and shape.leaf_size == GO_BLOCK
        assert shape.leaf_range(16383) == ((2 << 30) - GO_BLOCK, GO_BLOCK)


def _mutate(data: bytes, rng: random.Random, n: int) -> bytes:
    buf = bytearray(data)
    for _ in range(n):
        off = rng.randrange(len(buf))
        piece = rng.randbytes(rng.randint(1, 5000))
        buf[off : off + len(piece)] = piece
    return bytes(buf)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before_size", "after_size"),
    [(3 * M + 777, 3 * M + 777), (8 * M, 8 * M - 4097), (5 * M, 8 * M + 12345)],
    ids=["below-8MiB", "8MiB-shrink", "grow-past-8MiB"],
)
@pytest.mark.process
def test_loopback_sizes_into_image(before_size: int, after_size: int, tmp_path: Path) -> None:
    """Our source role against our remote program: the image ends equal to the source."""
    rng = random.Random(before_size ^ after_size)
    before = rng.randbytes(before_size // 2) + bytes(before_size - before_size // 2)
    after = _mutate((before + rng.randbytes(max(after_size - before_size, 0)))[:after_size],
                    rng, 20)
    path = tmp_path / "t.img"
    make_image(path, before)
    rc, rest, err = push_through_pipes(after, ["--target", "--calc-progress", str(path)],
                                       tmp_path)
    assert rc == 0, err
    assert rest == b""
    assert progress_phases(err)["calc"][0] == min(before_size, after_size)
    assert image_content(path) == after
    assert image_content(path, generations(path)[0].number) == before


@pytest.mark.slow
@needs_vectors
@pytest.mark.process
def test_loopback_big12_uses_the_wide_tree(tmp_path: Path) -> None:
    """The 12 MiB inputs (levels 8): three scattered 10-byte changes cost three leaves."""
    v1, v2 = vector_input("big12_v1"), vector_input("big12_v2")
    shape = go_tree_shape(len(v1))
    assert shape.levels == 8
    path = tmp_path / "t.img"
    make_image(path, v1)
    remote = RemoteProgram(["--target", str(path)], tmp_path)
    source = LegacySource(BytesReader(v2))
    sent, received = run_machine(source, recv=remote.recv, send=remote.send)
    remote.close_send()
    rc, _rest, err = remote.finish()
    assert rc == 0, err
    assert sent < 16 + 4 * shape.leaf_size + 2 * shape.levels * shape.order
    assert received > 16 and image_content(path) == v2
    report = verify(Image.open(str(path)))
    assert report.ok, report.problems


# ---------------------------------------------------------------------------------------------
# The image store: read-modify-write of whole chunks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.inproc
def test_image_store_matches_a_plain_buffer(seed: int, tmp_path: Path) -> None:
    """Random writes, zero runs and resizes at unaligned offsets land exactly, with a small
    chunk size so that every write crosses chunk boundaries."""
    rng = random.Random(seed)
    start = rng.randbytes(rng.randint(0, 200_000))
    path = tmp_path / "t.img"
    make_image(path, start, chunk_size=16 * K)
    model = MemoryStore(start)
    img = Image.open(str(path))
    tx = img.begin()
    store = ImageTargetStore(tx)
    final = rng.randint(0, 300_000)
    store.final_size = lambda: final
    for _ in range(40):
        op = rng.random()
        off = rng.randint(0, max(len(model.buf), 1))
        n = rng.randint(1, 60_000)
        if op < 0.5:
            data = rng.randbytes(n)
            store.write(off, data)
            model.write(off, data)
            if off + n > final:
                final = off + n
        elif op < 0.8:
            store.write_zeros(off, n)
            model.write_zeros(off, n)
        else:
            size = rng.randint(0, 300_000)
            store.truncate(size)
            model.truncate(size)
        # the store may have grown to final_size early: the model's extent, then zeros
        assert store.size >= len(model.buf)
        assert store.read(0, len(model.buf)) == bytes(model.buf)
        assert store.read(len(model.buf), store.size) == bytes(store.size - len(model.buf))
    store.truncate(len(model.buf))
    store.flush()
    tx.commit(source="t")
    img.close()
    assert image_content(path) == bytes(model.buf)
    assert verify(Image.open(str(path))).ok


@pytest.mark.inproc
def test_image_store_compresses_each_chunk_once_for_sequential_leaves(tmp_path: Path) -> None:
    """Leaves that split chunks are patched in memory: one store per chunk, not two."""
    path = tmp_path / "t.img"
    make_image(path, bytes(1 * M))
    img = Image.open(str(path))
    tx = img.begin()
    store = ImageTargetStore(tx)
    data = random.Random(3).randbytes(1 * M)
    pos = 0
    for n in [100_000, 70_000, 131_073, 200_000, 50_000]:
        store.write(pos, data[pos : pos + n])
        pos += n
    store.write(pos, data[pos:])
    store.flush()
    assert store.chunks_stored == 8
    tx.commit()
    img.close()
    assert image_content(path) == data


# ---------------------------------------------------------------------------------------------
# An existing SPGZ0001 file at PATH: converted, atomically replaced, untouched on failure
# ---------------------------------------------------------------------------------------------


MIXED_SHA = "441b8ff94f49dd803336f363030319823af25778b371dd55bbdde99c38756893"


@pytest.fixture
def spgz_target(tmp_path: Path) -> Path:
    if not have_vectors():
        pytest.skip("Go vectors not found")
    path = tmp_path / "backup.spgz"
    shutil.copy(VECTORS / "a_mixed_1m.diskrsync.spgz", path)
    return path


@needs_vectors
@pytest.mark.process
def test_spgz_target_is_converted_and_replaced(spgz_target: Path, tmp_path: Path) -> None:
    old = vector_input("mixed_1m")
    assert sha256(old) == MIXED_SHA
    new = _mutate(old, random.Random(5), 4) + random.Random(6).randbytes(300_000)
    inode = spgz_target.stat().st_ino
    rc, rest, err = push_through_pipes(new, ["--target", "--calc-progress", str(spgz_target)],
                                       tmp_path)
    assert rc == 0, err
    assert rest == b""
    text = err.decode()
    assert "is a Go SPGZ0001 file: converting it" in text
    assert "the SPGZ0001 file was replaced by the converted diskrsync image" in text
    progress_phases(err)
    assert sniff(str(spgz_target)) == "image"
    assert spgz_target.stat().st_ino != inode  # a new file moved into place, not rewritten
    gens = generations(spgz_target)
    assert [g.source for g in gens] == ["converted from SPGZ0001", GO_CLIENT_SOURCE]
    assert sha256(image_content(spgz_target, gens[0].number)) == MIXED_SHA
    assert image_content(spgz_target) == new
    assert verify(Image.open(str(spgz_target))).ok
    assert temps_beside(spgz_target) == []


def _start_and_wait_for_header(words: list[str], tmp: Path) -> RemoteProgram:
    """Start the remote program and wait until it has sent its header (target opened)."""
    remote = RemoteProgram(words, tmp)
    head = b""
    while len(head) < 16:
        got = remote.recv(16 - len(head))
        assert got, remote.finish()
        head += got
    assert head[:8] == MAGIC
    return remote


@needs_vectors
@pytest.mark.parametrize("how", ["close-stdin", "sigterm", "sighup"])
@pytest.mark.process
def test_spgz_target_untouched_when_the_client_dies(spgz_target: Path, tmp_path: Path,
                                                      how: str) -> None:
    before = spgz_target.read_bytes()
    remote = _start_and_wait_for_header(["--target", str(spgz_target)], tmp_path)
    assert len(temps_beside(spgz_target)) == 1  # the conversion exists beside PATH
    # the source announces 2 MiB and sends part of the exchange, then goes away
    remote.send(MAGIC + (2 * M).to_bytes(8, "little") + b"\x03")
    if how == "close-stdin":
        remote.close_send()
    else:
        time.sleep(0.3)
        remote.proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGHUP)
    rc, _rest, err = remote.finish()
    assert rc != 0
    assert b"Traceback" not in err
    assert spgz_target.read_bytes() == before
    assert temps_beside(spgz_target) == []


@needs_vectors
@pytest.mark.process
def test_spgz_target_after_sigkill_then_next_run_cleans_up(spgz_target: Path,
                                                           tmp_path: Path) -> None:
    before = spgz_target.read_bytes()
    remote = _start_and_wait_for_header(["--target", str(spgz_target)], tmp_path)
    remote.proc.kill()
    remote.finish()
    assert spgz_target.read_bytes() == before
    assert len(temps_beside(spgz_target)) == 1  # SIGKILL leaves it; nothing else changed
    data = vector_input("mixed_1m")
    rc, _rest, err = push_through_pipes(data, ["--target", str(spgz_target)], tmp_path)
    assert rc == 0, err
    assert b"left behind by an interrupted run" in err
    assert temps_beside(spgz_target) == []
    assert image_content(spgz_target) == data


@pytest.mark.parametrize("existing", [True, False], ids=["image", "new"])
@pytest.mark.process
def test_image_target_untouched_when_the_client_dies(existing: bool, tmp_path: Path) -> None:
    path = tmp_path / "t.img"
    old = random.Random(7).randbytes(500_000)
    if existing:
        make_image(path, old)
        before = generations(path)
    remote = _start_and_wait_for_header(["--target", str(path)], tmp_path)
    # a partial walk (existing target) or a partial first tail block (new, empty target)
    body = b"\x03\x03" if existing else b"\x01"
    remote.send(MAGIC + (900_000).to_bytes(8, "little") + body + b"z" * 1000)
    remote.close_send()
    rc, _rest, err = remote.finish()
    assert rc == 5, err
    assert b"peer closed the connection early" in err
    if existing:
        # (the image's writer slot names the last writer; no generation changed)
        assert generations(path) == before and image_content(path) == old
    else:
        assert not path.exists()
    assert temps_beside(path) == []


# ---------------------------------------------------------------------------------------------
# diskrsync convert
# ---------------------------------------------------------------------------------------------


@needs_vectors
@pytest.mark.parametrize(
    ("name", "input_name"),
    [
        ("a_mixed_1m.spgzc.spgz", "mixed_1m"),
        ("a_mixed_1m.diskrsync.spgz", "mixed_1m"),
        ("a_holes_3m.diskrsync.spgz", "holes_3m"),
        ("a_empty.spgzc.spgz", "empty"),
        ("a_empty.diskrsync.spgz", "empty"),
        ("a_unaligned.spgz", "unaligned"),
        ("a_small_256k.diskrsync.spgz", "small_256k"),
    ],
)
@pytest.mark.inproc
def test_convert_every_spgz_vector(name: str, input_name: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new.spgz"
    assert main(["convert", str(VECTORS / name), str(new)]) == 0
    assert f"into {new}: generation 1" in capsys.readouterr().out
    assert image_content(new) == vector_input(input_name)
    assert main(["verify", str(new)]) == 0
    assert temps_beside(new) == []


@needs_vectors
@pytest.mark.inproc
def test_convert_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.spgz"
    shutil.copy(VECTORS / "a_small_256k.diskrsync.spgz", old)
    exists = tmp_path / "exists.spgz"
    exists.write_bytes(b"keep me")
    image = tmp_path / "image.spgz"
    make_image(image, b"i" * 5000)
    rawf = tmp_path / "raw.bin"
    rawf.write_bytes(b"r" * 5000)
    cases = [
        ([str(old), str(exists)], "already exists; refusing to overwrite it"),
        ([str(tmp_path / "missing.spgz"), str(tmp_path / "n1")], "No such file"),
        ([str(image), str(tmp_path / "n2")], "already a diskrsync image"),
        ([str(rawf), str(tmp_path / "n3")], "is not an SPGZ0001 file"),
        ([str(old), str(tmp_path / "nodir" / "n4")], "does not exist"),
        ([str(tmp_path), str(tmp_path / "n5")], "is a directory"),
    ]
    for argv, message in cases:
        assert main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert exists.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "exists.spgz", "image.spgz", "old.spgz", "raw.bin"]


@needs_vectors
@pytest.mark.inproc
def test_convert_a_damaged_spgz_fails_cleanly(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.spgz"
    data = bytearray((VECTORS / "a_mixed_1m.spgzc.spgz").read_bytes())
    # find a gzip slot (flag byte 1) and damage its stream
    slot = next(4096 + i * 131072 for i in range(8) if data[4096 + i * 131072] == 1)
    data[slot + 20 : slot + 60] = b"\xff" * 40
    old.write_bytes(bytes(data))
    new = tmp_path / "new.spgz"
    assert main(["convert", str(old), str(new)]) == 6
    assert "corrupt chunk" in capsys.readouterr().err
    assert not new.exists() and temps_beside(new) == []


# ---------------------------------------------------------------------------------------------
# Progress lines (sans I/O)
# ---------------------------------------------------------------------------------------------


@pytest.mark.pure
def test_progress_lines_order_and_suppression() -> None:
    out: list[str] = []
    clock = iter(range(100))
    p = GoProgressLines(out.append, calc=True, sync=False, sync_total=lambda: 10,
                        clock=lambda: float(next(clock)))
    p.calc_done()  # nothing to hash: no calc phase at all (as the Go target), no sync lines
    p.sync_update(10)
    assert "".join(out) == ""
    p = GoProgressLines(out.append, calc=True, sync=True, sync_total=lambda: 10,
                        clock=lambda: float(next(clock)))
    p.calc_done()  # a new target with --sync-progress: only the sync phase
    p.sync_update(10)
    assert "".join(out) == "[Start sync]\nSize: 10\nUpdate: 10\n"
    out.clear()
    p = GoProgressLines(out.append, calc=True, sync=True, sync_total=lambda: 10,
                        clock=lambda: float(next(clock)))
    p.calc_start(4)
    p.calc_update(4)
    p.calc_done()
    p.sync_update(3)
    p.sync_update(10)
    assert "".join(out) == ("[Start calc]\nSize: 4\nUpdate: 4\n"
                            "[Start sync]\nSize: 10\nUpdate: 3\nUpdate: 10\n")


@pytest.mark.pure
def test_progress_line_parser() -> None:
    p = ProgressLineParser()
    assert p.feed("[Start calc]") == ("start", "calc", -1)
    assert p.feed("Size: 42") == ("start", "calc", 42)
    assert p.feed("Update: 7") == ("update", "calc", 7)
    assert p.feed("2024/01/01 Target failed: x") == ("text", "2024/01/01 Target failed: x", 0)
    assert p.feed("Update: x") == ("text", "Update: x", 0)


@pytest.mark.inproc
def test_open_legacy_target_new_image_appears_only_at_commit(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    end = open_legacy_target(str(path), raw=False)
    assert not path.exists() and len(temps_beside(path)) == 1
    end.store.write(0, b"hello" * 1000)
    gen = end.commit("t")
    assert gen is not None and gen.number == 1
    assert image_content(path) == b"hello" * 1000 and temps_beside(path) == []


# ---------------------------------------------------------------------------------------------
# The --legacy hint: a plain push that meets the Go tool
# ---------------------------------------------------------------------------------------------


FAKE_GO = """#!/bin/sh
# stands in for the Go diskrsync: whatever it is asked, it answers in BSNC0002
printf 'BSNC0002\\000\\000\\020\\000\\000\\000\\000\\000'
cat >/dev/null
"""


@pytest.mark.process
def test_plain_push_meeting_the_go_tool_says_use_legacy(tmp_path: Path) -> None:
    """The native source, given a peer that answers BSNC0002, stops with the hint."""

    fake = tmp_path / "fake-go"
    fake.write_text(FAKE_GO)
    fake.chmod(0o755)
    src = tmp_path / "disk.raw"
    src.write_bytes(random.Random(8).randbytes(300_000))
    proc = subprocess.Popen([str(fake)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    # the channel closes its descriptors: give it its own (Popen's file objects close theirs
    # when collected, and a double close could hit a descriptor reused meanwhile)
    rfd, wfd = os.dup(proc.stdout.fileno()), os.dup(proc.stdin.fileno())
    channel = FramedChannel(FdStream(rfd, wfd))
    reader = RawSource(str(src))
    try:
        with pytest.raises(PeerError, match=r"original Go diskrsync.*use --legacy"):
            SourceSession(channel, reader, SourceOptions()).run()
    finally:
        reader.close()
        channel.close()  # closes wfd
        os.close(rfd)
        proc.stdin.close()
        proc.stdout.close()
        proc.wait(TIMEOUT)


# ---------------------------------------------------------------------------------------------
# push --legacy through a real sshd, with our own remote program standing in for Go
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def hermetic_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture
def srv(tmp_path: Path, hermetic_home: Path) -> Iterator[Any]:
    from support.sshd import SshServer

    if not Path("/usr/sbin/sshd").exists() and not shutil.which("sshd"):
        pytest.skip("no sshd")
    with SshServer(tmp_path / "sshd") as server:
        ssh_dir = hermetic_home / ".ssh"
        ssh_dir.mkdir()
        server.write_known_hosts(ssh_dir / "known_hosts")
        yield server


def legacy_args(srv: Any, **kw: Any) -> RemoteOptions:
    base: dict[str, Any] = {
        "identity": [str(srv.client_key)], "ssh_config": None, "accept_new_host_key": False,
        "remote_cmd": str(DISKRSYNC_BIN), "quiet": True, "json": False,
    }
    base.update(kw)
    return remote_options(argparse.Namespace(**base))


def request(raw: bool = False, keep: int = 2, dry_run: bool = False) -> Any:
    return PushRequest(source=SourceOptions(dry_run=dry_run),
                       target=TargetOptions(keep=keep, dry_run=dry_run), raw_target=raw)


def url(srv: Any, path: Path) -> str:
    return f"ssh://{srv.host}:{srv.port}{path}"


def loc(text: str) -> Any:
    return parse_location(text)


@pytest.mark.ssh
@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
@pytest.mark.process
def test_push_legacy_through_sshd(srv: Any, tmp_path: Path, raw: bool,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(9)
    v1 = rng.randbytes(1 * M) + bytes(512 * K) + rng.randbytes(300_000)
    v2 = _mutate(v1, rng, 3) + rng.randbytes(200_000)
    src = tmp_path / "disk.raw"
    remote = tmp_path / ("remote.raw" if raw else "remote.img")
    src.write_bytes(v1)
    stats1 = legacy_push(loc(str(src)), loc(url(srv, remote)), request(raw), legacy_args(srv))
    assert stats1.size == len(v1) and stats1.chunks_differing >= 1
    src.write_bytes(v2)
    # with progress asked of the remote: its progress lines are consumed, not shown
    stats2 = legacy_push(loc(str(src)), loc(url(srv, remote)), request(raw),
                         replace(legacy_args(srv), remote_progress=True))
    got = remote.read_bytes() if raw else image_content(remote)
    assert got == v2
    assert stats2.bytes_sent < len(v2) // 2  # only changed leaves and the tail travelled
    assert stats2.bytes_received > 16 and stats2.generation is None
    if not raw:
        assert [g.source for g in generations(remote)] == [GO_CLIENT_SOURCE] * 2


@pytest.mark.ssh
@pytest.mark.parametrize("remote_kind", ["image", "raw"])
@pytest.mark.process
def test_pull_legacy_through_sshd(srv: Any, tmp_path: Path, remote_kind: str) -> None:
    rng = random.Random(10)
    data = rng.randbytes(700_000) + bytes(400_000) + rng.randbytes(5)
    remote = tmp_path / f"remote.{remote_kind}"
    if remote_kind == "image":
        make_image(remote, data)
    else:
        remote.write_bytes(data)
    local = tmp_path / "local.img"
    make_image(local, data[:500_000])
    stats = legacy_push(loc(url(srv, remote)), loc(str(local)), request(), legacy_args(srv))
    assert image_content(local) == data
    assert stats.generation == 2 and stats.size == len(data)
    assert stats.root_hash == generations(local)[-1].root_hash.hex()
    assert verify(Image.open(str(local))).ok


@pytest.mark.ssh
@pytest.mark.process
def test_push_legacy_remote_failure_is_one_line(srv: Any, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The remote refuses (a directory as PATH): its message is relayed, ours says so."""
    src = tmp_path / "disk.raw"
    src.write_bytes(b"d" * 200_000)
    target_dir = tmp_path / "adir"
    target_dir.mkdir()
    with pytest.raises(PeerError) as info:
        legacy_push(loc(str(src)), loc(url(srv, target_dir)), request(), legacy_args(srv))
    message = str(info.value)
    assert "failed (exit status 2)" in message and "is a directory" in message
    assert "\n" not in message
    assert "is a directory" in capsys.readouterr().err  # relayed as host: line


@pytest.mark.inproc
def test_push_legacy_refuses_what_bsnc0002_cannot_do(tmp_path: Path) -> None:
    args = remote_options(argparse.Namespace(identity=[], ssh_config=None,
                                             accept_new_host_key=False, remote_cmd="diskrsync",
                                             quiet=True, json=False))
    with pytest.raises(UsageError, match="dry-run"):
        legacy_push(loc("a"), loc("h:b"), request(dry_run=True), args)
    with pytest.raises(UsageError, match="remote end"):
        legacy_push(loc("a"), loc("b"), request(), args)
    with pytest.raises(UsageError, match="one end must be on this machine"):
        legacy_push(loc("h:a"), loc("g:b"), request(), args)


@pytest.mark.ssh
@pytest.mark.process
def test_cli_push_legacy_and_plain_push_hint(srv: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI: push --legacy works; a plain push to a Go-speaking remote says to
    use --legacy."""
    data = random.Random(11).randbytes(600_000)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    remote = tmp_path / "r.img"
    common = ["-i", str(srv.client_key), "--remote-cmd", str(DISKRSYNC_BIN)]
    assert main(["push", "--legacy", "-q", str(src), url(srv, remote), *common]) == 0
    assert image_content(remote) == data
    fake = tmp_path / "fake-go"
    fake.write_text(FAKE_GO)
    fake.chmod(0o755)
    rc = main(["push", str(src), url(srv, tmp_path / "x.img"), "-i", str(srv.client_key),
               "--remote-cmd", str(fake)])
    assert rc != 0
    assert "--legacy" in capsys.readouterr().err


# What the Go diskrsync (spf13/pflag, log.Fatalf) answers to a native request: `serve
# --target PATH --keep 2 ...` is rejected by its flag parser (exit 2, usage on stderr);
# `serve --source PATH` parses, then fails to open the file "serve" (exit 1).
FAKE_GO_REJECTING = """#!/bin/sh
[ "$MERGE" = 1 ] && exec 2>&1
for a; do
  case "$a" in
    --keep|--chunk-size|--generation)
      echo "unknown flag: $a" >&2
      printf 'Usage of %s:\\n      --cmd-path string   Remote command path\\n' "$0" >&2
      printf '      --no-compress       Store target as a raw file\\n' >&2
      exit 2;;
  esac
done
echo "2026/11/30 08:00:00 Source failed: open serve: no such file or directory" >&2
exit 1
"""


@pytest.mark.ssh
@pytest.mark.parametrize("merged", [False, True], ids=["stderr", "merged-into-stdout"])
@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.process
def test_forgetting_legacy_against_the_go_tool_prints_the_hint(
        srv: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, direction: str, merged: bool) -> None:
    """No Go usage text and no Python bytes repr: one line naming the Go tool and
    --legacy, whether the Go tool's words arrive on stderr or, merged, as its output."""
    fake = tmp_path / "go-diskrsync"
    fake.write_text(FAKE_GO_REJECTING.replace("$MERGE", "1" if merged else "0"))
    fake.chmod(0o755)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"d" * 300_000)
    remote = url(srv, tmp_path / "r.img")
    src, dst = (str(disk), remote) if direction == "push" else (remote, str(tmp_path / "l.img"))
    rc = main(["push", src, dst, "-i", str(srv.client_key), "--remote-cmd", str(fake)])
    err = capsys.readouterr().err
    assert rc == PeerError.exit_code, err
    said = "unknown flag: --keep" if direction == "push" else "Source failed: open serve"
    assert err.splitlines() == [err.splitlines()[-1]], err  # nothing relayed before it
    assert err.startswith(f"diskrsync: {srv.host}: the peer is the original Go diskrsync "
                          f"(it answered: "), err
    assert said in err and err.rstrip().endswith("): use --legacy"), err
    assert "b'" not in err and "Usage of" not in err


@pytest.mark.pure
def test_foreign_peer_bytes_are_described_not_repred() -> None:
    for data, shown in [(b"unknown flag: --keep\nUsage of x:\n", 'text "unknown flag'),
                        (b"\xff\xfe\x00\x01garbage", "bytes ff fe 00 01")]:
        d = Decoder()
        d.feed(data)
        with pytest.raises(ForeignPeer) as info:
            d.next()
        assert shown in str(info.value) and "b'" not in str(info.value)


@pytest.mark.ssh
@pytest.mark.parametrize(("before", "after"), [
    (0, 3 * M + 4321),  # new target: everything is tail
    (1 * M + 777, 2 * M + 5),  # grows: partial chunks at the common end, re-read leaves
    (3 * M, 1 * M + 99_999),  # shrinks
], ids=["new", "grow", "shrink"])
@pytest.mark.process
def test_push_legacy_reports_the_native_root(srv: Any, tmp_path: Path, before: int,
                                             after: int) -> None:
    """The root a push --legacy reports is the one a native push of the same source
    reports, whatever the Go target held before; created says whether it was new."""
    rng = random.Random(before + after)
    data = rng.randbytes(after // 2) + bytes(after // 4) + rng.randbytes(after - after // 2
                                                                           - after // 4)
    remote = tmp_path / "remote.raw"
    if before:
        remote.write_bytes(_mutate(data[:before] + rng.randbytes(max(0, before - after)),
                                   rng, 5))
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    stats = legacy_push(loc(str(src)), loc(url(srv, remote)), request(raw=True),
                        legacy_args(srv))
    assert remote.read_bytes() == data
    native = local_push(str(src), str(tmp_path / "native.img"), request())
    assert stats.root_hash == native.root_hash != ""
    assert stats.created == (before == 0)


@pytest.mark.ssh
@pytest.mark.process
def test_push_and_pull_legacy_summaries_say_what_happened(
        srv: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = random.Random(14).randbytes(900_000)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    remote = url(srv, tmp_path / "r.img")
    common = ["-i", str(srv.client_key), "--remote-cmd", str(DISKRSYNC_BIN)]
    assert main(["push", "--legacy", str(src), remote, *common]) == 0
    first = capsys.readouterr().out
    assert re.match(rf"created {re.escape(remote)} \(Go diskrsync\), root [0-9a-f]{{16}}…: ",
                    first), first
    assert main(["push", "--legacy", str(src), remote, *common]) == 0
    assert capsys.readouterr().out.startswith(f"updated {remote} (Go diskrsync), root ")
    # a pull reports the bytes that arrived here, as a native pull does
    local = tmp_path / "pulled.img"
    assert main(["push", "--legacy", "--json", remote, str(local), *common]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["bytes_sent"] > len(data) // 2 and pulled["bytes_received"] == 16
    assert pulled["created"] and pulled["generation"] == 1
    assert pulled["root_hash"] == generations(local)[-1].root_hash.hex()


@pytest.mark.pure
def test_sha256_helper_is_hashlib() -> None:
    assert sha256(b"x") == hashlib.sha256(b"x").hexdigest()


@pytest.mark.ssh
@needs_vectors
@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client")
@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
@pytest.mark.process
def test_as_the_go_client_runs_it_through_openssh(srv: Any, tmp_path: Path, raw: bool) -> None:
    """Exactly the Go client's remote start: ``ssh HOST CMD --target [" --no-compress"]
    --calc-progress PATH`` (ssh joins the words, the remote shell re-splits them), with the
    recorded source stream on stdin: the recorded target stream comes back."""
    s2d, d2s = transcript("b3_changed")
    path = tmp_path / ("t.raw" if raw else "t.img")
    if raw:
        path.write_bytes(vector_input("v1"))
    else:
        make_image(path, vector_input("v1"))
    known = tmp_path / "known_hosts"
    srv.write_known_hosts(known)
    words = [str(DISKRSYNC_BIN), "--target", *([" --no-compress"] if raw else []),
             "--calc-progress", str(path)]
    ssh = ["ssh", "-F", "none", "-i", str(srv.client_key), "-p", str(srv.port),
           "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
           "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", f"{srv.user}@{srv.host}"]
    r = subprocess.run([*ssh, *words], input=s2d, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == d2s
    progress_phases(r.stderr)
    got = path.read_bytes() if raw else image_content(path)
    assert sha256(got) == "a689c5d321d4c5bfa9e3f23759ea18ab88d33554af1d32b59e84bdf7e7ae32d1"


@pytest.mark.ssh
@needs_vectors
@pytest.mark.process
def test_pull_legacy_into_an_spgz_file_converts_it(srv: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = _mutate(vector_input("mixed_1m"), random.Random(12), 3)
    remote = tmp_path / "remote.raw"
    remote.write_bytes(data)
    local = tmp_path / "old.spgz"
    shutil.copy(VECTORS / "a_mixed_1m.diskrsync.spgz", local)
    stats = legacy_push(loc(url(srv, remote)), loc(str(local)), request(), legacy_args(srv))
    assert stats.generation == 2
    assert sha256(image_content(local, 1)) == MIXED_SHA and image_content(local) == data
    assert "replaced by the converted diskrsync image" in capsys.readouterr().err
    assert temps_beside(local) == []
