"""Build real disk image files with the system tools, for the mount's tests.

* ``build_gpt_disk``: sgdisk, two partitions named "root" (ext4) and "data" (xfs);
* ``build_mbr_disk``: sfdisk, a primary (ext4), an extended holding two logical partitions
  (ext4, xfs);
* ``build_plain_disk``: no table, a whole-disk ext4;
* ``build_protective_only_disk``: a protective MBR whose GPT headers are wiped;
* ``build_garbage_disk``: random bytes with an MBR signature.

File systems are made in a separate file (``mkfs.ext4 -d DIR``, ``mkfs.xfs -p PROTO``) and copied
into the disk at the partition's offset, keeping holes so the disk file stays sparse. Where the
partitions landed is read back with ``sfdisk -J`` (an oracle independent of our parser).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

MiB = 1024 * 1024
SECTOR = 512
TOOLS = ("sgdisk", "sfdisk", "mkfs.ext4", "mkfs.xfs")


def missing_tools(*names: str) -> list[str]:
    return [name for name in (names or TOOLS) if shutil.which(name) is None]


@dataclass(frozen=True)
class BuiltPartition:
    number: int
    start: int  # bytes
    size: int  # bytes
    label: str
    fstype: str  # "ext4", "xfs", "" (none)
    files: dict[str, bytes] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class BuiltDisk:
    path: Path
    size: int
    scheme: str  # "gpt", "mbr", ""
    partitions: tuple[BuiltPartition, ...]

    def partition(self, number: int) -> BuiltPartition:
        return next(p for p in self.partitions if p.number == number)


def sample_files(seed: int) -> dict[str, bytes]:
    """A few files: text, a nested one, and a 3 MiB random one spanning many chunks."""
    rng = random.Random(seed)
    return {
        "hello.txt": f"hello from seed {seed}\n".encode(),
        "dir/nested/notes.txt": ("line %d\n" * 500 % tuple(range(500))).encode(),
        "big.bin": rng.randbytes(3 * MiB + 12345),
        "empty": b"",
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(*cmd: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    result = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def make_ext4(image: Path, size: int, label: str, files: dict[str, bytes], work: Path) -> None:
    src = work / f"{image.name}.src"
    _write_tree(src, files)
    with open(image, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-L", label, "-d", str(src), "-E", "root_owner=0:0",
         str(image))


def _xfs_proto(src: Path, files: dict[str, bytes]) -> str:
    """An mkfs.xfs prototype file that copies ``files`` (written under ``src``)."""
    tree: dict[str, object] = {}
    for rel in files:
        node = tree
        parts = rel.split("/")
        for part in parts[:-1]:
            node = cast(dict[str, object], node.setdefault(part, {}))
        node[parts[-1]] = str(src / rel)
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def emit(node: dict[str, object], depth: int) -> None:
        pad = " " * depth
        for name, value in sorted(node.items()):
            if isinstance(value, dict):
                lines.append(f"{pad}{name} d--755 0 0")
                emit(value, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{name} ---644 0 0 {value}")

    emit(tree, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def make_xfs(image: Path, size: int, label: str, files: dict[str, bytes], work: Path) -> None:
    src = work / f"{image.name}.src"
    _write_tree(src, files)
    proto = work / f"{image.name}.proto"
    proto.write_text(_xfs_proto(src, files))
    with open(image, "wb") as f:
        f.truncate(size)
    # mkfs.xfs refuses file systems under 300 MB unless it believes it runs under fstests.
    env = dict(os.environ, TEST_DIR="/tmp", TEST_DEV="x", QA_CHECK_FS="x")
    _run("mkfs.xfs", "-q", "-f", "-L", label, "-p", str(proto), str(image), env=env)


def copy_into(disk: Path, fs_image: Path, offset: int) -> None:
    """Copy ``fs_image`` into ``disk`` at ``offset``, leaving holes where it is all zeros."""
    block = 64 * 1024
    with open(fs_image, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        while True:
            data = src.read(block)
            if not data:
                break
            if data.count(0) != len(data):
                dst.seek(offset + pos)
                dst.write(data)
            pos += len(data)


def _layout(disk: Path) -> list[dict[str, object]]:
    table = json.loads(_run("sfdisk", "-J", str(disk)))["partitiontable"]
    return list(table.get("partitions", []))


def _number(node: str) -> int:
    digits = ""
    for ch in reversed(node):
        if not ch.isdigit():
            break
        digits = ch + digits
    return int(digits)


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def build_gpt_disk(path: Path, work: Path, *, seed: int = 1) -> BuiltDisk:
    size = 104 * MiB
    _sparse_file(path, size)
    _run("sgdisk", "-n", "1:2048:+32M", "-t", "1:8300", "-c", "1:root",
         "-n", "2:0:+64M", "-t", "2:8300", "-c", "2:data", str(path))
    kinds = {1: ("ext4", "root"), 2: ("xfs", "data")}
    parts = []
    for entry in _layout(path):
        number = _number(str(entry["node"]))
        fstype, label = kinds[number]
        start, count = int(entry["start"]), int(entry["size"])  # type: ignore[call-overload]
        assert entry.get("name") == label, entry
        files = sample_files(seed * 10 + number)
        fs = work / f"gpt{seed}-p{number}.img"
        (make_ext4 if fstype == "ext4" else make_xfs)(fs, count * SECTOR, label, files, work)
        copy_into(path, fs, start * SECTOR)
        fs.unlink()
        parts.append(BuiltPartition(number, start * SECTOR, count * SECTOR, label, fstype, files))
    return BuiltDisk(path, size, "gpt", tuple(parts))


def build_labelled_gpt_disk(path: Path, work: Path) -> BuiltDisk:
    """GPT names and file system labels that differ: p1 "root" holds ext4 "ROOTFS", p2 (no
    name) ext4 "spare", p3 "swap" no file system; for by-label versus by-partlabel."""
    size = 40 * MiB
    _sparse_file(path, size)
    _run("sgdisk", "-n", "1:2048:+12M", "-c", "1:root", "-n", "2:0:+12M",
         "-n", "3:0:+4M", "-c", "3:swap", str(path))
    parts = []
    for entry in _layout(path):
        number = _number(str(entry["node"]))
        start, count = int(entry["start"]), int(entry["size"])  # type: ignore[call-overload]
        fs_label = {1: "ROOTFS", 2: "spare"}.get(number)
        if fs_label:
            fs = work / f"labelled-p{number}.img"
            make_ext4(fs, count * SECTOR, fs_label, {"f": b"x"}, work)
            copy_into(path, fs, start * SECTOR)
            fs.unlink()
        parts.append(BuiltPartition(number, start * SECTOR, count * SECTOR,
                                    str(entry.get("name", "")), "ext4" if fs_label else "", {}))
    return BuiltDisk(path, size, "gpt", tuple(parts))


def build_mbr_disk(path: Path, work: Path, *, seed: int = 2) -> BuiltDisk:
    size = 104 * MiB
    _sparse_file(path, size)
    script = "label: dos\n,16MiB,83\n,,5\n,12MiB,83\n,64MiB,83\n"
    _run("sfdisk", "-q", str(path), stdin=script)
    kinds = {1: "ext4", 5: "ext4", 6: "xfs"}
    parts = []
    for entry in _layout(path):
        number = _number(str(entry["node"]))
        if number not in kinds:
            continue  # the extended container
        start, count = int(entry["start"]), int(entry["size"])  # type: ignore[call-overload]
        label = f"mbr{number}"
        files = sample_files(seed * 10 + number)
        fs = work / f"mbr{seed}-p{number}.img"
        make = make_ext4 if kinds[number] == "ext4" else make_xfs
        make(fs, count * SECTOR, label, files, work)
        copy_into(path, fs, start * SECTOR)
        fs.unlink()
        parts.append(
            BuiltPartition(number, start * SECTOR, count * SECTOR, "", kinds[number], files)
        )
    return BuiltDisk(path, size, "mbr", tuple(parts))


def build_plain_disk(path: Path, work: Path, *, seed: int = 3) -> BuiltDisk:
    """A whole-disk ext4, no partition table."""
    size = 16 * MiB
    make_ext4(path, size, "plain", sample_files(seed), work)
    return BuiltDisk(path, size, "", ())


def build_protective_only_disk(path: Path, work: Path) -> BuiltDisk:
    """sgdisk's protective MBR with both GPT headers and tables wiped."""
    size = 8 * MiB
    _sparse_file(path, size)
    _run("sgdisk", "-o", "-n", "1:2048:+2M", str(path))
    with open(path, "r+b") as f:
        f.seek(SECTOR)
        f.write(bytes(33 * SECTOR))
        f.seek(size - 33 * SECTOR)
        f.write(bytes(33 * SECTOR))
    return BuiltDisk(path, size, "", ())


def build_garbage_disk(path: Path, *, seed: int = 4) -> BuiltDisk:
    """Random bytes that happen to end their first sector in 55 AA."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(1 * MiB))
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    return BuiltDisk(path, len(data), "", ())


def build_pattern_gpt_disk(path: Path, *, seed: int = 5) -> BuiltDisk:
    """A 4 MiB GPT disk (no file systems): "root" at 1 MiB (1 MiB long), "data" at the
    unaligned sector 4101 (1.5 MiB long), both filled with random bytes; the rest is zeros.
    Small and fast, for tests of the tree and of read mapping across chunk boundaries."""
    size = 4 * MiB
    _sparse_file(path, size)
    _run("sgdisk", "-a", "1", "-n", "1:2048:+1M", "-c", "1:root",
         "-n", "2:4101:+1536K", "-c", "2:data", str(path))
    rng = random.Random(seed)
    parts = []
    with open(path, "r+b") as f:
        layout = ((1, "root", 2048, 1 * MiB), (2, "data", 4101, 1536 * 1024))
        for number, label, start, length in layout:
            f.seek(start * SECTOR)
            f.write(rng.randbytes(length))
            parts.append(BuiltPartition(number, start * SECTOR, length, label, ""))
    return BuiltDisk(path, size, "gpt", tuple(parts))


def clone_disk(disk: BuiltDisk, path: Path) -> BuiltDisk:
    """A sparse copy of ``disk`` at ``path`` (to change without touching the original)."""
    _run("cp", "--sparse=always", str(disk.path), str(path))
    return BuiltDisk(path, disk.size, disk.scheme, disk.partitions)


def write_whole(disk: Path, fs_image: Path, offset: int) -> None:
    """Copy ``fs_image`` into ``disk`` at ``offset`` byte for byte, zeros included (so nothing
    of an earlier file system at that place survives)."""
    block = 1024 * 1024
    with open(fs_image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(offset)
        while data := src.read(block):
            dst.write(data)


def replace_ext4(
    disk: BuiltDisk, number: int, files: dict[str, bytes], work: Path
) -> BuiltDisk:
    """Make a fresh ext4 (same size and label) holding ``files`` in partition ``number`` of
    ``disk``, in place; returns the disk with that partition's new file list."""
    old = disk.partition(number)
    fs = work / f"{disk.path.name}-p{number}-new.img"
    label = old.label or f"mbr{number}"
    make_ext4(fs, old.size, label, files, work)
    write_whole(disk.path, fs, old.start)
    fs.unlink()
    shutil.rmtree(work / f"{fs.name}.src", ignore_errors=True)
    new = BuiltPartition(number, old.start, old.size, old.label, "ext4", files)
    parts = tuple(new if p.number == number else p for p in disk.partitions)
    return BuiltDisk(disk.path, disk.size, disk.scheme, parts)
