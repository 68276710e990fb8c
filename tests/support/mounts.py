"""What the real-mount tests share: skipping where FUSE or the disk tools are missing, and
undoing every mount, loop device and process a test made, in reverse, even when it fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from diskrsync.fsmount.mount import is_stale_mount
from support import diskbuild


def require_fuse_and_disk_tools() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: no FUSE on this machine")
    missing = diskbuild.missing_tools("sgdisk", "sfdisk", "mkfs.ext4", "mkfs.xfs", "losetup")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: gdisk, fdisk, e2fsprogs, xfsprogs)")
    if os.geteuid() != 0:
        pytest.skip("loop-mounting partitions needs root")


def quiet(*cmd: str) -> None:
    subprocess.run(cmd, capture_output=True, check=False)


def build_disks(work: Path) -> dict[str, diskbuild.BuiltDisk]:
    """A GPT disk (ext4 + xfs, with labels) and an MBR disk (primary + logical)."""
    return {
        "gpt": diskbuild.build_gpt_disk(work / "gpt.img", work),
        "mbr": diskbuild.build_mbr_disk(work / "mbr.img", work),
    }


class MountCleanup:
    """Records what a test set up; ``cleanup`` undoes all of it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.fuse: list[Path] = []  # FUSE mount points
        self.fs: list[Path] = []  # loop-mounted file systems
        self.devices: list[str] = []  # loop devices attached by hand
        self.procs: list[subprocess.Popen[bytes]] = []

    def cleanup(self) -> None:
        for where in reversed(self.fs):
            quiet("umount", str(where))
            if os.path.ismount(where):
                quiet("umount", "-l", str(where))
        for dev in reversed(self.devices):
            quiet("losetup", "-d", dev)
        listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        for line in listing.splitlines():  # any loop device left on a file of our mounts
            if any(str(mp) in line for mp in self.fuse):
                quiet("losetup", "-d", line.split(":", 1)[0])
        for mp in self.fuse:
            if os.path.ismount(mp) or is_stale_mount(str(mp)):
                quiet("fusermount3", "-u", "-z", str(mp))
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
