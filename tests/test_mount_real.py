"""``diskrsync mount`` on real images, driven through the CLI as a user would.

Disks with real partition tables and file systems (``support.diskbuild``) are pushed into images
with ``diskrsync push``, mounted with ``diskrsync mount``, and their partitions loop-mounted from
the mount; also a Go ``SPGZ0001`` file. The key promise is checked under load: pushing new
generations (``--keep 1``) while a partition of the old one is loop-mounted and being read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import diskbuild
from support.diskbuild import BuiltDisk, BuiltPartition
from support.mounts import MountCleanup, build_disks, require_fuse_and_disk_tools
from support.paths import VECTORS

from diskrsync.compression.codec import Kind
from diskrsync.compression.image import Image
from diskrsync.fsmount.mount import READ_AHEAD_KB, is_stale_mount
from diskrsync.fsmount.vfs import generation_dir_name

pytestmark = [pytest.mark.process, pytest.mark.fuse, pytest.mark.root, pytest.mark.slow]

CHUNK = 64 * 1024  # image chunk size used here: small disks still span many chunks


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONSAFEPATH="1")


def cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``diskrsync ARGS`` in a fresh interpreter; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "diskrsync.cli", *map(str, args)], capture_output=True,
        text=True, timeout=timeout, env=_env(), cwd="/",
    )


def cli_ok(*args: str | Path, timeout: float = 60) -> str:
    result = cli(*args, timeout=timeout)
    assert result.returncode == 0, f"diskrsync {args} -> {result.returncode}: {result.stderr}"
    return result.stdout


def push(src: Path, image: Path, *extra: str) -> None:
    cli_ok("push", src, image, "--chunk-size", str(CHUNK), "-q", *extra)


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha_range(path: Path, start: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while size > 0 and (block := f.read(min(size, 1 << 20))):
            h.update(block)
            size -= len(block)
    return h.hexdigest()


def check_files(where: Path, part: BuiltPartition) -> None:
    for rel, data in part.files.items():
        assert sha_file(where / rel) == diskbuild.sha256(data), rel


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Mounts(MountCleanup):
    """Mounts made with the real CLI (`diskrsync mount`)."""

    def mount(self, image: Path, mp: Path, *extra: str) -> None:
        """``diskrsync mount`` in the background: returns once the mount is ready."""
        mp.mkdir(exist_ok=True)
        self.fuse.append(mp)
        cli_ok("mount", image, mp, "--log-file", self.base / f"{mp.name}.log", *extra)
        assert os.path.ismount(mp)

    def foreground(self, image: Path, mp: Path, *extra: str) -> tuple[
        subprocess.Popen[bytes], Path
    ]:
        """``diskrsync mount -f``, stderr to a file; returns once the log says it is mounted."""
        mp.mkdir(exist_ok=True)
        self.fuse.append(mp)
        log = self.base / f"{mp.name}.stderr"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "diskrsync.cli", "mount", "-f", str(image), str(mp),
                 *extra], stderr=err, env=_env(), cwd="/",
            )
        self.procs.append(proc)
        wait_for(lambda: "mounted on" in log.read_text() or proc.poll() is not None,
                 "the foreground mount", 20)
        assert proc.poll() is None, log.read_text()
        return proc, log

    def loop_mount(self, file: Path, where: Path, fstype: str, *, direct_io: bool = False) -> str:
        """Attach ``file`` read-only to a loop device and mount it on ``where``."""
        where.mkdir(parents=True, exist_ok=True)
        args = ["losetup", "-r", "-f", "--show"]
        if direct_io:
            args.append("--direct-io=on")
        dev = subprocess.run([*args, str(file)], capture_output=True, text=True,
                             check=True).stdout.strip()
        self.devices.append(dev)
        options = "ro,norecovery" if fstype == "xfs" else "ro,noload"
        subprocess.run(["mount", "-t", fstype, "-o", options, dev, str(where)], check=True,
                       capture_output=True)
        self.fs.append(where)
        return dev

    def loop_umount(self, where: Path, dev: str) -> None:
        subprocess.run(["umount", str(where)], check=True, capture_output=True)
        self.fs.remove(where)
        subprocess.run(["losetup", "-d", dev], check=True, capture_output=True)
        self.devices.remove(dev)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltDisk]:
    require_fuse_and_disk_tools()
    return build_disks(tmp_path_factory.mktemp("realdisks"))


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    require_fuse_and_disk_tools()
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


def listed(folder: Path) -> list[str]:
    """The generation directories of a mount's ``generations/`` (not its links), sorted."""
    return sorted(n for n in os.listdir(folder) if n not in ("latest", "oldest"))


def generations(image: Path) -> list[tuple[int, float, str]]:
    """(number, commit time, directory name) of each retained generation."""
    with Image.open(str(image)) as img:
        return [(g.number, g.commit_time, generation_dir_name(g)) for g in img.generations()]


# --- 1, 2: partition tables, file systems, attributes ------------------------------------------


def test_gpt_image_mounts_and_partitions_loop_mount(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    gpt = disks["gpt"]
    image, mp = tmp_path / "gpt.dimg", tmp_path / "mnt"
    push(gpt.path, image)
    [(_, commit_time, dir_name)] = generations(image)
    mounts.mount(image, mp)
    assert sorted(os.listdir(mp)) == ["disk.raw", "generations", "partitions"]
    assert listed(mp / "generations") == [dir_name]
    assert os.readlink(mp / "generations" / "latest") == dir_name
    st = os.stat(mp / "disk.raw")
    assert st.st_size == gpt.size
    assert st.st_mtime_ns == int(commit_time * 1e9)
    assert st.st_blksize == CHUNK
    assert sha_file(mp / "disk.raw") == sha_file(gpt.path)
    assert sorted(os.listdir(mp / "partitions")) == ["by-label", "by-partlabel", "p1", "p2"]
    assert sorted(os.listdir(mp / "partitions" / "by-label")) == ["data", "root"]
    assert sorted(os.listdir(mp / "partitions" / "by-partlabel")) == ["data", "root"]
    for part in gpt.partitions:
        assert os.stat(mp / "partitions" / f"p{part.number}").st_size == part.size
    # read-only everywhere
    for attempt in (
        lambda: os.open(mp / "disk.raw", os.O_RDWR),
        lambda: os.open(mp / "new-file", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(mp / "partitions" / "x"),
        lambda: os.truncate(mp / "disk.raw", 0),
    ):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS
    ext4, xfs = tmp_path / "ext4", tmp_path / "xfs"
    dev1 = mounts.loop_mount(mp / "partitions" / "by-label" / "root", ext4, "ext4")
    dev2 = mounts.loop_mount(mp / "partitions" / "p2", xfs, "xfs")
    check_files(ext4, gpt.partition(1))
    check_files(xfs, gpt.partition(2))
    with pytest.raises(OSError) as err:
        (ext4 / "x").write_bytes(b"")
    assert err.value.errno == errno.EROFS
    # the same partitions, by their generation's own directory
    gen_p2 = mp / "generations" / dir_name / "partitions" / "p2"
    assert os.stat(gen_p2).st_ino == os.stat(mp / "partitions" / "p2").st_ino
    mounts.loop_umount(ext4, dev1)
    mounts.loop_umount(xfs, dev2)
    cli_ok("umount", mp)
    assert not os.path.ismount(mp)


def test_mbr_image_primary_and_logical_partitions(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    mbr = disks["mbr"]
    image, mp = tmp_path / "mbr.dimg", tmp_path / "mnt"
    push(mbr.path, image)
    mounts.mount(image, mp)
    # no partition names on MBR (no by-partlabel), but the file systems have labels
    assert sorted(os.listdir(mp / "partitions")) == ["by-label", "p1", "p5", "p6"]
    assert os.readlink(mp / "partitions" / "by-label" / "mbr5") == "../p5"
    for part in mbr.partitions:
        node = mp / "partitions" / f"p{part.number}"
        assert os.stat(node).st_size == part.size
        where = tmp_path / f"p{part.number}"
        dev = mounts.loop_mount(node, where, part.fstype)
        check_files(where, part)
        mounts.loop_umount(where, dev)
    cli_ok("umount", mp)


# --- 3: pushes while mounted ---------------------------------------------------------------


class Reader(threading.Thread):
    """Checksums the files of a loop-mounted file system over and over, dropping their pages
    (and the FUSE file's) after each pass so every pass reads through the mount again."""

    def __init__(self, where: Path, part: BuiltPartition, fuse_file: Path) -> None:
        super().__init__(daemon=True)
        self.where, self.part, self.fuse_file = where, part, fuse_file
        self.want = {rel: diskbuild.sha256(data) for rel, data in part.files.items()}
        self.stop = threading.Event()
        self.passes = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for rel, want in self.want.items():
                    path = self.where / rel
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        h = hashlib.sha256()
                        while block := os.read(fd, 1 << 20):
                            h.update(block)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
                    if h.hexdigest() != want:
                        self.errors.append(f"{rel}: checksum changed")
                fd = os.open(self.fuse_file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                self.passes += 1
            except OSError as exc:
                self.errors.append(f"{exc}")
                time.sleep(0.1)


def test_push_while_mounted_keeps_the_loop_mounted_generation_consistent(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    source = diskbuild.clone_disk(disks["gpt"], tmp_path / "source.img")
    image, mp = tmp_path / "live.dimg", tmp_path / "mnt"
    push(source.path, image, "--keep", "1")
    [(_, _, first_dir)] = generations(image)
    # --cache-size 0: every read after a dropped page reaches the image file, i.e. the pinned
    # generation's stored chunks, which a push must not reuse.
    mounts.mount(image, mp, "--cache-size", "0")
    p1 = mp / "partitions" / "p1"
    ext4 = tmp_path / "ext4"
    dev = mounts.loop_mount(p1, ext4, "ext4", direct_io=True)
    original = source.partition(1)
    reader = Reader(ext4, original, mp / "generations" / first_dir / "partitions" / "p1")
    held = open(mp / "disk.raw", "rb")  # noqa: SIM115 (held across pushes; closed below)
    try:  # ``held``: the top-level file, opened while it is generation 1
        held_sha = hashlib.sha256(held.read()).hexdigest()
        reader.start()
        wait_for(lambda: reader.passes >= 1, "the reader's first pass")
        source_now = [source]

        def one_round(round_: int) -> None:
            files = diskbuild.sample_files(100 + round_)
            files[f"round-{round_}.txt"] = f"round {round_}\n".encode()
            source = source_now[0] = diskbuild.replace_ext4(source_now[0], 1, files, work)
            passes = reader.passes
            push(source.path, image, "--keep", "1")
            [(number, _, dir_name)] = generations(image)
            assert number == round_ + 1
            wait_for(lambda: dir_name in os.listdir(mp / "generations"),
                     f"generation {number} to appear", 6)
            # newly opened top-level files are the new generation; names the kernel resolved
            # just before still open (the former top stays one refresh), never ENOENT
            want = sha_range(source.path, original.start, original.size)
            wait_for(lambda: sha_range(p1, 0, original.size) == want,
                     "the top level to show the new generation", 4)
            assert sha_file(mp / "disk.raw") == sha_file(source.path)
            # the loop-mounted generation 1 stays (in use), the one in between goes
            wait_for(lambda: listed(mp / "generations") == [first_dir, dir_name],
                     "the generation in between to go", 6)
            wait_for(lambda: reader.passes >= passes + 2, "two more reader passes", 20)
            assert not reader.errors, reader.errors[:5]

        for round_ in range(1, 4):
            one_round(round_)
        source = source_now[0]
        held.seek(0)
        assert hashlib.sha256(held.read()).hexdigest() == held_sha
    finally:
        held.close()
        reader.stop.set()
        reader.join(30)
    assert not reader.errors, reader.errors[:5]
    assert reader.passes >= 7
    assert first_dir in os.listdir(mp / "generations")
    mounts.loop_umount(ext4, dev)
    wait_for(lambda: first_dir not in os.listdir(mp / "generations"),
             "the pruned generation to leave once the loop device is detached", 6)
    assert listed(mp / "generations") == [generations(image)[0][2]]
    # the new generation's partition holds the new files
    dev = mounts.loop_mount(p1, ext4, "ext4")
    check_files(ext4, source.partition(1))
    mounts.loop_umount(ext4, dev)
    cli_ok("umount", mp)


def test_prune_and_generation_option(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    gpt, mbr = disks["gpt"], disks["mbr"]
    image = tmp_path / "two.dimg"
    push(gpt.path, image)
    push(mbr.path, image)
    (g1, t1, d1), (g2, _, d2) = generations(image)
    # --generation G shows G at the top; every generation stays listed
    pinned = tmp_path / "pinned"
    mounts.mount(image, pinned, "--generation", str(g1))
    assert listed(pinned / "generations") == sorted([d1, d2])
    assert os.stat(pinned / "disk.raw").st_mtime_ns == int(t1 * 1e9)
    assert sha_file(pinned / "disk.raw") == sha_file(gpt.path)
    assert sorted(os.listdir(pinned / "partitions")) == ["by-label", "by-partlabel", "p1", "p2"]
    cli_ok("umount", pinned)
    bad = cli("mount", image, pinned, "--generation", "7")
    assert bad.returncode == 2
    assert bad.stderr == f"diskrsync: generation 7 is not in the image (retained: {g1}, {g2})\n"
    assert not os.path.ismount(pinned)
    # the newest by default; a prune while mounted takes the old generation away
    mp = tmp_path / "mnt"
    mounts.mount(image, mp)
    assert sorted(os.listdir(mp / "partitions")) == ["by-label", "p1", "p5", "p6"]
    cli_ok("prune", image, "--keep", "1")
    wait_for(lambda: listed(mp / "generations") == [d2], "the pruned generation to go", 6)
    wait_for(lambda: not (mp / "generations" / d1).exists(), "the kernel to forget it", 2)
    assert sha_file(mp / "disk.raw") == sha_file(mbr.path)


# --- 4: damage -----------------------------------------------------------------------------


def test_corrupt_chunk_is_eio_and_logged(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    gpt = disks["gpt"]
    image = tmp_path / "bad.dimg"
    push(gpt.path, image)
    data_part = gpt.partition(1)
    with Image.open(str(image)) as img, img.snapshot() as snap:
        def stored(i: int) -> bool:
            return snap.tree.entry(i).kind != Kind.ZERO

        first = data_part.start // CHUNK
        bad = next(i for i in range(first + 1, first + data_part.size // CHUNK - 1)
                   if stored(i - 1) and stored(i) and stored(i + 1))
        entry = snap.tree.entry(bad)
    with open(image, "r+b") as f:
        f.seek(entry.offset + entry.length // 2)
        flipped = bytes(b ^ 0xFF for b in f.read(16))
        f.seek(entry.offset + entry.length // 2)
        f.write(flipped)
    proc, log = mounts.foreground(image, tmp_path / "mnt")
    disk = tmp_path / "mnt" / "disk.raw"
    dd = subprocess.run(
        ["dd", f"if={disk}", "of=/dev/null", f"bs={CHUNK}", f"skip={bad}", "count=1"],
        capture_output=True, text=True,
    )
    assert dd.returncode != 0 and "Input/output error" in dd.stderr
    with open(gpt.path, "rb") as g:
        for index in (bad - 1, bad + 1):
            ok = subprocess.run(
                ["dd", f"if={disk}", "of=/dev/stdout", f"bs={CHUNK}", f"skip={index}",
                 "count=1", "status=none"], capture_output=True, check=True,
            ).stdout
            g.seek(index * CHUNK)
            assert ok == g.read(CHUNK)
    text = log.read_text()
    assert f"corrupt chunk {bad} at offset {bad * CHUNK}" in text
    assert "Traceback" not in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not os.path.ismount(tmp_path / "mnt")


# --- 5: Go SPGZ0001 ------------------------------------------------------------------------


def test_go_spgz_file_mounts(tmp_path: Path, mounts: Mounts) -> None:
    spgz = VECTORS / "a_mixed_1m.spgzc.spgz"
    if not spgz.exists():
        pytest.skip(f"{spgz} is missing (the shared vectors)")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    subprocess.run([sys.executable, str(VECTORS / "inputs.py"), str(inputs)], check=True,
                   capture_output=True)
    want = (inputs / "mixed_1m.raw").read_bytes()
    mp = tmp_path / "mnt"
    mounts.mount(spgz, mp)
    [gen] = listed(mp / "generations")
    assert gen.startswith("000001-")
    disk = mp / "disk.raw"
    assert os.stat(disk).st_size == len(want)
    assert os.stat(disk).st_blksize == 65536  # a power of two below the 131071-byte blocks
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        # 128 KiB reads at 128 KiB offsets straddle the 131071-byte blocks; newest first
        for off in reversed(range(0, len(want), 131072)):
            assert os.pread(fd, 131072, off) == want[off : off + 131072], off
        for off in (131070, 131071, 262141, 262142, len(want) - 3):
            assert os.pread(fd, 5000, off) == want[off : off + 5000], off
    finally:
        os.close(fd)
    assert disk.read_bytes() == want
    cli_ok("umount", mp)


# --- 6: the process, through the CLI -------------------------------------------------------


def test_errors_before_mounting(tmp_path: Path, disks: dict[str, BuiltDisk],
                                mounts: Mounts) -> None:
    image = tmp_path / "ok.dimg"
    push(disks["gpt"].path, image)
    mp = tmp_path / "mnt"
    mp.mkdir()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(8192))
    (tmp_path / "file").write_bytes(b"")

    def fails(code: int, text: str, *args: str | Path) -> None:
        result = cli("mount", *args)
        assert result.returncode == code, result.stderr
        assert result.stderr.startswith("diskrsync: ") and text in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not os.path.ismount(mp)

    fails(2, "No such file or directory", tmp_path / "missing.dimg", mp)
    fails(6, "is not a diskrsync image or SPGZ0001 file", junk, mp)
    fails(2, "is a directory", tmp_path, mp)
    fails(2, "does not exist", image, tmp_path / "nowhere")
    fails(2, "is not a directory", image, tmp_path / "file")
    mounts.mount(image, mp)
    result = cli("mount", image, mp)
    assert result.returncode == 2 and "is already a mount point" in result.stderr
    cli_ok("umount", mp)
    result = cli("umount", mp)
    assert result.returncode == 2
    assert result.stderr == f"diskrsync: {mp} is not a mount point\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_a_foreground_mount(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts, signum: int
) -> None:
    image = tmp_path / "sig.dimg"
    push(disks["gpt"].path, image)
    mp = tmp_path / "mnt"
    proc, log = mounts.foreground(image, mp)
    assert os.path.ismount(mp)
    with open(mp / "disk.raw", "rb") as f:
        assert len(f.read(4096)) == 4096
    proc.send_signal(signum)
    assert proc.wait(10) == 0, log.read_text()
    assert not os.path.ismount(mp) and not is_stale_mount(str(mp))
    assert f"{signal.Signals(signum).name}: unmounting" in log.read_text()


def _read_ahead_kb() -> dict[str, str]:
    """read_ahead_kb of every backing device (bdi) on the machine."""
    out = {}
    for bdi in os.listdir("/sys/class/bdi"):
        with contextlib.suppress(OSError):  # a bdi that went away while listing
            out[bdi] = Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").read_text().strip()
    return out


def test_mount_raises_read_ahead_of_its_own_bdi_only(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    """The mount sets read_ahead_kb of its own backing device (created with the mount, gone
    with it: nothing to restore) so that the kernel reads in 1 MiB requests; no other device's
    setting changes."""
    image = tmp_path / "ra.dimg"
    push(disks["gpt"].path, image)
    mp = tmp_path / "mnt"
    before = _read_ahead_kb()
    proc, log = mounts.foreground(image, mp)
    st = os.stat(mp)
    ours = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    during = _read_ahead_kb()
    assert during.pop(ours) == str(READ_AHEAD_KB)
    # block devices keep theirs (FUSE mounts, 0:N, and loop devices of other processes come
    # and go meanwhile)
    common = {k for k in before.keys() & during.keys() if not k.startswith("0:")}
    assert common and {k: during[k] for k in common} == {k: before[k] for k in common}
    assert sha_file(mp / "disk.raw") == sha_file(disks["gpt"].path)  # 1 MiB reads
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, log.read_text()
    assert not os.path.exists(f"/sys/class/bdi/{ours}")
    # "served N reads (M MiB, K KiB average)": the requests were about 1 MiB
    served = log.read_text().split("served ", 1)[1]
    average_kib = int(served.split(" KiB average")[0].rsplit(" ", 1)[1])
    assert average_kib >= READ_AHEAD_KB // 2, served


def test_killed_mount_is_explained_and_cleared(
    tmp_path: Path, disks: dict[str, BuiltDisk], mounts: Mounts
) -> None:
    image = tmp_path / "kill.dimg"
    push(disks["gpt"].path, image)
    mp = tmp_path / "mnt"
    proc, _ = mounts.foreground(image, mp)
    proc.kill()
    proc.wait(10)
    assert is_stale_mount(str(mp))
    again = cli("mount", image, mp)
    assert again.returncode == 3
    assert "stale mount" in again.stderr and f"diskrsync umount {mp}" in again.stderr
    assert again.stderr.count("\n") == 1
    cli_ok("umount", mp)
    assert not is_stale_mount(str(mp)) and not os.path.ismount(mp)
    mounts.mount(image, mp)  # usable again
    assert os.stat(mp / "disk.raw").st_size == disks["gpt"].size
    cli_ok("umount", mp)
