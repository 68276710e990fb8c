"""QEMU dirty bitmaps as a push source, against a real qemu-storage-daemon (tests/support/
qsd.py): the NBD client meets QEMU's own replies, the managed bitmap its QMP transactions."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from support.imagetools import cli, content
from support.qsd import NODE, StorageDaemon, available
from support.sshd import SshServer

from diskrsync.base.errors import DiskrsyncError
from diskrsync.compression.nbd import BASE_ALLOCATION, NbdAddress, NbdClient, NbdError
from diskrsync.compression.sources import NbdSource, open_source
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import PushStats
from diskrsync.synccore.target import TargetOptions

pytestmark = pytest.mark.skipif(not available(), reason="qemu-storage-daemon not installed")

MiB = 1 << 20
GRANULE = 65536  # the bitmap's granularity: QEMU's default, the qcow2 cluster
CHUNK = 128 * 1024  # the images' default chunk size


@pytest.fixture
def qsd(tmp_path: Path):
    with StorageDaemon(tmp_path, 16 * MiB) as d:
        yield d


def managed(d: StorageDaemon, name: str = "b0") -> NbdSource:
    return NbdSource(d.url, name, str(d.qmp_socket))


@pytest.mark.process
def test_the_client_reads_writes_and_maps_a_qemu_export(qsd):
    data = random.Random(1).randbytes(3 * GRANULE + 100)
    qsd.write(2 * MiB + 7, data)
    addr = NbdAddress(NODE, socket_path=str(qsd.nbd_socket))
    with NbdClient(addr, (BASE_ALLOCATION, "qemu:dirty-bitmap:b0")) as c:
        assert c.info.size == 16 * MiB
        assert c.read(2 * MiB + 7, len(data)) == data
        assert c.read(0, MiB) == bytes(MiB)
        # the allocation map has data where we wrote and reads zeros elsewhere
        alloc = [(o, n) for o, n, f in c.walk(BASE_ALLOCATION) if not f & 2]
        [(start, n)] = alloc
        assert start <= 2 * MiB + 7 and 2 * MiB + 7 + len(data) <= start + n <= 6 * MiB
        # without the bitmap on the export, its context is not granted
        assert "qemu:dirty-bitmap:b0" not in c.contexts
    with pytest.raises(NbdError, match="no export named"):
        NbdClient(NbdAddress("nope", socket_path=str(qsd.nbd_socket)))


@pytest.mark.process
def test_an_exported_bitmap_maps_the_writes(tmp_path):
    with StorageDaemon(tmp_path, 16 * MiB, export_bitmap=True) as d:
        d.write(5 * MiB, b"x" * 10)
        d.write(9 * MiB + GRANULE - 1, b"y" * 2)  # straddles two granules
        with closing(NbdSource(d.url, "b0")) as src:
            assert src.changed_ranges() == [(5 * MiB, GRANULE), (9 * MiB, 2 * GRANULE)]
            assert src.change_base() == {"map": "dirty-bitmap", "bitmap": "b0",
                                         "export": NODE, "size": 16 * MiB}
            assert src.warnings() == []
        with closing(NbdSource(d.url, "other")) as src:
            assert src.changed_ranges() is None
            assert "offers no dirty bitmap other" in src.warnings()[0]


@pytest.mark.process
def test_a_managed_bitmap_is_cleared_only_when_the_push_committed(qsd):
    qsd.write(MiB, b"a" * 100)
    src = managed(qsd)
    try:
        assert src.changed_ranges() == [(MiB, GRANULE)]
        qsd.write(3 * MiB, b"b" * 100)  # during the push: recorded for the next one too
        src.committed()
    finally:
        src.close()
    assert set(qsd.bitmaps()) == {"b0"}
    assert [e["id"] for e in qsd.qmp("query-block-exports")] == [NODE]
    src = managed(qsd)
    try:
        assert src.changed_ranges() == [(3 * MiB, GRANULE)]
        qsd.write(5 * MiB, b"c")
        # no committed(): the push failed
    finally:
        src.close()
    assert set(qsd.bitmaps()) == {"b0"}
    with closing(managed(qsd)) as src:
        assert src.changed_ranges() == [(3 * MiB, GRANULE), (5 * MiB, GRANULE)]
        assert src.read(5 * MiB, 1) == b"c"


@pytest.mark.process
def test_a_missing_bitmap_is_created_and_the_push_reads_everything(qsd):
    qsd.qmp("block-dirty-bitmap-remove", node=NODE, name="b0")
    with closing(managed(qsd)) as src:
        assert src.changed_ranges() is None
        assert "does not exist" in src.warnings()[0]
        qsd.write(7 * MiB, b"d")
        src.committed()
    assert qsd.bitmaps()["b0"]["count"] == GRANULE
    with closing(managed(qsd)) as src:
        assert src.changed_ranges() == [(7 * MiB, GRANULE)]
        assert src.warnings() == []


@pytest.mark.process
def test_leftovers_of_a_killed_push_are_removed_and_lose_nothing(qsd):
    qsd.write(MiB, b"e")
    src = managed(qsd)
    # killed: neither committed() nor close() runs; its export and copies stay behind
    for c in src._clients:
        c.close()
    assert {"b0", "b0.next", "b0.scan"} <= set(qsd.bitmaps())
    qsd.write(2 * MiB, b"f")
    with closing(managed(qsd)) as src2:
        assert src2.changed_ranges() == [(MiB, GRANULE), (2 * MiB, GRANULE)]
    assert set(qsd.bitmaps()) == {"b0"}
    assert scratch_files(qsd) == [] and extra_nodes(qsd) == set()
    assert qsd.qmp("query-jobs") == []


@pytest.mark.process
def test_an_nbd_source_opens_by_uri(qsd):
    qsd.write(0, b"hello")
    with closing(open_source(qsd.url)) as src:
        assert isinstance(src, NbdSource)
        assert src.read(0, 5) == b"hello"
        assert src.change_base() is None and src.changed_ranges() is None
        assert list(src.extents()) == [(0, 4096)]  # QEMU finds the zeros after it


# -- pushes ------------------------------------------------------------------------------


def push(d: StorageDaemon, dst: Path, **target: Any) -> PushStats:
    req = PushRequest(target=TargetOptions(**target), dirty_bitmap="b0",
                      qmp=str(d.qmp_socket))
    return local_push(d.url, str(dst), req)


def scribble(d: StorageDaemon, rnd: random.Random, count: int) -> list[tuple[int, int]]:
    """``count`` writes of 1-3000 bytes at random places: the (offset, length) written."""
    out = []
    for _ in range(count):
        n = rnd.randrange(1, 3000)
        off = rnd.randrange(0, d.size - n)
        d.write(off, rnd.randbytes(n))
        out.append((off, n))
    return out


@pytest.mark.process
def test_pushes_with_writes_between_them_restore_the_disk(qsd, tmp_path):
    rnd = random.Random(5)
    scribble(qsd, rnd, 40)
    dst = tmp_path / "backup.img"
    first = push(qsd, dst)
    assert any("first push" in w for w in first.warnings)  # a full scan, said aloud
    assert content(str(dst))[1] == qsd.contents()
    for _ in range(2):
        writes = scribble(qsd, rnd, 5)
        stats = push(qsd, dst)
        assert content(str(dst))[1] == qsd.contents()
        assert stats.generation is not None and stats.map.startswith("dirty-bitmap")
        # only the chunks holding a write were read (counted, not timed)
        touched = {c for off, n in writes for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}
        assert sum(n for _o, n in writes) <= stats.bytes_read <= len(touched) * CHUNK
    assert set(qsd.bitmaps()) == {"b0"}
    assert qsd.bitmaps()["b0"]["count"] == 0


@pytest.mark.process
def test_a_failed_push_keeps_the_changes_for_the_next(qsd, tmp_path):
    dst = tmp_path / "backup.img"
    push(qsd, dst)
    qsd.write(11 * MiB, b"lost?")
    with pytest.raises(DiskrsyncError):
        push(qsd, dst, max_size=MiB)  # the target refuses the source
    assert set(qsd.bitmaps()) == {"b0"}
    assert qsd.bitmaps()["b0"]["count"] == GRANULE
    stats = push(qsd, dst)
    assert content(str(dst))[1] == qsd.contents()
    assert qsd.bitmaps()["b0"]["count"] == 0
    assert 0 < stats.bytes_read <= CHUNK and stats.chunks_differing == 1


@pytest.mark.process
def test_a_missing_bitmap_means_a_full_scan_said_aloud(qsd, tmp_path):
    dst = tmp_path / "backup.img"
    qsd.write(8 * MiB, random.Random(2).randbytes(4 * MiB))
    push(qsd, dst)
    qsd.write(3 * MiB, b"z")
    qsd.qmp("block-dirty-bitmap-remove", node=NODE, name="b0")
    stats = push(qsd, dst)
    assert any("does not exist" in w for w in stats.warnings)
    assert any(w.startswith("full scan") for w in stats.warnings)
    assert stats.map == "allocation" and stats.bytes_read > 4 * MiB
    assert content(str(dst))[1] == qsd.contents()
    assert "b0" in qsd.bitmaps()  # re-created: the next push need not read everything


@pytest.mark.process
def test_the_cli_pushes_an_nbd_source_with_its_bitmap(qsd, tmp_path):
    qsd.write(MiB, b"cli")
    out = cli("push", qsd.url, str(tmp_path), "--dirty-bitmap", "b0", "--qmp",
              str(qsd.qmp_socket), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["generation"] == 1
    assert content(str(tmp_path / f"{NODE}.spgz"))[1] == qsd.contents()
    bad = cli("push", str(qsd.image), str(tmp_path / "x.img"), "--dirty-bitmap", "b0")
    assert bad.returncode == 2 and b"need an NBD source" in bad.stderr


@pytest.mark.process
def test_a_bitmap_the_last_push_did_not_use_means_a_full_scan(qsd, tmp_path):
    dst = tmp_path / "backup.img"
    qsd.write(8 * MiB, random.Random(3).randbytes(2 * MiB))
    push(qsd, dst)
    qsd.write(MiB, b"w")
    other = PushRequest(dirty_bitmap="b1", qmp=str(qsd.qmp_socket))
    stats = local_push(qsd.url, str(dst), other)  # b1 is new: every block read, loudly
    assert stats.map == "allocation" and stats.bytes_read > 2 * MiB
    qsd.write(2 * MiB, b"v")
    stats = push(qsd, dst)  # b0 has the write, but the newest generation came through b1
    assert any("pushed with another map" in w for w in stats.warnings)
    assert stats.bytes_read > 2 * MiB
    assert content(str(dst))[1] == qsd.contents()
    stats = push(qsd, dst)
    assert stats.map.startswith("dirty-bitmap") and stats.bytes_read == 0


@pytest.mark.process
@pytest.mark.ssh
def test_a_push_over_ssh_clears_the_bitmap_only_once_it_committed(qsd, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    remote = tmp_path / "remote"
    remote.mkdir()
    exe = Path(sys.executable).parent / "diskrsync"
    with SshServer(tmp_path / "sshd") as srv:
        srv.write_known_hosts()
        config = srv.write_ssh_config(tmp_path / "ssh_config",
                                      UserKnownHostsFile=str(srv.known_hosts))
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        env["HOME"] = str(home)

        def rpush(dst: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "diskrsync.cli", "push", qsd.url, f"testhost:{dst}",
                 "--dirty-bitmap", "b0", "--qmp", str(qsd.qmp_socket), "-F", str(config),
                 "--remote-cmd", str(exe), "--json"],
                capture_output=True, text=True, env=env, timeout=120)

        qsd.write(MiB, b"one")
        assert rpush(f"{remote}/web.img").returncode == 0
        qsd.write(6 * MiB, b"two")
        failed = rpush(f"{remote}/no/such/dir/web.img")  # the remote end refuses
        assert failed.returncode == 2, failed.stderr
        assert qsd.bitmaps()["b0"]["count"] == GRANULE  # still there for the next push
        ok = rpush(f"{remote}/web.img")
        assert ok.returncode == 0, ok.stderr
        stats = json.loads(ok.stdout)
        assert stats["map"].startswith("dirty-bitmap") and stats["bytes_read"] <= CHUNK
    assert set(qsd.bitmaps()) == {"b0"} and qsd.bitmaps()["b0"]["count"] == 0
    assert content(str(remote / "web.img"))[1] == qsd.contents()


@pytest.mark.process
def test_closing_after_qemu_died_does_not_hide_the_error(tmp_path):
    d = StorageDaemon(tmp_path, 4 * MiB).start()
    try:
        src = managed(d)
        assert d.proc is not None
        d.proc.kill()  # QEMU is gone: the push's own error (a failed read) is what counts
        d.proc.wait()
        with pytest.raises(NbdError):
            src.read(0, 4096)
        src.close()  # cleaning up through QMP fails quietly: the next push does it
    finally:
        d.stop()


def scratch_files(d: StorageDaemon) -> list[Path]:
    return sorted(d.image.parent.glob(f"{d.image.name}.*"))


def extra_nodes(d: StorageDaemon) -> set[str]:
    return {n["node-name"] for n in d.qmp("query-named-block-nodes", flat=True)} - {
        NODE, "file0"}


@pytest.mark.process
def test_a_managed_push_reads_the_disk_as_it_was_when_it_started(qsd):
    qsd.write(2 * MiB, b"before" * 1000)
    with closing(managed(qsd)) as src:
        assert not src.managed.live
        assert len(scratch_files(qsd)) == 1 and extra_nodes(qsd)
        qsd.write(2 * MiB, b"AFTER!" * 1000)  # the guest writes while the push reads
        qsd.write(9 * MiB, b"new")
        assert src.read(2 * MiB, 6000) == b"before" * 1000
        assert src.read(9 * MiB, 3) == bytes(3)
        assert src.changed_ranges() == [(2 * MiB, GRANULE)]
        src.committed()
    assert scratch_files(qsd) == [] and extra_nodes(qsd) == set()
    assert qsd.qmp("query-jobs") == []
    with closing(managed(qsd)) as src:  # what the guest wrote during the push comes next
        assert src.changed_ranges() == [(2 * MiB, GRANULE), (9 * MiB, GRANULE)]
        assert src.read(2 * MiB, 6) == b"AFTER!"


@pytest.mark.process
def test_without_room_for_a_scratch_file_the_disk_is_read_live_with_a_warning(qsd, tmp_path):
    blocker = qsd.image.parent / f"{qsd.image.name}.drs{zlib.crc32(b'b0'):08x}-scratch"
    blocker.mkdir()  # QEMU cannot create its scratch file there
    (blocker / "keep").write_text("")
    qsd.write(MiB, b"x")
    stats = push(qsd, tmp_path / "backup.img")
    assert any("no point-in-time view" in w for w in stats.warnings)
    assert content(str(tmp_path / "backup.img"))[1] == qsd.contents()
    assert extra_nodes(qsd) == set() and qsd.qmp("query-jobs") == []
    assert blocker.is_dir()
