"""What a push does when its source cannot be trusted or read, through the real CLI, locally
and over SSH: a damaged image or SPGZ0001 source stops the push with exit 6 before a wrong byte
reaches the target; bad sectors of a disk (a FUSE file failing at chosen bytes) are found
down to the 512-byte sector and either stop the push with exit 3 or, with
``--ignore-read-errors``, are stored as zeros, listed, and end in exit 11.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.baddisk import BadDisk
from support.paths import VECTORS
from support.sshd import SshServer

from diskrsync.base.errors import EXIT_READ_ERRORS_IGNORED
from diskrsync.compression.codec import Kind
from diskrsync.compression.image import Image
from diskrsync.compression.spgz import HEADER_SIZE, SpgzImage

pytestmark = pytest.mark.process

CS = 16 * 1024
REPO = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskrsync.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def failed(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """A clean failure with exit ``code``: one ``diskrsync:`` line on stderr, no traceback."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == code, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("diskrsync: ")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def disk(seed: int, chunks: int) -> bytes:
    """Random, compressible text and zero chunks in turn (stored raw, zstd and as nothing)."""
    rnd = random.Random(seed)
    parts = []
    for c in range(chunks):
        kind = c % 3
        if kind == 0:
            parts.append(rnd.randbytes(CS))
        elif kind == 1:
            parts.append((f"{seed} chunk {c} ".encode() * CS)[:CS])
        else:
            parts.append(bytes(CS))
    return b"".join(parts)


def changed(data: bytes, chunks: list[int], cs: int = CS) -> bytes:
    out = bytearray(data)
    for c in chunks:
        out[c * cs : c * cs + 8] = b"CHANGED!"
    return bytes(out)


def image_of(path: Path, data: bytes, tmp: Path, chunk_size: int = CS) -> Path:
    raw = tmp / f"{path.name}.raw"
    raw.write_bytes(data)
    res = cli("push", "-q", "--chunk-size", str(chunk_size), str(raw), str(path))
    assert res.returncode == 0, res.stderr
    raw.unlink()
    return path


def restored(image: Path) -> bytes:
    out = image.with_name(image.name + ".restored")
    res = cli("restore", "-q", str(image), str(out))
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def generations(image: Path) -> list[int]:
    with Image.open(str(image)) as img:
        return [g.number for g in img.generations()]


def damage_chunk(image: Path, kind: Kind, first: int = 0) -> int:
    """Flip a byte in the middle of the first stored chunk of ``kind`` from chunk ``first``."""
    with Image.open(str(image)) as img, img.snapshot() as snap:
        victim = next(c for c in range(first, snap.chunk_count)
                      if snap.tree.entry(c).kind == kind)
        e = snap.tree.entry(victim)
    with open(image, "r+b") as f:
        f.seek(e.offset + e.length // 2)
        byte = f.read(1)[0]
        f.seek(e.offset + e.length // 2)
        f.write(bytes([byte ^ 0x40]))
    return victim


# -- SSH --------------------------------------------------------------------------------------


def remote_cmd() -> str:
    exe = REPO / ".venv" / "bin" / "diskrsync"
    return str(exe) if exe.exists() else f"{shlex.quote(sys.executable)} -m diskrsync.cli"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer(tmp_path_factory.mktemp("sshd")) as s:
        s.write_known_hosts()
        yield s


class Ssh:
    """Runs ``diskrsync push`` with an ssh_config naming the server ``testhost``."""

    def __init__(self, srv: SshServer, tmp: Path) -> None:
        home = tmp / "home"
        (home / ".ssh").mkdir(parents=True)
        self.config = srv.write_ssh_config(tmp / "ssh_config",
                                           UserKnownHostsFile=str(srv.known_hosts))
        self.env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        self.env["HOME"] = str(home)

    def push(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli("push", *args, "-F", str(self.config), "--remote-cmd", remote_cmd(),
                   env=self.env)


@pytest.fixture
def ssh(srv: SshServer, tmp_path: Path) -> Ssh:
    return Ssh(srv, tmp_path)


# -- a damaged image as the source (stored chunks travel as they are) -------------------------


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, bytes, bytes, int]:
    """A source image with one damaged chunk, its data, and the older data a target holds:
    chunk 1 and the damaged chunk differ, so both are sent (chunk 1 first)."""
    data = disk(1, 48)
    src = image_of(tmp_path / "src.spgz", data, tmp_path)
    victim = damage_chunk(src, Kind.ZSTD, first=20)
    return src, data, changed(data, [1, victim]), victim


@pytest.mark.parametrize("kind", [Kind.RAW, Kind.ZSTD])
def test_damaged_image_source_never_reaches_an_image_target(tmp_path: Path, kind: Kind) -> None:
    data = disk(1, 48)
    src = image_of(tmp_path / "src.spgz", data, tmp_path)
    victim = damage_chunk(src, kind, first=20)
    old = changed(data, [1, victim])
    dst = image_of(tmp_path / "copy.spgz", old, tmp_path)
    failed(cli("push", str(src), str(dst)), 6,
           f"corrupt chunk {victim} at offset {victim * CS}")
    assert generations(dst) == [1]  # nothing committed
    assert restored(dst) == old
    res = cli("verify", str(dst))
    assert res.returncode == 0, res.stdout  # the checkpoint holds only good chunks


def test_damaged_image_source_never_reaches_a_raw_target(
        tmp_path: Path, damaged: tuple[Path, bytes, bytes, int]) -> None:
    src, _, old, victim = damaged
    dst = tmp_path / "copy.raw"
    dst.write_bytes(old)
    failed(cli("push", "--no-compress", str(src), str(dst)), 6,
           f"corrupt chunk {victim} at offset {victim * CS}")
    assert dst.read_bytes()[victim * CS : (victim + 1) * CS] == old[victim * CS :
                                                                       (victim + 1) * CS]


@pytest.mark.root
def test_damaged_image_source_never_reaches_a_block_device(
        tmp_path: Path, damaged: tuple[Path, bytes, bytes, int]) -> None:
    """The README's "restore writing only what differs": push IMAGE /dev/sdX."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    src, _, old, victim = damaged
    backing = tmp_path / "device.raw"
    backing.write_bytes(old)
    attach = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                            text=True)
    if attach.returncode:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    dev = attach.stdout.strip()
    try:
        failed(cli("push", str(src), dev), 6, f"corrupt chunk {victim} at offset {victim * CS}")
        with open(dev, "rb") as f:
            f.seek(victim * CS)
            assert f.read(CS) == old[victim * CS : (victim + 1) * CS]
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def test_damaged_image_chunk_with_ignore_read_errors_is_a_listed_read_error(
        tmp_path: Path, damaged: tuple[Path, bytes, bytes, int]) -> None:
    src, data, old, victim = damaged
    dst = image_of(tmp_path / "copy.spgz", old, tmp_path)
    res = cli("push", "--json", "--ignore-read-errors", str(src), str(dst))
    assert res.returncode == EXIT_READ_ERRORS_IGNORED, res.stderr
    stats = json.loads(res.stdout)
    assert stats["read_errors"] == [[victim * CS, CS]]
    assert f"{victim * CS}+{CS}" in res.stderr
    expect = bytearray(data)
    expect[victim * CS : (victim + 1) * CS] = bytes(CS)
    assert restored(dst) == bytes(expect)
    with Image.open(str(dst)) as img:
        assert img.generations()[-1].meta["read_errors"] == [[victim * CS, CS]]


def test_image_source_with_another_chunk_size_sends_the_right_chunks(tmp_path: Path) -> None:
    """An image source whose chunks are bigger than the target's: its stored chunk N is not the
    target's chunk N (it used to be sent as such, exit 0, a target failing verify)."""
    data = disk(2, 48)
    src = image_of(tmp_path / "src.spgz", data, tmp_path, chunk_size=2 * CS)
    dst = image_of(tmp_path / "copy.spgz", changed(data, [1, 30]), tmp_path)
    res = cli("push", "--json", str(src), str(dst))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["chunks_differing"] == 2
    assert restored(dst) == data
    assert cli("verify", str(dst)).returncode == 0
    # damaged, it is read (and checked) chunk by chunk: exit 6 naming the image's chunk
    victim = damage_chunk(src, Kind.ZSTD, first=10)
    failed(cli("push", str(src), str(dst)), 6, f"corrupt chunk {victim} at offset "
                                               f"{victim * 2 * CS}")


@pytest.mark.ssh
def test_damaged_image_source_over_ssh(ssh: Ssh, tmp_path: Path,
                                       damaged: tuple[Path, bytes, bytes, int]) -> None:
    src, _, old, victim = damaged
    dst = image_of(tmp_path / "copy.spgz", old, tmp_path)
    failed(ssh.push(str(src), f"testhost:{dst}"), 6,
           f"corrupt chunk {victim} at offset {victim * CS}")
    assert generations(dst) == [1]
    # pulled by the backup server: the remote source's error keeps its category
    failed(ssh.push(f"testhost:{src}", str(tmp_path / "pulled.spgz")), 6,
           f"corrupt chunk {victim} at offset {victim * CS}")


# -- a damaged SPGZ0001 file as the source ----------------------------------------------------


@pytest.fixture
def damaged_spgz(tmp_path: Path) -> tuple[Path, int, int]:
    """A copy of a Go vector with one byte of a gzip block flipped: (path, block, offset)."""
    vector = VECTORS / "a_mixed_1m.spgzc.spgz"
    if not vector.exists():
        pytest.skip(f"{vector} is missing (see tests/support/paths.py)")
    path = tmp_path / "go.spgz"
    shutil.copyfile(vector, path)
    with SpgzImage.open(str(path)) as img:
        bs = img.block_size
    blob = bytearray(path.read_bytes())
    block = next(n for n in range(1, 8) if blob[HEADER_SIZE + n * (bs + 1)] == 1)
    blob[HEADER_SIZE + block * (bs + 1) + 1 + 40] ^= 0x10  # inside the deflate data
    path.write_bytes(bytes(blob))
    return path, block, block * bs


def test_damaged_spgz_source_exits_6(tmp_path: Path,
                                     damaged_spgz: tuple[Path, int, int]) -> None:
    path, block, offset = damaged_spgz
    dst = tmp_path / "new.spgz"
    failed(cli("push", str(path), str(dst)), 6, f"corrupt chunk {block} at offset {offset}")
    assert not dst.exists() or generations(dst) == []


@pytest.mark.ssh
def test_damaged_spgz_source_over_ssh_exits_6(ssh: Ssh, tmp_path: Path,
                                              damaged_spgz: tuple[Path, int, int]) -> None:
    path, block, offset = damaged_spgz
    failed(ssh.push(str(path), f"testhost:{tmp_path / 'new.spgz'}"), 6,
           f"corrupt chunk {block} at offset {offset}")


# -- a disk with bad sectors (a FUSE file failing at chosen bytes) ---------------------------

BIG = 128 * 1024  # the default chunk size: the scan reads 4 MiB at a time
BAD = [(BIG + 4608, 1024), (10 * BIG - 512, 1024), (40 * BIG + 1000, 1)]
MAPPED = [[BIG + 4608, 1024], [10 * BIG - 512, 1024], [40 * BIG + 512, 512]]  # whole sectors


def blanked(data: bytes) -> bytes:
    out = bytearray(data)
    for off, n in MAPPED:
        out[off : off + n] = bytes(n)
    return bytes(out)


@pytest.fixture
def bad_disk(tmp_path: Path) -> Iterator[BadDisk]:
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("needs /dev/fuse and fusermount3")
    with BadDisk(tmp_path, random.Random(3).randbytes(64 * BIG), BAD) as d:
        yield d


def _bad_sector_pushes(bad_disk: BadDisk, push: Callable[..., Any], dst: str,
                       image: Path) -> None:
    """Without --ignore-read-errors: exit 3 naming the first bad sector, nothing committed.
    With it: exactly the bad sectors listed and stored as zeros, in a first push and in an
    incremental one that re-reads a changed chunk holding a bad sector (exit 11 each)."""
    src = str(bad_disk.path)
    failed(push(src, dst), 3, f"read error in {src} at offset {BIG + 4608}",
           "--ignore-read-errors")
    assert not image.exists() or generations(image) == []
    for round_ in range(2):
        if round_:
            bad_disk.write(changed(bad_disk.data, [1, 50], BIG))
        res = push("--json", "--ignore-read-errors", src, dst)
        assert res.returncode == EXIT_READ_ERRORS_IGNORED, res.stderr
        stats = json.loads(res.stdout)
        assert stats["read_errors"] == MAPPED
        assert stats["source_changed_chunks"] == []
        if round_:
            assert stats["differing_ranges"] == [[BIG, BIG], [50 * BIG, BIG]]
        assert "3 unreadable range(s) stored as zeros" in res.stderr
        assert restored(image) == blanked(bad_disk.data)
    assert generations(image) == [1, 2]


@pytest.mark.fuse
def test_bad_sectors_local_push(bad_disk: BadDisk, tmp_path: Path) -> None:
    image = tmp_path / "backup.spgz"
    _bad_sector_pushes(bad_disk, lambda *a: cli("push", *a), str(image), image)


@pytest.mark.fuse
@pytest.mark.ssh
def test_bad_sectors_push_over_ssh(bad_disk: BadDisk, ssh: Ssh, tmp_path: Path) -> None:
    image = tmp_path / "remote.spgz"
    _bad_sector_pushes(bad_disk, ssh.push, f"testhost:{image}", image)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_source_that_cannot_seek_is_one_line(tmp_path: Path) -> None:
    """A source whose size lseek() refuses (a /proc file: EINVAL) is one line and exit 3;
    it was a traceback (exit 1)."""
    res = cli("push", "-q", "/proc/self/status", str(tmp_path / "x.spgz"))
    failed(res, 3, "cannot read /proc/self/status", "Invalid argument")
    assert not (tmp_path / "x.spgz").exists()


@pytest.mark.fuse
@pytest.mark.parametrize("offset", [0, 4096], ids=["sector-0", "sector-8"])
def test_a_bad_sector_where_an_image_header_would_be(tmp_path: Path, offset: int) -> None:
    """A disk image file unreadable at byte 0 or 4096 (where push looks for an image's
    superblocks) is read as the raw file it is: exit 3 naming the sector, or with
    --ignore-read-errors that sector stored as zeros (exit 11). The header check failed the
    push with 'cannot open ...: Input/output error' even with --ignore-read-errors."""
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("needs /dev/fuse and fusermount3")
    data = random.Random(4).randbytes(8 * BIG)
    with BadDisk(tmp_path, data, [(offset, 1)]) as disk:
        dst = tmp_path / "d.spgz"
        failed(cli("push", "-q", str(disk.path), str(dst)), 3,
               f"read error in {disk.path} at offset {offset}")
        res = cli("push", "-q", "--ignore-read-errors", str(disk.path), str(dst))
        assert res.returncode == EXIT_READ_ERRORS_IGNORED, res.stderr
        assert f"{offset}+512" in res.stderr
    want = bytearray(data)
    want[offset : offset + 512] = bytes(512)
    assert restored(dst) == bytes(want)
