"""The operations kit in contrib/: snapshot wrappers, job wrapper, metrics hook, systemd units.

The wrappers run against stand-in ``lvs``/``lvcreate``/``lvremove``/``virsh``/``diskrsync``
programs put first on PATH: each appends its argv to a log and succeeds or fails as the test
says (environment variables), so the tests see exactly which commands ran, with which
arguments, in which order.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
LVM = CONTRIB / "diskrsync-lvm-snapshot"
LIBVIRT = CONTRIB / "diskrsync-libvirt"
JOB = CONTRIB / "diskrsync-job"
METRICS = CONTRIB / "diskrsync-metrics"
SCRIPTS = [LVM, LIBVIRT, JOB]
HOST = os.uname().nodename  # the wrappers label generations HOST:VOLUME

SUMMARY = {"size": 1 << 30, "chunk_size": 131072, "bytes_read": 1 << 30, "bytes_hashed": 5000,
           "bytes_sent": 123456, "bytes_received": 999, "chunks": 8192, "chunks_differing": 17,
           "chunk_bytes_differing": 17 * 131072, "zero_chunks": 10, "pages_compared": 70,
           "pages_differing": 3, "duration": 12.5, "root_hash": "ab" * 32,
           "target_root_hash": "ab" * 32, "generation": 4, "resumed": False, "dry_run": False,
           "differing_ranges": [], "source_changed_chunks": [], "read_errors": [],
           "warnings": []}

# Each stand-in logs "NAME ARG..." (shell-quoted) and then behaves as the STUB_* variables say.
LOG_LINE = ('printf "%s" "${0##*/}" >>"$STUB_LOG"; printf " %q" "$@" >>"$STUB_LOG"; '
            'echo >>"$STUB_LOG"')
STUBS = {
    "lvs": "exit \"${STUB_LVS_RC:-5}\"",  # 5: no such LV (what lvs says for a missing one)
    "lvcreate": "exit \"${STUB_LVCREATE_RC:-0}\"",
    "lvremove": "exit \"${STUB_LVREMOVE_RC:-0}\"",
    "diskrsync": """
trap 'echo "# diskrsync got TERM" >>"$STUB_LOG"; kill "$sleeper" 2>/dev/null; exit 143' TERM
if [ -n "${STUB_DISKRSYNC_SLEEP:-}" ]; then
    sleep "$STUB_DISKRSYNC_SLEEP" & sleeper=$!
    echo "# diskrsync sleeping" >>"$STUB_LOG"
    wait "$sleeper"
fi
[ -z "${STUB_DISKRSYNC_JSON:-}" ] || printf '%s\\n' "$STUB_DISKRSYNC_JSON"
exit "${STUB_DISKRSYNC_RC:-0}"
""",
    "virsh": """
case " ${STUB_VIRSH_FAIL:-} " in *" $1 "*) echo "error: $1 failed (stand-in)" >&2; exit 1 ;; esac
case "$1" in
    domblklist) printf '%b' "$STUB_VIRSH_BLKLIST" ;;
    domstate) echo "${STUB_VIRSH_STATE:-running}" ;;
    snapshot-create-as)
        for a in "$@"; do
            case "$a" in *snapshot=external,file=*) : >"${a#*file=}" ;; esac
        done ;;
    backup-begin) cat "$3" >"$STUB_LOG.backup.xml"; cat "$4" >"$STUB_LOG.checkpoint.xml" ;;
    checkpoint-list) printf '%b' "${STUB_VIRSH_CHECKPOINTS:-}" ;;
esac
exit 0
""",
}


class Stubs:
    def __init__(self, tmp: Path) -> None:
        self.bin = tmp / "stub-bin"
        self.bin.mkdir()
        self.log = tmp / "calls.log"
        self.log.write_text("")
        for name, body in STUBS.items():
            path = self.bin / name
            path.write_text(f"#!/bin/bash\n{LOG_LINE}\n{body}\n")
            path.chmod(0o755)
        self.images = tmp / "images"
        self.images.mkdir()
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "STUB_LOG": str(self.log),
            "STUB_VIRSH_BLKLIST": (
                " Type   Device   Target   Source\\n"
                "------------------------------------------------\\n"
                f" file   disk     vda      {self.images}/web1.img\\n"
                " file   cdrom    sda      -\\n"
                f" file   disk     vdb      {self.images}/web1-data.img\\n"),
        }
        self.env.pop("DISKRSYNC", None)

    def calls(self) -> list[list[str]]:
        # lines starting with # are events the stand-ins note (sleeping, got TERM)
        return [shlex.split(line) for line in self.log.read_text().splitlines()
                if not line.startswith("#")]

    def names(self) -> list[str]:
        return [" ".join(c[:2]) if c[0] == "virsh" else c[0] for c in self.calls()]

    def run(self, *argv: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in argv], env={**self.env, **env},
                              capture_output=True, text=True, timeout=30)

    def start(self, *argv: str | Path, **env: str) -> subprocess.Popen[str]:
        # a suite started in the background inherits SIGINT ignored, and bash cannot trap a
        # signal that was ignored when it started: give the wrapper the default disposition
        return subprocess.Popen([str(a) for a in argv], env={**self.env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert time.monotonic() < deadline, f"never logged {text!r}: {self.log.read_text()}"
            time.sleep(0.02)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def stubs(tmp_path: Path) -> Stubs:
    return Stubs(tmp_path)


# -- LVM snapshot wrapper ------------------------------------------------------------------


@pytest.mark.process
def test_lvm_success_creates_pushes_and_removes(stubs):
    r = stubs.run(LVM, "-L", "5G", "vg0/root", "/srv/b/root.spgz", "--keep", "3")
    assert r.returncode == 0, r.stderr
    assert stubs.calls() == [
        ["lvs", "vg0/root-diskrsync"],
        ["lvcreate", "-s", "-n", "root-diskrsync", "-L", "5G", "vg0/root"],
        ["diskrsync", "push", "/dev/vg0/root-diskrsync", "/srv/b/root.spgz", "--label",
         f"{HOST}:/dev/vg0/root", "--keep", "3"],
        ["lvremove", "-f", "vg0/root-diskrsync"],
    ]


@pytest.mark.parametrize(("dest", "extra", "image"), [
    ("{tmp}/backups", [], "{tmp}/backups/vg0-root.spgz"),
    ("{tmp}/backups/", [], "{tmp}/backups/vg0-root.spgz"),
    ("vault:/srv/b/", [], "vault:/srv/b/vg0-root.spgz"),
    ("vault:/srv/b/", ["--no-compress"], "vault:/srv/b/vg0-root"),
    ("vault:/srv/b/web1.spgz", [], "vault:/srv/b/web1.spgz"),
])
@pytest.mark.process
def test_lvm_directory_dest_is_named_after_vg_and_lv(stubs, tmp_path, dest, extra, image):
    """vg0/root and vg1/root into one directory: two images, not one root-diskrsync.spgz."""
    (tmp_path / "backups").mkdir()
    dest, image = dest.format(tmp=tmp_path), image.format(tmp=tmp_path)
    r = stubs.run(LVM, "vg0/root", dest, *extra)
    assert r.returncode == 0, r.stderr
    assert stubs.calls()[2][2:4] == ["/dev/vg0/root-diskrsync", image]
    stubs.log.write_text("")
    r = stubs.run(LVM, "my-vg/my-lv", f"{tmp_path}/backups")
    assert stubs.calls()[2][3:6] == [f"{tmp_path}/backups/my--vg-my--lv.spgz", "--label",
                                     f"{HOST}:/dev/my-vg/my-lv"]


@pytest.mark.process
def test_lvm_passes_the_json_summary_through_on_stdout(stubs):
    r = stubs.run(LVM, "--name", "snap", "/dev/vg0/root", "b.spgz", "--json",
                  STUB_DISKRSYNC_JSON=json.dumps(SUMMARY))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == SUMMARY  # lvcreate/lvremove chatter goes to stderr
    assert ["lvcreate", "-s", "-n", "snap", "-L", "1G", "vg0/root"] in stubs.calls()
    assert stubs.calls()[-1] == ["lvremove", "-f", "vg0/snap"]


@pytest.mark.parametrize("rc", [5, 10])
@pytest.mark.process
def test_lvm_push_failure_removes_snapshot_and_passes_exit_code(stubs, rc):
    r = stubs.run(LVM, "vg0/root", "b.spgz", STUB_DISKRSYNC_RC=str(rc))
    assert r.returncode == rc
    assert stubs.names() == ["lvs", "lvcreate", "diskrsync", "lvremove"]
    assert f"push exited with status {rc}" in r.stderr


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.process
def test_lvm_signal_during_push_stops_it_and_removes_snapshot(stubs, sig, code):
    # the push would sleep far longer than the guard: a wrapper that waits for it times out
    p = stubs.start(LVM, "vg0/root", "b.spgz", STUB_DISKRSYNC_SLEEP="300")
    stubs.wait_for("diskrsync sleeping")
    p.send_signal(sig)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert stubs.names() == ["lvs", "lvcreate", "diskrsync", "lvremove"]
    assert "diskrsync got TERM" in stubs.log.read_text()
    assert "removed snapshot vg0/root-diskrsync" in err


@pytest.mark.process
def test_lvm_create_failure_pushes_nothing(stubs):
    r = stubs.run(LVM, "vg0/root", "b.spgz", STUB_LVCREATE_RC="5")
    assert r.returncode == 1
    assert stubs.names() == ["lvs", "lvcreate"]
    assert "lvcreate failed: no snapshot, nothing pushed" in r.stderr


@pytest.mark.process
def test_lvm_removes_a_snapshot_left_by_a_killed_run_first(stubs):
    r = stubs.run(LVM, "vg0/root", "b.spgz", STUB_LVS_RC="0")
    assert r.returncode == 0, r.stderr
    assert stubs.names() == ["lvs", "lvremove", "lvcreate", "diskrsync", "lvremove"]
    assert "left by an earlier run" in r.stderr


@pytest.mark.process
def test_lvm_usage_errors(stubs):
    assert stubs.run(LVM, "root", "b.spgz").returncode == 2
    assert stubs.run(LVM, "vg0/root").returncode == 2
    assert stubs.calls() == []


# -- libvirt wrapper -----------------------------------------------------------------------


@pytest.mark.process
def test_libvirt_external_snapshot_push_and_merge_back(stubs):
    r = stubs.run(LIBVIRT, "web1", "/srv/b/web1.spgz", "--keep", "4")
    assert r.returncode == 0, r.stderr
    base = f"{stubs.images}/web1.img"
    overlay = f"{base}.diskrsync-overlay"
    calls = stubs.calls()
    assert stubs.names() == ["virsh domblklist", "virsh domstate", "virsh snapshot-create-as",
                             "diskrsync", "virsh blockcommit"]
    snap = calls[2]
    for flag in ("--disk-only", "--atomic", "--no-metadata"):
        assert flag in snap
    assert snap[1:2] == ["web1"] or snap[2] == "web1"
    specs = [snap[i + 1] for i, a in enumerate(snap) if a == "--diskspec"]
    assert specs == [f"vda,snapshot=external,file={overlay}", "vdb,snapshot=no"]
    assert calls[3] == ["diskrsync", "push", base, "/srv/b/web1.spgz", "--label",
                        f"{HOST}:web1/vda", "--keep", "4"]
    assert calls[4] == ["virsh", "blockcommit", "web1", "vda", "--active", "--pivot", "--wait"]
    assert not Path(overlay).exists(), "overlay file left behind after the merge"


@pytest.mark.process
def test_libvirt_block_device_overlay_goes_to_real_storage(stubs, tmp_path):
    """A disk on a block device used to get its overlay beside it: in /dev, i.e. in RAM.
    Now it goes to the overlay directory (default /var/lib/libvirt/images), whose free space
    is checked first."""
    blk = stubs.env["STUB_VIRSH_BLKLIST"].replace(f"file   disk     vda      {stubs.images}"
                                                  f"/web1.img", "block  disk     vda      "
                                                  "/dev/vg0/web1-disk")
    store = tmp_path / "overlays"
    store.mkdir()
    r = stubs.run(LIBVIRT, "--overlay-dir", store, "web1", "b.spgz", STUB_VIRSH_BLKLIST=blk)
    assert r.returncode == 0, r.stderr
    overlay = f"{store}/web1-vda.diskrsync-overlay"
    assert f"vda,snapshot=external,file={overlay}" in stubs.calls()[2]
    assert stubs.calls()[3][:3] == ["diskrsync", "push", "/dev/vg0/web1-disk"]
    assert not Path(overlay).exists()
    # the default is not /dev
    stubs.log.write_text("")
    r = stubs.run(LIBVIRT, "web1", "b.spgz", "--overlay-min-free", "0",
                  STUB_VIRSH_BLKLIST=blk, STUB_VIRSH_FAIL="snapshot-create-as")
    overlay = "/var/lib/libvirt/images/web1-vda.diskrsync-overlay"
    assert any(f"file={overlay}" in a for a in stubs.calls()[-1]) or \
        "overlay directory /var/lib/libvirt/images does not exist" in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--overlay-min-free", "1E"], "free for the overlay in {store}, less than"),
    (["--overlay-dir", "/dev/shm"], "overlay directory /dev/shm is in RAM"),
    (["--overlay-dir", "{store}/missing"], "overlay directory {store}/missing does not exist"),
    (["--overlay-min-free", "lots"], "--overlay-min-free: bad size"),
])
@pytest.mark.process
def test_libvirt_refuses_an_overlay_place_that_cannot_take_it(stubs, tmp_path, args, message):
    store = tmp_path / "overlays"
    store.mkdir()
    args = [a.format(store=store) for a in args]
    r = stubs.run(LIBVIRT, "--overlay-dir", store, *args, "web1", "b.spgz")
    assert r.returncode == 1, r.stderr
    assert message.format(store=store) in r.stderr
    assert stubs.names() == ["virsh domblklist", "virsh domstate"]  # no snapshot, no push


@pytest.mark.process
def test_libvirt_external_push_failure_still_merges_back(stubs):
    r = stubs.run(LIBVIRT, "--disk", "vdb", "web1", "b.spgz", STUB_DISKRSYNC_RC="3")
    assert r.returncode == 3
    assert stubs.names()[-1] == "virsh blockcommit"
    assert stubs.calls()[-2][:3] == ["diskrsync", "push", f"{stubs.images}/web1-data.img"]
    assert stubs.calls()[-1][3] == "vdb"


@pytest.mark.process
def test_libvirt_failed_merge_keeps_overlay_and_fails(stubs):
    r = stubs.run(LIBVIRT, "web1", "b.spgz", STUB_VIRSH_FAIL="blockcommit")
    assert r.returncode == 1
    assert Path(f"{stubs.images}/web1.img.diskrsync-overlay").exists()
    assert "do not delete it" in r.stderr


@pytest.mark.process
def test_libvirt_freeze_push_thaw(stubs):
    r = stubs.run(LIBVIRT, "--mode", "freeze", "web1", "b.spgz")
    assert r.returncode == 0, r.stderr
    assert stubs.names() == ["virsh domblklist", "virsh domstate", "virsh domfsfreeze",
                             "diskrsync", "virsh domfsthaw"]
    assert stubs.calls()[-1] == ["virsh", "domfsthaw", "web1"]


@pytest.mark.process
def test_libvirt_thaws_when_the_push_fails(stubs):
    r = stubs.run(LIBVIRT, "-m", "freeze", "web1", "b.spgz", STUB_DISKRSYNC_RC="5")
    assert r.returncode == 5
    assert stubs.names()[-2:] == ["diskrsync", "virsh domfsthaw"]


@pytest.mark.process
def test_libvirt_thaws_when_freeze_fails_and_pushes_nothing(stubs):
    r = stubs.run(LIBVIRT, "-m", "freeze", "web1", "b.spgz", STUB_VIRSH_FAIL="domfsfreeze")
    assert r.returncode == 1
    assert "diskrsync" not in stubs.names()
    assert stubs.names()[-1] == "virsh domfsthaw"


@pytest.mark.parametrize("mode", ["freeze", "external", "bitmap"])
@pytest.mark.process
def test_libvirt_sigterm_during_push_cleans_up(stubs, mode, tmp_path):
    p = stubs.start(LIBVIRT, "-m", mode, "--state", tmp_path / "st", "web1", "b.spgz",
                    STUB_DISKRSYNC_SLEEP="30")
    stubs.wait_for("diskrsync sleeping")
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=10)
    assert p.returncode == 143, err
    assert "diskrsync got TERM" in stubs.log.read_text()
    last = {"freeze": "virsh domfsthaw", "external": "virsh blockcommit",
            "bitmap": "virsh domjobabort"}[mode]
    assert stubs.names()[-1] == last
    assert not (tmp_path / "st").exists()  # nothing committed: the old chain stays


def _bitmap_push(stubs: Stubs, state: Path, *extra: str, **env: str,
                 ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run --mode bitmap; the result and the diskrsync argv."""
    r = stubs.run(LIBVIRT, "--mode", "bitmap", "--state", state, "web1", "/b/web1.spgz",
                  *extra, **env)
    pushes = [c for c in stubs.calls() if c[0] == "diskrsync"]
    return r, pushes[-1] if pushes else []


@pytest.mark.process
def test_libvirt_bitmap_first_push_reads_all_and_starts_a_chain(stubs, tmp_path):
    state = tmp_path / "state"
    r, push = _bitmap_push(stubs, state, "--keep", "4")
    assert r.returncode == 0, r.stderr
    assert stubs.names() == ["virsh domblklist", "virsh domstate", "virsh backup-begin",
                             "diskrsync", "virsh domjobabort", "virsh checkpoint-list"]
    backup = Path(f"{stubs.log}.backup.xml").read_text()
    assert "<incremental>" not in backup
    assert f"<scratch file='{stubs.images}/web1.img.diskrsync-scratch'/>" in backup
    assert "<disk name='vdb' backup='no'/>" in backup
    socket = re.search(r"socket='([^']+)'", backup)[1]  # type: ignore[index]
    label = f"{os.uname().nodename}:web1/vda"
    assert push == ["diskrsync", "push", f"nbd+unix:///vda?socket={socket}", "/b/web1.spgz",
                    "--label", label, "--dirty-bitmap", "backup-vda", "--keep", "4"]
    checkpoint = re.search(r"<name>(.+)</name>",
                           Path(f"{stubs.log}.checkpoint.xml").read_text())[1]  # type: ignore[index]
    assert state.read_text().strip() == checkpoint
    assert not Path(socket).parent.exists()  # the XML and socket directory went


@pytest.mark.process
def test_libvirt_bitmap_push_reads_changes_since_the_last_and_drops_old_checkpoints(
        stubs, tmp_path):
    state = tmp_path / "state"
    _bitmap_push(stubs, state)
    prev = state.read_text().strip()
    tag = prev.split("-")[1]
    r, _push = _bitmap_push(stubs, state,
                            STUB_VIRSH_CHECKPOINTS=f"{prev}\nother\ndiskrsync-{tag}-99\n")
    assert r.returncode == 0, r.stderr
    assert f"<incremental>{prev}</incremental>" in Path(f"{stubs.log}.backup.xml").read_text()
    deleted = [c[3] for c in stubs.calls() if c[:2] == ["virsh", "checkpoint-delete"]]
    assert deleted == [prev, f"diskrsync-{tag}-99"]  # ours, older: never "other"


@pytest.mark.process
def test_libvirt_bitmap_failed_push_keeps_the_chain(stubs, tmp_path):
    state = tmp_path / "state"
    state.write_text("diskrsync-1-100\n")
    r, _push = _bitmap_push(stubs, state, STUB_DISKRSYNC_RC="5")
    assert r.returncode == 5
    assert "<incremental>diskrsync-1-100</incremental>" in \
        Path(f"{stubs.log}.backup.xml").read_text()
    new = re.search(r"<name>(.+)</name>",
                    Path(f"{stubs.log}.checkpoint.xml").read_text())[1]  # type: ignore[index]
    assert stubs.names()[-2:] == ["virsh domjobabort", "virsh checkpoint-delete"]
    assert stubs.calls()[-1] == ["virsh", "checkpoint-delete", "web1", new]
    assert state.read_text() == "diskrsync-1-100\n"


@pytest.mark.process
def test_libvirt_bitmap_gone_checkpoint_means_a_full_push(stubs, tmp_path):
    state = tmp_path / "state"
    state.write_text("diskrsync-1-100\n")
    r, _push = _bitmap_push(stubs, state, STUB_VIRSH_FAIL="checkpoint-dumpxml")
    assert r.returncode == 0, r.stderr
    assert "is gone" in r.stderr
    assert "<incremental>" not in Path(f"{stubs.log}.backup.xml").read_text()


@pytest.mark.process
def test_libvirt_bitmap_backup_begin_failure_pushes_nothing(stubs, tmp_path):
    r, push = _bitmap_push(stubs, tmp_path / "state", STUB_VIRSH_FAIL="backup-begin")
    assert r.returncode == 1
    assert push == []
    assert "virsh domjobabort" in stubs.names()


@pytest.mark.process
def test_libvirt_shut_off_domain_is_pushed_as_is(stubs):
    r = stubs.run(LIBVIRT, "web1", "b.spgz", STUB_VIRSH_STATE="shut off")
    assert r.returncode == 0, r.stderr
    assert stubs.names() == ["virsh domblklist", "virsh domstate", "diskrsync"]


@pytest.mark.process
def test_libvirt_refuses_a_disk_still_on_an_old_overlay(stubs):
    blk = stubs.env["STUB_VIRSH_BLKLIST"].replace("web1.img", "web1.img.diskrsync-overlay")
    r = stubs.run(LIBVIRT, "web1", "b.spgz", STUB_VIRSH_BLKLIST=blk)
    assert r.returncode == 1
    assert "merge it first" in r.stderr
    assert "diskrsync" not in stubs.names()


@pytest.mark.process
def test_libvirt_unknown_disk(stubs):
    r = stubs.run(LIBVIRT, "--disk", "vdz", "web1", "b.spgz")
    assert r.returncode == 1
    assert "has no disk vdz (it has: vda vdb" in r.stderr


# -- job wrapper ---------------------------------------------------------------------------


def write_conf(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.process
def test_job_reads_config_and_runs_lvm_wrapper_with_metrics(stubs, tmp_path):
    metrics = tmp_path / "textfile"
    metrics.mkdir()
    conf = write_conf(tmp_path / "web1-root.conf", f"""
# a comment, then blank lines

SNAPSHOT=lvm
LV=vg0/root
SNAPSHOT_SIZE="5G"
DEST='/srv/backups/web 1.spgz'
KEEP=7
   OPTIONS="-i /etc/diskrsync/id_ed25519 --chunk-size 256K"
METRICS_DIR={metrics}
""")
    r = stubs.run(JOB, "--config", conf, STUB_DISKRSYNC_JSON=json.dumps(SUMMARY),
                  STUB_DISKRSYNC_RC="0")
    assert r.returncode == 0, r.stderr
    assert stubs.calls() == [
        ["lvs", "vg0/root-diskrsync"],
        ["lvcreate", "-s", "-n", "root-diskrsync", "-L", "5G", "vg0/root"],
        ["diskrsync", "push", "/dev/vg0/root-diskrsync", "/srv/backups/web 1.spgz", "--label",
         f"{HOST}:/dev/vg0/root", "--json", "--keep", "7", "-i", "/etc/diskrsync/id_ed25519",
         "--chunk-size", "256K"],
        ["lvremove", "-f", "vg0/root-diskrsync"],
    ]
    assert "diskrsync job web1-root: ok, generation 4, 17 of 8192 chunks differed" in r.stdout
    values = parse_prom(metrics / "diskrsync_web1-root.prom")
    assert values["diskrsync_exit_code", "web1-root"] == 0
    assert values["diskrsync_bytes_sent", "web1-root"] == 123456


@pytest.mark.process
def test_job_by_name_from_config_dir_and_exit_code(stubs, tmp_path):
    confdir = tmp_path / "etc"
    confdir.mkdir()
    write_conf(confdir / "data.conf", "SOURCE=/dev/sdb\nDEST=host:/b/data.spgz\n"
                                      "DISKRSYNC=diskrsync\n")
    r = stubs.run(JOB, "data", DISKRSYNC_CONF_DIR=str(confdir), STUB_DISKRSYNC_RC="10")
    assert r.returncode == 10
    assert stubs.calls() == [["diskrsync", "push", "/dev/sdb", "host:/b/data.spgz", "--json"]]
    assert "diskrsync job data: FAILED with exit status 10" in r.stdout


@pytest.mark.process
def test_job_libvirt_config(stubs, tmp_path):
    conf = write_conf(tmp_path / "vm.conf",
                      "SNAPSHOT=libvirt\nDOMAIN=web1\nDISK=vdb\nLIBVIRT_MODE=freeze\n"
                      "DEST=/b/vm.spgz\n")
    r = stubs.run(JOB, "--config", conf)
    assert r.returncode == 0, r.stderr
    assert stubs.names() == ["virsh domblklist", "virsh domstate", "virsh domfsfreeze",
                             "diskrsync", "virsh domfsthaw"]
    assert stubs.calls()[3] == ["diskrsync", "push", f"{stubs.images}/web1-data.img",
                                "/b/vm.spgz", "--label", f"{HOST}:web1/vdb", "--json"]


@pytest.mark.parametrize(("text", "message"), [
    ("DEST=/b\nSOURCE=/dev/sdb\nSOURCE_TYPO=1\n", "unknown key SOURCE_TYPO"),
    ("SOURCE=/dev/sdb\n", "DEST is required"),
    ("DEST=/b\nSNAPSHOT=lvm\n", "LV is required with SNAPSHOT=lvm"),
    ("DEST=/b\nSNAPSHOT=zfs\n", "SNAPSHOT must be none, lvm or libvirt"),
    ("DEST=/b\nSOURCE=/x\nKEEP=seven\n", "KEEP must be a number"),
    ("DEST=/b\nrm -rf /\n", ":2: expected KEY=VALUE"),
])
@pytest.mark.process
def test_job_rejects_bad_config(stubs, tmp_path, text, message):
    conf = write_conf(tmp_path / "bad.conf", text)
    r = stubs.run(JOB, "--config", conf)
    assert r.returncode == 2
    assert message in r.stderr
    assert stubs.calls() == []


@pytest.mark.process
def test_job_comments_after_values_are_comments(stubs, tmp_path):
    conf = write_conf(tmp_path / "c.conf",
                      "SOURCE=/dev/sdb   # the data disk\n"
                      "DEST='/b/x # kept.spgz'  # quoted: the # inside stays\n"
                      "KEEP=3\t# three\n"
                      "OPTIONS=--remote-cmd=/opt/a#b\n")
    r = stubs.run(JOB, "--config", conf)
    assert r.returncode == 0, r.stderr
    assert stubs.calls() == [["diskrsync", "push", "/dev/sdb", "/b/x # kept.spgz", "--json",
                              "--keep", "3", "--remote-cmd=/opt/a#b"]]
    bad = write_conf(tmp_path / "q.conf", "SOURCE=/x\nDEST=\"/b\" trailing\n")
    r = stubs.run(JOB, "--config", bad)
    assert r.returncode == 2 and ":2: unbalanced quotes" in r.stderr


@pytest.mark.process
def test_job_warns_when_lv_is_set_without_lvm_snapshots(stubs, tmp_path):
    """LV= alone used to push SOURCE live without a word."""
    conf = write_conf(tmp_path / "w.conf", "SOURCE=/dev/vg0/root\nLV=vg0/root\nDEST=/b\n"
                                           "DOMAIN=web1\n")
    r = stubs.run(JOB, "--config", conf)
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "LV= is ignored without SNAPSHOT=lvm" in r.stderr
    assert "DOMAIN= is ignored without SNAPSHOT=libvirt" in r.stderr
    ok = write_conf(tmp_path / "ok.conf", "SNAPSHOT=lvm\nLV=vg0/root\nDEST=/b\n")
    assert "warning" not in stubs.run(JOB, "--config", ok).stderr


@pytest.mark.process
def test_job_overlay_dir_goes_to_the_libvirt_wrapper(stubs, tmp_path):
    conf = write_conf(tmp_path / "o.conf", "SNAPSHOT=libvirt\nDOMAIN=web1\nDEST=/b\n"
                                           "OVERLAY_DIR=/srv/overlays\n")
    r = stubs.run(JOB, "--config", conf, "--dry-run")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert cmd[cmd.index("--overlay-dir") + 1] == "/srv/overlays"


@pytest.mark.process
def test_job_with_a_missing_config_fails(stubs, tmp_path):
    """What a timer with a mistyped job name runs (the unit has no ConditionPathExists)."""
    r = stubs.run(JOB, "web1-rooot", DISKRSYNC_CONF_DIR=str(tmp_path))
    assert r.returncode == 2
    assert "cannot read config file" in r.stderr


@pytest.mark.process
def test_job_config_is_not_executed(stubs, tmp_path):
    marker = tmp_path / "pwned"
    conf = write_conf(tmp_path / "x.conf", f"SOURCE=$(touch {marker})\nDEST=`touch {marker}`\n")
    r = stubs.run(JOB, "--config", conf)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert stubs.calls()[0][2:4] == [f"$(touch {marker})", f"`touch {marker}`"]


@pytest.mark.process
def test_job_sigterm_reaches_the_push_and_the_snapshot_goes(stubs, tmp_path):
    conf = write_conf(tmp_path / "j.conf", "SNAPSHOT=lvm\nLV=vg0/root\nDEST=/b\n")
    p = stubs.start(JOB, "--config", conf, STUB_DISKRSYNC_SLEEP="30")
    stubs.wait_for("diskrsync sleeping")
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=10)
    assert p.returncode == 143, err
    assert stubs.names()[-1] == "lvremove"
    assert "diskrsync got TERM" in stubs.log.read_text()


# -- metrics hook --------------------------------------------------------------------------


PROM_LINE = re.compile(r'^(diskrsync_\w+)\{diskrsync_job="([^"]*)"\} (\S+)$')


def parse_prom(path: Path) -> dict[tuple[str, str], float]:
    values: dict[tuple[str, str], float] = {}
    typed = set()
    for line in path.read_text().splitlines():
        if line.startswith("# TYPE "):
            _h, _t, name, kind = line.split()
            assert kind == "gauge"
            typed.add(name)
            continue
        if line.startswith("#"):
            continue
        m = PROM_LINE.match(line)
        assert m, f"not a metric line: {line!r}"
        assert m.group(1) in typed, f"{m.group(1)} has no TYPE line"
        values[m.group(1), m.group(2)] = float(m.group(3))
    return values


def run_metrics(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(METRICS), *args], input=stdin,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.process
def test_metrics_from_a_summary(tmp_path):
    summary = dict(SUMMARY, source_changed_chunks=[3, 4], read_errors=[[0, 4096]])
    r = run_metrics("--job", "web1", "--exit-code", "10", "--dir", str(tmp_path),
                    "--duration", "20.25", "--now", "1700000000", stdin=json.dumps(summary))
    assert r.returncode == 0, r.stderr
    assert "THE SOURCE CHANGED DURING THE PUSH" in r.stdout
    v = parse_prom(tmp_path / "diskrsync_web1.prom")
    assert v == {
        ("diskrsync_last_run_timestamp_seconds", "web1"): 1700000000,
        ("diskrsync_last_success_timestamp_seconds", "web1"): 0,  # exit 10 is no success
        ("diskrsync_exit_code", "web1"): 10,
        ("diskrsync_run_duration_seconds", "web1"): 20.25,
        ("diskrsync_duration_seconds", "web1"): 12.5,
        ("diskrsync_bytes_sent", "web1"): 123456,
        ("diskrsync_bytes_read", "web1"): 1 << 30,
        ("diskrsync_image_size_bytes", "web1"): 1 << 30,
        ("diskrsync_chunks", "web1"): 8192,
        ("diskrsync_chunks_differing", "web1"): 17,
        ("diskrsync_generation", "web1"): 4,
        ("diskrsync_source_changed", "web1"): 1,
        ("diskrsync_read_errors", "web1"): 1,
    }


@pytest.mark.process
def test_metrics_keep_last_success_across_a_failure(tmp_path):
    out = tmp_path / "diskrsync_db.prom"
    ok = run_metrics("--job", "db", "--exit-code", "0", "--dir", str(tmp_path), "--now", "1000",
                     stdin=json.dumps(SUMMARY))
    assert ok.returncode == 0, ok.stderr
    assert parse_prom(out)["diskrsync_last_success_timestamp_seconds", "db"] == 1000
    # a push that failed (e.g. SSH refused) prints an error object: exit code only
    failed = {"version": 1, "command": "push",
              "error": {"category": "peer", "exit_code": 5, "message": "vault: refused"}}
    bad = run_metrics("--job", "db", "--exit-code", "5", "--dir", str(tmp_path), "--now", "2000",
                      stdin=json.dumps(failed))
    assert bad.returncode == 0, bad.stderr
    v = parse_prom(out)
    assert v["diskrsync_last_success_timestamp_seconds", "db"] == 1000
    assert v["diskrsync_last_run_timestamp_seconds", "db"] == 2000
    assert v["diskrsync_exit_code", "db"] == 5
    assert v["diskrsync_bytes_sent", "db"] == 123456  # figures of the last summary kept
    # a later success moves it on
    run_metrics("--job", "db", "--exit-code", "0", "--dir", str(tmp_path), "--now", "3000",
                stdin=json.dumps(dict(SUMMARY, bytes_sent=7)))
    v = parse_prom(out)
    assert v["diskrsync_last_success_timestamp_seconds", "db"] == 3000
    assert v["diskrsync_bytes_sent", "db"] == 7


@pytest.mark.process
def test_metrics_garbage_summary_still_records_the_run(tmp_path):
    r = run_metrics("--job", "x", "--exit-code", "3", "--output", str(tmp_path / "x.prom"),
                    stdin="Traceback (most recent call last):\n")
    assert r.returncode == 0
    assert "not JSON" in r.stderr
    assert parse_prom(tmp_path / "x.prom")["diskrsync_exit_code", "x"] == 3


@pytest.mark.parametrize("stdin", ["Traceback (most recent call last):\n", "", "[1, 2]\n"])
@pytest.mark.process
def test_metrics_status_0_without_a_summary_is_unknown_not_success(tmp_path, stdin):
    out = tmp_path / "x.prom"
    run_metrics("--job", "x", "--exit-code", "0", "--output", str(out), "--now", "1000",
                stdin=json.dumps(SUMMARY))
    r = run_metrics("--job", "x", "--exit-code", "0", "--output", str(out), "--now", "2000",
                    stdin=stdin)
    assert r.returncode == 0
    assert "UNKNOWN" in r.stdout
    v = parse_prom(out)
    assert v["diskrsync_exit_code", "x"] == -1  # the exit-code alert fires
    assert v["diskrsync_last_success_timestamp_seconds", "x"] == 1000  # not 2000
    assert v["diskrsync_last_run_timestamp_seconds", "x"] == 2000


@pytest.mark.process
def test_metrics_rejects_a_job_name_that_would_break_the_file(tmp_path):
    r = run_metrics("--job", 'a"b/c', "--exit-code", "0", "--dir", str(tmp_path))
    assert r.returncode == 2
    assert list(tmp_path.iterdir()) == []


def load_metrics_module():
    loader = importlib.machinery.SourceFileLoader("diskrsync_metrics_hook", str(METRICS))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.inproc
def test_metrics_write_is_atomic(tmp_path, monkeypatch):
    """The new file is complete and fsynced under a name the collector ignores, then renamed
    over the old one in one step; readers of the old file keep seeing the old content."""
    mod = load_metrics_module()
    target = tmp_path / "diskrsync_j.prom"
    target.write_text("old content\n")
    reader = target.open()  # a collector in the middle of a read
    seen: dict[str, Any] = {}
    real_replace, real_fsync = os.replace, os.fsync
    fsynced = []

    def spy_fsync(fd):
        fsynced.append(fd)
        real_fsync(fd)

    def spy_replace(src, dst):
        src, dst = Path(src), Path(dst)
        seen.update(src=src, dst=dst, content=src.read_text(), fsynced=bool(fsynced),
                    target_then=dst.read_text())
        real_replace(src, dst)

    monkeypatch.setattr(mod.os, "replace", spy_replace)
    monkeypatch.setattr(mod.os, "fsync", spy_fsync)
    mod.write_atomically(str(target), "new content\n")
    assert seen["dst"] == target
    assert seen["src"].parent == tmp_path  # same filesystem: rename is atomic
    assert not seen["src"].name.endswith(".prom")  # node_exporter skips it
    assert seen["content"] == "new content\n" and seen["fsynced"]
    assert seen["target_then"] == "old content\n"
    assert target.read_text() == "new content\n"
    assert reader.read() == "old content\n"
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diskrsync_j.prom"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod.os, "replace", failing_replace)
    with pytest.raises(OSError):
        mod.write_atomically(str(target), "newer\n")
    assert target.read_text() == "new content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diskrsync_j.prom"]


# -- scripts and units, statically ---------------------------------------------------------


@pytest.mark.parametrize("script", [*SCRIPTS, METRICS], ids=lambda p: p.name)
@pytest.mark.process
def test_scripts_have_help(script):
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "sage" in r.stdout, r.stderr
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.process
def test_scripts_are_strict_bash(script):
    head = script.read_text().splitlines()[:10]
    assert head[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in head
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
@pytest.mark.process
def test_shellcheck():
    files = [*SCRIPTS, CONTRIB / "completion" / "diskrsync.bash"]
    r = subprocess.run(["shellcheck", "-s", "bash", *map(str, files)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


UNITS = ["diskrsync-push@.service", "diskrsync-push@.timer", "diskrsync-failure@.service"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.process
def test_units_pass_systemd_analyze_verify(tmp_path):
    # the units name the installed path of diskrsync-job; point it at the repo's copy so that
    # verify can check it is executable
    for name in UNITS:
        text = (CONTRIB / "systemd" / name).read_text()
        text = text.replace("/usr/local/lib/diskrsync/", f"{CONTRIB}/")
        (tmp_path / name).write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "./diskrsync-push@web1.service",
         "./diskrsync-push@web1.timer", "./diskrsync-failure@diskrsync-push@web1.service.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # unknown keys and bad values are only warnings: any output is a failure
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        r.stdout + r.stderr


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (CONTRIB / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.inproc
def test_unit_settings_that_matter():
    svc = unit_settings("diskrsync-push@.service")
    assert svc["ExecStart"] == ["/usr/local/lib/diskrsync/diskrsync-job %i"]
    # a mistyped job name must fail the unit (and fire OnFailure=), not skip it silently
    assert not [k for k in svc if k.startswith("Condition")], svc
    assert svc["Type"] == ["oneshot"]
    assert svc["OnFailure"] == ["diskrsync-failure@%n.service"]
    assert svc["KillMode"] == ["mixed"]  # SIGTERM to the wrapper first: it cleans up
    for key, value in [("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                       ("ProtectSystem", "strict"), ("ProtectHome", "read-only")]:
        assert svc[key] == [value]
    # raw block devices must stay reachable
    for key in ("PrivateDevices", "DeviceAllow", "ProtectClock", "DevicePolicy"):
        assert key not in svc, f"{key}= would hide the block devices"
    timer = unit_settings("diskrsync-push@.timer")
    assert timer["Persistent"] == ["true"]
    assert timer["RandomizedDelaySec"] and timer["OnCalendar"]
    assert timer["WantedBy"] == ["timers.target"]


@pytest.mark.process
def test_example_job_config_is_valid(stubs):
    r = stubs.run(JOB, "--config", CONTRIB / "diskrsync-job.conf.example", "--dry-run")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert cmd[0].endswith("/diskrsync-lvm-snapshot")
    assert cmd[1:] == ["--diskrsync", "diskrsync", "--size", "4G", "vg0/root",
                       "backup@vault:/srv/backups/web1-root.spgz", "--json", "--keep", "7",
                       "-i", "/etc/diskrsync/id_ed25519", "--remote-cmd",
                       "/usr/local/bin/diskrsync"]
