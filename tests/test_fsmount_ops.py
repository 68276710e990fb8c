"""The pyfuse3 handlers, called directly inside trio.run (no kernel involved)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import pytest
import trio
from support import diskbuild
from support.fakeimage import FakeImage

from diskrsync.fsmount.cache import ChunkCache
from diskrsync.fsmount.fuse import DiskOperations
from diskrsync.fsmount.reader import ChunkReader
from diskrsync.fsmount.vfs import ROOT_INODE, STABLE_TIMEOUT, VOLATILE_TIMEOUT, MountVFS

pytestmark = pytest.mark.process

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if diskbuild.missing_tools("sgdisk"):
        pytest.skip("needs sgdisk (Debian: gdisk)")
    built = diskbuild.build_pattern_gpt_disk(tmp_path_factory.mktemp("d") / "p.img")
    return built.path.read_bytes()


def run(
    image: FakeImage,
    body: Callable[[DiskOperations], Awaitable[Any]],
    generation: int | None = None,
) -> Any:
    async def main() -> Any:
        reader = ChunkReader(ChunkCache(4 << 20))
        ops = DiskOperations(image, MountVFS(generation=generation), reader)
        await ops.refresh()
        async with trio.open_nursery() as nursery:
            ops.reader.start_readahead(nursery)
            result = await body(ops)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


async def walk(ops: DiskOperations, path: str) -> pyfuse3.EntryAttributes:
    attr = await ops.getattr(ROOT_INODE)
    for name in path.strip("/").split("/"):
        attr = await ops.lookup(attr.st_ino, name.encode())
    return attr


async def errno_of(awaitable: Awaitable[Any]) -> int:
    try:
        await awaitable
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return 0


def fake_image(disk: bytes, generations: int = 1) -> FakeImage:
    image = FakeImage(CHUNK)
    for _ in range(generations):
        image.add_generation(disk)
    return image


def test_lookup_getattr_readlink(disk: bytes) -> None:
    async def body(ops: DiskOperations) -> None:
        attr = await walk(ops, "/disk.raw")
        assert attr.st_size == len(disk) and attr.st_mode & 0o170000 == 0o100000
        assert attr.entry_timeout == STABLE_TIMEOUT and attr.attr_timeout == STABLE_TIMEOUT
        again = await ops.getattr(attr.st_ino)
        assert again.st_ino == attr.st_ino and again.st_mtime_ns == attr.st_mtime_ns
        parts = await walk(ops, "/partitions")
        assert parts.entry_timeout == VOLATILE_TIMEOUT
        link = await walk(ops, "/partitions/by-partlabel/root")
        assert await ops.readlink(link.st_ino) == b"../p1"
        assert await errno_of(ops.lookup(ROOT_INODE, b"missing")) == errno.ENOENT
        assert await errno_of(ops.getattr(99_999)) == errno.ENOENT
        assert await errno_of(ops.lookup(attr.st_ino, b"x")) == errno.ENOTDIR
        assert await errno_of(ops.readlink(attr.st_ino)) == errno.EINVAL
        assert await errno_of(ops.getxattr(attr.st_ino, b"user.x")) == pyfuse3.ENOATTR
        stat = await ops.statfs(None)
        assert stat.f_blocks == len(disk) // 4096

    run(fake_image(disk), body)


def test_readdir(disk: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    listed: list[tuple[bytes, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        listed.append((name, next_id))
        return len(listed) < 2  # the kernel buffer is full after two entries

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def body(ops: DiskOperations) -> None:
        fh = await ops.opendir(ROOT_INODE, None)
        await ops.readdir(fh, 0, None)
        await ops.readdir(fh, listed[-1][1], None)
        await ops.releasedir(fh)
        assert await errno_of(ops.readdir(fh, 0, None)) == errno.EBADF
        disk_attr = await walk(ops, "/disk.raw")
        assert await errno_of(ops.opendir(disk_attr.st_ino, None)) == errno.ENOTDIR

    run(fake_image(disk), body)
    assert [name for name, _ in listed] == [b"generations", b"disk.raw", b"partitions"]


def test_open_read_release(disk: bytes) -> None:
    async def body(ops: DiskOperations) -> None:
        attr = await walk(ops, "/partitions/p2")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        assert info.keep_cache
        data = await ops.read(info.fh, 1000, 200_000)
        assert data == disk[4101 * 512 + 1000 :][:200_000]
        assert await ops.read(info.fh, attr.st_size, 10) == b""
        await ops.release(info.fh)
        assert await errno_of(ops.read(info.fh, 0, 10)) == errno.EBADF
        root = await ops.getattr(ROOT_INODE)
        assert await errno_of(ops.open(root.st_ino, os.O_RDONLY, None)) == errno.EISDIR

    run(fake_image(disk), body)


def test_everything_that_writes_is_erofs(disk: bytes) -> None:
    async def body(ops: DiskOperations) -> None:
        attr = await walk(ops, "/disk.raw")
        ino = attr.st_ino
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            assert await errno_of(ops.open(ino, flags, None)) == errno.EROFS
        info = await ops.open(ino, os.O_RDONLY, None)
        calls = [
            ops.write(info.fh, 0, b"x"),
            ops.create(ROOT_INODE, b"new", 0o644, os.O_CREAT, None),
            ops.setattr(ino, attr, pyfuse3.SetattrFields(), None, None),
            ops.mkdir(ROOT_INODE, b"d", 0o755, None),
            ops.mknod(ROOT_INODE, b"n", 0o644, 0, None),
            ops.unlink(ROOT_INODE, b"disk.raw", None),
            ops.rmdir(ROOT_INODE, b"partitions", None),
            ops.symlink(ROOT_INODE, b"l", b"t", None),
            ops.link(ino, ROOT_INODE, b"l2", None),
            ops.rename(ROOT_INODE, b"disk.raw", ROOT_INODE, b"x", 0, None),
            ops.setxattr(ino, b"user.a", b"b", None),
            ops.removexattr(ino, b"user.a", None),
            ops.access(ino, os.W_OK, None),
        ]
        for call in calls:
            assert await errno_of(call) == errno.EROFS
        assert await ops.access(ino, os.R_OK, None)
        await ops.release(info.fh)

    run(fake_image(disk), body)


def test_corrupt_chunk_is_eio_and_neighbours_read(
    disk: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    image = fake_image(disk)
    bad = 20  # inside p1 (chunks 16..31)
    image.corrupt_chunk(1, bad)

    async def body(ops: DiskOperations) -> None:
        attr = await walk(ops, "/partitions/p1")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        rel = bad * CHUNK - (1 << 20)
        with caplog.at_level(logging.ERROR, logger="diskrsync"):
            assert await errno_of(ops.read(info.fh, rel, 4096)) == errno.EIO
            assert await errno_of(ops.read(info.fh, rel - 100, 200)) == errno.EIO  # spans it
        assert await ops.read(info.fh, rel - 4096, 4096) == disk[bad * CHUNK - 4096 : bad * CHUNK]
        after = (bad + 1) * CHUNK
        assert await ops.read(info.fh, rel + CHUNK, 4096) == disk[after : after + 4096]
        assert await errno_of(ops.read(info.fh, rel + 10, 10)) == errno.EIO  # still not served
        await ops.release(info.fh)

    run(image, body)
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"corrupt chunk {bad} at offset {bad * CHUNK}" in line for line in lines), lines
    assert any("/partitions/p1" in line and "generation 1" in line for line in lines)


def test_refresh_adds_and_removes_generations(disk: bytes) -> None:
    image = fake_image(disk, 2)

    async def body(ops: DiskOperations) -> None:
        gens = await walk(ops, "/generations")
        assert sorted(ops.vfs.generations_dir.children)[2:] == ["latest", "oldest"]
        old = await walk(ops, "/disk.raw")
        info = await ops.open(old.st_ino, os.O_RDONLY, None)
        before = await ops.read(info.fh, 0, 1 << 20)
        image.add_generation(disk[::-1])
        image.prune(2)
        image.refreshes = 0
        await ops.refresh()
        assert image.refreshes == 1
        new = await walk(ops, "/disk.raw")
        assert new.st_ino != old.st_ino
        names = sorted(ops.vfs.generations_dir.children)
        assert [n.split("-")[0] for n in names] == [
            "000001", "000002", "000003", "latest", "oldest"]  # 2 is pruned but open
        assert await ops.read(info.fh, 0, 1 << 20) == before
        await ops.release(info.fh)
        assert (gens.st_ino, names[1]) in ops.invalidated
        assert sorted(n.split("-")[0] for n in ops.vfs.generations_dir.children) == [
            "000001", "000003", "latest", "oldest"]
        assert image.pins(2) == 0

    run(image, body)


def test_the_mount_process_allocates_from_one_malloc_arena() -> None:
    """``serve`` asks glibc for one arena: span buffers freed on the loop's thread are then
    reused by the read-ahead threads instead of piling up in their own arenas (the mount's peak
    memory was 1.3-2x its cache). In a child process, so this one's allocator is untouched."""
    code = (
        "import ctypes\n"
        "from diskrsync.fsmount.mount import M_ARENA_MAX, one_malloc_arena\n"
        "print(one_malloc_arena(), ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env=dict(os.environ, PYTHONSAFEPATH="1"),
    ).stdout
    assert out.split() == ["True", "1"]
