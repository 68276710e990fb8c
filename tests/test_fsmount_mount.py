"""Real FUSE mounts in a subprocess: loop-mount partitions, generations, errors, signals.

The mount runs ``support/mountlauncher.py`` with a ``DirectoryImage`` (``<N>.raw`` files in a
directory), so the test can add, prune and corrupt generations while it is mounted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import diskbuild
from support.diskbuild import BuiltDisk, BuiltPartition
from support.mounts import MountCleanup, build_disks, require_fuse_and_disk_tools

from diskrsync.base.errors import UsageError
from diskrsync.fsmount.mount import (
    MountPointError,
    StaleMountError,
    check_mountpoint,
    is_stale_mount,
    umount_main,
)

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.slow]

LAUNCHER = Path(__file__).parent / "support" / "mountlauncher.py"
OPENER = "support.fakeimage:DirectoryImage"
CHUNK = 64 * 1024


class Mounts(MountCleanup):
    """Mounts started through the test launcher (any DiskImage opener)."""

    def start(
        self, images: Path, mountpoint: Path, *, foreground: bool = True, **options: object
    ) -> subprocess.Popen[bytes]:
        """Start the launcher; in the foreground wait for READY on a pipe."""
        self.fuse.append(mountpoint)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
        opts = dict(options, foreground=foreground, log_file=str(self.base / "mount.log"))
        if not foreground:
            proc = subprocess.Popen(
                [sys.executable, str(LAUNCHER), OPENER, str(images), str(mountpoint),
                 json.dumps(opts)], stderr=subprocess.PIPE, env=env,
            )
            self.procs.append(proc)
            return proc
        rfd, wfd = os.pipe()
        opts["ready_fd"] = wfd
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), OPENER, str(images), str(mountpoint),
             json.dumps(opts)], pass_fds=(wfd,), stderr=subprocess.PIPE, env=env,
        )
        os.close(wfd)
        self.procs.append(proc)
        with os.fdopen(rfd, "rb") as ready:
            line = ready.readline()
        if not line.startswith(b"READY"):
            proc.wait(10)
            assert proc.stderr is not None
            pytest.fail(f"mount did not get ready: {proc.stderr.read().decode()}")
        return proc

    def loop_mount(self, image: Path, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.fs.append(where)
        subprocess.run(["mount", "-o", "loop,ro", str(image), str(where)], check=True,
                       capture_output=True)

    def umount_loop(self, where: Path) -> None:
        subprocess.run(["umount", str(where)], check=True, capture_output=True)
        self.fs.remove(where)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltDisk]:
    require_fuse_and_disk_tools()
    return build_disks(tmp_path_factory.mktemp("disks"))


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    require_fuse_and_disk_tools()
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


def add_generation(images: Path, number: int, disk: Path, mtime: float | None = None) -> None:
    tmp = images / f".{number}.tmp"
    subprocess.run(["cp", "--sparse=always", str(disk), str(tmp)], check=True)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    tmp.rename(images / f"{number}.raw")  # atomic: refresh never sees half a file


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_files(where: Path, part: BuiltPartition) -> None:
    for rel, data in part.files.items():
        assert sha(where / rel) == diskbuild.sha256(data), rel


def setup_images(tmp_path: Path, disk: BuiltDisk, number: int = 1) -> tuple[Path, Path]:
    images, mp = tmp_path / "images", tmp_path / "mnt"
    images.mkdir()
    mp.mkdir()
    add_generation(images, number, disk.path, mtime=1795698300.0)
    return images, mp


@pytest.mark.process
def test_gpt_partitions_loop_mount(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    gpt = disks["gpt"]
    images, mp = setup_images(tmp_path, gpt)
    mounts.start(images, mp)
    assert sorted(os.listdir(mp)) == ["disk.raw", "generations", "partitions"]
    assert sorted(os.listdir(mp / "generations")) == ["000001-2026-11-26T13-05-00Z", "latest",
                                                      "oldest"]
    assert os.readlink(mp / "generations" / "latest") == "000001-2026-11-26T13-05-00Z"
    assert os.stat(mp / "disk.raw").st_size == gpt.size
    assert os.stat(mp / "disk.raw").st_mtime == 1795698300.0
    assert sorted(os.listdir(mp / "partitions")) == ["by-label", "by-partlabel", "p1", "p2"]
    assert os.readlink(mp / "partitions" / "by-label" / "data") == "../p2"
    with open(mp / "disk.raw", "rb") as f, open(gpt.path, "rb") as g:
        f.seek(gpt.partition(2).start)
        g.seek(gpt.partition(2).start)
        assert f.read(4 << 20) == g.read(4 << 20)
    with pytest.raises(OSError) as err, open(mp / "disk.raw", "r+b"):
        pass
    assert err.value.errno == errno.EROFS
    mounts.loop_mount(mp / "partitions" / "by-label" / "root", tmp_path / "ext4")
    mounts.loop_mount(mp / "partitions" / "p2", tmp_path / "xfs")
    check_files(tmp_path / "ext4", gpt.partition(1))
    check_files(tmp_path / "xfs", gpt.partition(2))
    mounts.umount_loop(tmp_path / "ext4")
    mounts.umount_loop(tmp_path / "xfs")
    umount_main(str(mp))
    assert not os.path.ismount(mp)
    mounts.procs[0].wait(10)
    assert mounts.procs[0].returncode == 0


@pytest.mark.process
def test_mbr_logical_partitions_loop_mount(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    mbr = disks["mbr"]
    images, mp = setup_images(tmp_path, mbr)
    mounts.start(images, mp)
    assert sorted(os.listdir(mp / "partitions")) == ["by-label", "p1", "p5", "p6"]
    for number in (1, 5, 6):
        where = tmp_path / f"p{number}"
        mounts.loop_mount(mp / "partitions" / f"p{number}", where)
        check_files(where, mbr.partition(number))
        mounts.umount_loop(where)


@pytest.mark.process
def test_generations_come_and_go_while_mounted(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    gpt, mbr = disks["gpt"], disks["mbr"]
    images, mp = setup_images(tmp_path, gpt)
    mounts.start(images, mp)
    gen1 = mp / "generations" / "000001-2026-11-26T13-05-00Z"
    mounts.loop_mount(gen1 / "partitions" / "p1", tmp_path / "ext4")  # holds gen 1 open
    with open(mp / "disk.raw", "rb") as held:  # the top-level file, opened while it is gen 1
        first = hashlib.sha256(held.read(8 << 20)).hexdigest()
        add_generation(images, 2, mbr.path)
        wait_for(lambda: len(os.listdir(mp / "generations")) == 4, "generation 2 to appear")
        assert os.readlink(mp / "generations" / "latest").startswith("000002-")
        assert os.readlink(mp / "generations" / "oldest") == gen1.name
        wait_for(lambda: os.stat(mp / "disk.raw").st_size == mbr.size, "the top level to move")
        assert sorted(os.listdir(mp / "partitions")) == ["by-label", "p1", "p5", "p6"]
        held.seek(0)
        assert hashlib.sha256(held.read(8 << 20)).hexdigest() == first
        # Prune generation 1 while it is in use: it stays, byte-identical, until released.
        (images / "1.raw").unlink()
        time.sleep(2.5)
        assert gen1.name in os.listdir(mp / "generations")
        check_files(tmp_path / "ext4", gpt.partition(1))
        held.seek(0)
        assert hashlib.sha256(held.read(8 << 20)).hexdigest() == first
    mounts.umount_loop(tmp_path / "ext4")
    wait_for(lambda: gen1.name not in os.listdir(mp / "generations"), "generation 1 to go")
    # the kernel forgets the cached name once our (asynchronous) invalidation reaches it
    wait_for(lambda: not gen1.exists(), "the kernel to forget generation 1", 2)


@pytest.mark.process
def test_corrupt_chunk_is_eio_for_that_range_only(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    gpt = disks["gpt"]
    images, mp = setup_images(tmp_path, gpt)
    bad = gpt.partition(1).start // CHUNK + 40
    (images / "corrupt").write_text(f"1 {bad}\n")
    mounts.start(images, mp)
    disk = mp / "disk.raw"
    dd = subprocess.run(
        ["dd", f"if={disk}", "of=/dev/null", f"bs={CHUNK}", f"skip={bad}", "count=1"],
        capture_output=True, text=True,
    )
    assert dd.returncode != 0 and "Input/output error" in dd.stderr
    with open(gpt.path, "rb") as g:
        for index in (bad - 1, bad + 1):
            ok = subprocess.run(
                ["dd", f"if={disk}", "of=/dev/stdout", f"bs={CHUNK}", f"skip={index}", "count=1",
                 "status=none"], capture_output=True, check=True,
            ).stdout
            g.seek(index * CHUNK)
            assert ok == g.read(CHUNK)
    log = (tmp_path / "mount.log").read_text()
    assert f"corrupt chunk {bad} at offset {bad * CHUNK}" in log


@pytest.mark.process
def test_background_mount_and_sigterm(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    images, mp = setup_images(tmp_path, disks["gpt"])
    launcher = mounts.start(images, mp, foreground=False)
    assert launcher.wait(20) == 0  # the parent returns once the daemon's mount is ready
    assert os.path.ismount(mp) and os.listdir(mp)
    umount_main(str(mp))
    assert not os.path.ismount(mp)
    with pytest.raises(MountPointError, match="not a mount point") as err:
        umount_main(str(mp))  # not a mount point any more
    assert err.value.exit_code == 2
    proc = mounts.start(images, mp)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not os.path.ismount(mp) and not is_stale_mount(str(mp))


@pytest.mark.process
def test_killed_mount_leaves_a_stale_mount_that_is_explained(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    images, mp = setup_images(tmp_path, disks["gpt"])
    proc = mounts.start(images, mp)
    proc.kill()
    proc.wait(10)
    assert is_stale_mount(str(mp))
    with pytest.raises(StaleMountError) as err:
        check_mountpoint(str(mp))
    assert "diskrsync umount" in str(err.value) and "not connected" in str(err.value)
    again = subprocess.run(
        [sys.executable, str(LAUNCHER), OPENER, str(images), str(mp)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent)),
    )
    assert again.returncode != 0 and "stale mount" in again.stderr
    umount_main(str(mp))
    assert not is_stale_mount(str(mp)) and not os.path.ismount(mp)


@pytest.mark.inproc
def test_mountpoint_checks(tmp_path: Path) -> None:
    with pytest.raises(MountPointError, match="does not exist"):
        check_mountpoint(str(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(MountPointError, match="not a directory"):
        check_mountpoint(str(tmp_path / "file"))
    with pytest.raises(MountPointError, match="already a mount point"):
        check_mountpoint("/proc")
    assert isinstance(MountPointError("x"), UsageError)


@pytest.mark.process
def test_unknown_generation_is_reported(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    images, mp = setup_images(tmp_path, disks["gpt"])
    proc = mounts.start(images, mp, foreground=False, generation=7)
    assert proc.wait(20) == 2
    assert proc.stderr is not None
    assert "generation 7 is not in the image (retained: 1)" in proc.stderr.read().decode()
    assert not os.path.ismount(mp)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(tmp_path / "images")
