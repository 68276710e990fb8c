"""What a push or a restore writes into: never a node it must not touch, never a replaced file.

* A push target is a regular file, a directory or a block device; a character device, a FIFO
  or a socket (also behind a symlink) is refused with exit 2 and left as it was: locally,
  over SSH, and as the remote end of a Go client.
* An existing empty file becomes an image in place; ``restore --force`` rewrites a file in
  place; both keep its inode, owner and mode. A new restored file follows the umask.
* ``restore`` into a FIFO or a character device streams into it.
* A Go client's sync never puts its image over one a native push committed meanwhile.
* ``--no-compress`` never overwrites a Go SPGZ0001 backup.
* A mounted block device is refused (``O_EXCL``) with exit 4 and left unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.paths import REPO, VECTORS
from support.sshd import SshServer

from diskrsync.base.errors import BusyError, UsageError
from diskrsync.compression.container import open_image
from diskrsync.compression.go_target import open_legacy_target
from diskrsync.compression.image import Image
from diskrsync.synccore.push import PushRequest, local_push

K = 1024
M = 1024 * K
TIMEOUT = 60
SPGZ_VECTOR = "a_mixed_1m.diskrsync.spgz"


def cli(*args: str | Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskrsync.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def refused(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def data(seed: int, size: int = 1 * M) -> bytes:
    out = bytearray(hashlib.shake_256(str(seed).encode()).digest(size // 2))
    out += b"\0" * (size - len(out))
    return bytes(out)


def content(path: Path) -> bytes:
    img = open_image(str(path))
    try:
        snap = img.snapshot()
        try:
            return snap.read(0, snap.size)
        finally:
            snap.close()
    finally:
        img.close()


def identity(path: Path) -> tuple[int, ...]:
    """What must not change about a node we may not replace."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino, st.st_mode, st.st_rdev, st.st_uid, st.st_gid


@contextlib.contextmanager
def special(kind: str, tmp: Path) -> Iterator[Path]:
    """A node of ``kind`` in ``tmp``: chr (a null device), fifo, sock, or a symlink to chr."""
    path = tmp / f"node-{kind}"
    sock: socket.socket | None = None
    if kind in ("chr", "link"):
        real = tmp / "null" if kind == "link" else path
        os.mknod(real, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        if kind == "link":
            path.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    try:
        yield path
    finally:
        if sock is not None:
            sock.close()


def _spgz(path: Path) -> None:
    """An SPGZ0001 file written by the Go diskrsync (a recorded vector)."""
    if not (VECTORS / SPGZ_VECTOR).is_file():
        pytest.skip("Go vectors not found")
    shutil.copy(VECTORS / SPGZ_VECTOR, path)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chown need root")
KINDS = ["chr", "fifo", "sock", "link"]


# -- push into something that is not a file ---------------------------------------------------


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.process
def test_push_refuses_a_special_target_and_leaves_it(kind: str, raw: bool,
                                                     tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(data(1))
    with special(kind, tmp_path) as dst:
        before = identity(dst), identity(dst.resolve())
        r = cli("push", "-q", *(["--no-compress"] if raw else []), src, dst)
        refused(r, 2, "a push target is a regular file, a directory or a block device")
        assert (identity(dst), identity(dst.resolve())) == before


@needs_root
@pytest.mark.root
@pytest.mark.process
def test_an_empty_file_becomes_an_image_in_place(tmp_path: Path) -> None:
    """It keeps its inode, owner and mode (it used to be unlinked and created anew)."""
    src = tmp_path / "src.img"
    src.write_bytes(data(2))
    dst = tmp_path / "native.spgz"
    dst.write_bytes(b"")
    os.chown(dst, 4321, 8765)
    os.chmod(dst, 0o640)
    before = identity(dst)
    r = cli("push", "-q", src, dst)
    assert r.returncode == 0, r.stderr
    assert identity(dst) == before
    assert content(dst) == data(2)


# -- --no-compress onto a Go SPGZ0001 backup ------------------------------------------------


@pytest.mark.process
def test_no_compress_refuses_an_spgz_backup(tmp_path: Path) -> None:
    old = tmp_path / "old.spgz"
    _spgz(old)
    before = old.read_bytes()
    src = tmp_path / "src.img"
    src.write_bytes(data(8))
    refused(cli("push", "-q", "--no-compress", src, old), 2, "SPGZ0001", "diskrsync convert")
    assert old.read_bytes() == before


# -- over SSH: a plain serve, and the restricted key ----------------------------------------


def _remote_cmd() -> str:
    exe = REPO / ".venv" / "bin" / "diskrsync"
    return str(exe) if exe.exists() else f"{shlex.quote(sys.executable)} -m diskrsync.cli"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer(tmp_path_factory.mktemp("sshd")) as s:
        s.write_known_hosts()
        yield s


@pytest.fixture
def ssh_push(sshd: SshServer, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    config = sshd.write_ssh_config(tmp_path / "ssh_config",
                                   UserKnownHostsFile=str(sshd.known_hosts))
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(home)

    def push(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "diskrsync.cli", "push", "-q", *map(str, args),
             "-F", str(config), "--remote-cmd", _remote_cmd()],
            capture_output=True, text=True, env=env, timeout=TIMEOUT)

    return push


@needs_root
@pytest.mark.ssh
@pytest.mark.root
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.process
def test_push_over_ssh_refuses_a_special_target(kind: str, ssh_push: Callable[..., Any],
                                                tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(data(9))
    with special(kind, tmp_path) as dst:
        before = identity(dst), identity(dst.resolve())
        for raw in ([], ["--no-compress"]):
            r = ssh_push(*raw, src, f"testhost:{dst}")
            refused(r, 2, "a push target is a regular file")
            assert (identity(dst), identity(dst.resolve())) == before


@pytest.mark.ssh
@pytest.mark.process
def test_no_compress_over_the_restricted_key_refuses_an_spgz_backup(
        sshd: SshServer, ssh_push: Callable[..., Any], tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    old = backups / "old.spgz"
    _spgz(old)
    before = old.read_bytes()
    src = tmp_path / "src.img"
    src.write_bytes(data(11))
    forced = f"{_remote_cmd()} serve --restrict-to {shlex.quote(str(backups))} --write-only"
    sshd.set_authorized_keys(f'command="{forced.replace(chr(34), chr(92) + chr(34))}",restrict')
    try:
        r = ssh_push("--no-compress", src, f"testhost:{old}")
    finally:
        sshd.set_authorized_keys()
    refused(r, 2, "SPGZ0001")
    assert old.read_bytes() == before


# -- restore -------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src.img"
    src.write_bytes(data(3))
    path = tmp_path / "backup.spgz"
    r = cli("push", "-q", src, path)
    assert r.returncode == 0, r.stderr
    return path


@pytest.mark.process
def test_restore_streams_into_a_fifo(image: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    before = identity(fifo)
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    r = cli("restore", "-q", image, fifo)
    reader.join(TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert not reader.is_alive() and got == [data(3)]
    assert identity(fifo) == before


@needs_root
@pytest.mark.root
@pytest.mark.process
def test_restore_into_a_character_device_writes_into_it(image: Path, tmp_path: Path) -> None:
    with special("chr", tmp_path) as null:
        before = identity(null)
        r = cli("restore", "-q", image, null)
        assert r.returncode == 0, r.stderr
        assert identity(null) == before


@pytest.mark.process
def test_restore_refuses_a_socket(image: Path, tmp_path: Path) -> None:
    with special("sock", tmp_path) as sock:
        before = identity(sock)
        refused(cli("restore", "-q", image, sock), 2, "a socket")
        assert identity(sock) == before


@needs_root
@pytest.mark.root
@pytest.mark.process
def test_restore_force_keeps_inode_owner_and_mode(image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "disk.raw"
    dest.write_bytes(b"\xff" * (3 * M))  # longer than the disk, and not zeros where it has them
    os.chown(dest, 4321, 8765)
    os.chmod(dest, 0o604)
    before = identity(dest)
    refused(cli("restore", "-q", image, dest), 2, "--force")
    assert dest.read_bytes() == b"\xff" * (3 * M)
    r = cli("restore", "-q", "--force", image, dest)
    assert r.returncode == 0, r.stderr
    assert identity(dest) == before
    assert dest.read_bytes() == data(3)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
@pytest.mark.process
def test_a_new_restored_file_follows_the_umask(umask: int, image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "new.raw"
    r = cli("restore", "-q", image, dest, umask=umask)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o666 & ~umask
    assert dest.read_bytes() == data(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.spgz", "new.raw", "src.img"]


# -- the remote end of a Go client ----------------------------------------------------------


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.process
def test_go_target_refuses_a_special_target_and_leaves_it(kind: str, raw: bool,
                                                          tmp_path: Path) -> None:
    with special(kind, tmp_path) as dst:
        before = identity(dst), identity(dst.resolve())
        words = ["--target", *(["--no-compress"] if raw else []), str(dst)]
        r = subprocess.run([sys.executable, "-m", "diskrsync.cli", *words], input=b"",
                           capture_output=True, timeout=TIMEOUT)
        assert r.returncode == 2, r.stderr
        assert b"a push target is a regular file" in r.stderr
        assert (identity(dst), identity(dst.resolve())) == before
        with pytest.raises(UsageError, match="a push target is a regular file"):
            open_legacy_target(str(dst), raw=raw)
        assert (identity(dst), identity(dst.resolve())) == before


@needs_root
@pytest.mark.root
@pytest.mark.inproc
def test_go_target_makes_an_empty_file_an_image_in_place(tmp_path: Path) -> None:
    """It keeps its inode, owner and mode (a new image used to be renamed over it)."""
    dst = tmp_path / "go.spgz"
    dst.write_bytes(b"")
    os.chown(dst, 4321, 8765)
    os.chmod(dst, 0o640)
    before = identity(dst)
    end = open_legacy_target(str(dst), raw=False)
    end.store.write(0, data(2))
    end.commit("test")
    assert identity(dst) == before
    assert content(dst) == data(2)


@pytest.mark.parametrize("start", ["nothing", "spgz"])
@pytest.mark.process
def test_go_sync_never_replaces_an_image_a_native_push_committed(start: str,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "disk.spgz"
    if start == "spgz":
        _spgz(path)
    end = open_legacy_target(str(path), raw=False)
    assert end.kind == ("new" if start == "nothing" else "converted")
    end.store.write(0, data(5))
    # meanwhile a native push makes PATH an image with a generation of its own
    native = tmp_path / "native.img"
    native.write_bytes(data(6))
    if start == "spgz":
        fresh = tmp_path / "fresh.spgz"
        assert cli("push", "-q", native, fresh).returncode == 0
        os.replace(fresh, path)
    else:
        r = cli("push", "-q", native, path)
        assert r.returncode == 0, r.stderr
    with pytest.raises(BusyError, match="changed while this sync ran"):
        end.commit("Go client")
    assert content(path) == data(6)
    with Image.open(str(path)) as img:
        assert [g.source for g in img.generations()][-1] != "Go client"
    assert [p.name for p in tmp_path.iterdir() if ".diskrsync-" in p.name] == []


# -- a mounted block device -----------------------------------------------------------------


@pytest.fixture
def mounted_loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An ext4 filesystem on a loop device, mounted read-only: (device, backing file)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    backing = tmp_path / "fs.img"
    backing.write_bytes(b"")
    os.truncate(backing, 8 * M)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
    where = tmp_path / "mnt"
    where.mkdir()
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    mounted = False
    try:
        subprocess.run(["mount", "-o", "ro", dev, str(where)], check=True, capture_output=True)
        mounted = True
        yield dev, backing
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.process
def test_a_mounted_block_device_is_refused(mounted_loop: tuple[str, Path], image: Path,
                                           tmp_path: Path) -> None:
    dev, backing = mounted_loop
    before = backing.read_bytes()
    src = tmp_path / "src.img"
    cases: list[list[str | Path]] = [
        ["push", "-q", src, dev], ["push", "-q", "--no-compress", src, dev],
        ["push", "-q", image, dev], ["restore", "-q", image, dev],
        ["restore", "-q", "--force", image, dev]]
    for args in cases:
        refused(cli(*args), 4, "mounted or in use")
    with pytest.raises(BusyError, match="mounted or in use"):
        open_legacy_target(dev, raw=False)
    assert backing.read_bytes() == before


@pytest.mark.inproc
@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
def test_a_directory_target_names_the_file_the_same_for_both_protocols(tmp_path: Path,
                                                                       raw: bool) -> None:
    """One rule for both wire formats: DIR/<name>.spgz for an image, DIR/<name> for a raw
    target (the native push made DIR/<name>.spgz of a raw file, the Go pull DIR/<name>)."""
    want = "disk.raw" if raw else "disk.raw.spgz"
    src = tmp_path / "disk.raw"
    src.write_bytes(data(7, 256 * K))
    native, go = tmp_path / "native", tmp_path / "go"
    native.mkdir()
    go.mkdir()
    local_push(str(src), str(native), PushRequest(raw_target=raw))
    assert os.listdir(native) == [want]
    end = open_legacy_target(str(go), raw=raw, name=str(src))
    try:
        assert end.path == str(go / want)
    finally:
        end.close()
    # a Go client does not say its source's name: a directory is refused, as before
    with pytest.raises(UsageError, match="is a directory"):
        open_legacy_target(str(go), raw=raw)
