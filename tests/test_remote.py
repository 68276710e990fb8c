"""Remote pushes and pulls through the real CLI against a real sshd (tests/support/sshd.py).

Every case drives ``python -m diskrsync.cli push`` in a subprocess, exactly as a user would,
with this checkout's diskrsync as the remote command. The server re-keys every 8 MiB, so
each transfer here also crosses several re-keys. Failures must end with exit status != 0,
exactly one ``diskrsync: ...`` line on stderr and no traceback, and leave the previous
generation of the image untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.sshd import SshServer, free_port, make_key

from diskrsync.base.errors import ConnectionClosed, DiskrsyncError, UsageError
from diskrsync.base.merkle import leaf_hash
from diskrsync.cli import jsonout
from diskrsync.cli.main import build_parser
from diskrsync.cli.requests import ssh_options
from diskrsync.cli.serve import KEEP_ALL, _parse_request, apply_retention
from diskrsync.compression.codec import Kind
from diskrsync.compression.sources import RawSource
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import FdStream, FramedChannel
from diskrsync.synccore.push import serve_source
from diskrsync.synccore.source import SourceOptions, SourceSession
from diskrsync.synccore.target import TargetOptions, open_store

pytestmark = pytest.mark.ssh

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
ODD = "dir with space 'and' \"quotes\""  # a path component that needs quoting everywhere


def remote_cmd() -> str:
    """This checkout's diskrsync, as the remote host runs it (no installed copy needed)."""
    exe = REPO / ".venv" / "bin" / "diskrsync"
    if exe.exists():
        return str(exe)
    return f"{shlex.quote(sys.executable)} -m diskrsync.cli"


class RekeyingServer(SshServer):
    """The harness's sshd, re-keying every 8 MiB so pushes cross many key exchanges."""

    def _write_config(self, port: int, extra: list[str]) -> None:
        super()._write_config(port, [*extra, "RekeyLimit 8M"])


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with RekeyingServer(tmp_path_factory.mktemp("sshd")) as s:
        s.write_known_hosts()
        yield s


class Env:
    """A client set-up: private HOME, no agent, an ssh_config naming the server testhost."""

    def __init__(self, srv: SshServer, tmp: Path) -> None:
        self.srv = srv
        self.tmp = tmp
        self.home = tmp / "home"
        (self.home / ".ssh").mkdir(parents=True)
        self.config = srv.write_ssh_config(
            tmp / "ssh_config", UserKnownHostsFile=str(srv.known_hosts))
        self.remote = tmp / ODD
        self.remote.mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("SSH_AUTH_SOCK", "DISKRSYNC_SSH_KEEPALIVE")}
        self.env["HOME"] = str(self.home)

    def rpath(self, name: str) -> str:
        return f"testhost:{self.remote / name}"

    def popen(self, *args: str, env: dict[str, str] | None = None,
              ssh: list[str] | None = None, cmd: str | None = None) -> subprocess.Popen[str]:
        ssh = ["-F", str(self.config)] if ssh is None else ssh
        argv = [sys.executable, "-m", "diskrsync.cli", "push", *args, *ssh,
                "--remote-cmd", cmd or remote_cmd()]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**self.env, **(env or {})}, cwd=self.tmp)

    def push(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = self.popen(*args, **kw)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def ok(self, *args: str, **kw: Any) -> dict[str, Any]:
        res = self.push(*args, "--json", **kw)
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        stats: dict[str, Any] = json.loads(res.stdout)
        assert jsonout.check(stats) == []  # pushes and pulls over SSH follow docs/json.md too
        return stats


@pytest.fixture
def env(srv: SshServer, tmp_path: Path) -> Env:
    return Env(srv, tmp_path)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskrsync.cli", *args],
                          capture_output=True, text=True, timeout=60)


def content(image: Path, tmp: Path, generation: int | None = None) -> bytes:
    out = tmp / f"restored-{time.monotonic_ns()}"
    gen = ["-g", str(generation)] if generation is not None else []
    res = cli("restore", str(image), str(out), *gen, "-q")
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def info(image: Path) -> dict[str, Any]:
    res = cli("info", str(image), "--json")
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk(path: Path, size: int, seed: int = 0) -> bytes:
    """A disk-like file: incompressible data, text, and zero runs."""
    rnd = hashlib.shake_256(str(seed).encode()).digest(size // 2)
    data = bytearray(size)
    data[: len(rnd)] = rnd
    text = b"".join(b"block %d of seed %d\n" % (i, seed) for i in range(size // 64))
    data[size // 2 : size // 2 + size // 4] = text[: size // 4]
    path.write_bytes(bytes(data))
    return bytes(data)


def patch(path: Path, offsets: list[int], tag: bytes = b"CHANGED") -> bytes:
    data = bytearray(path.read_bytes())
    for off in offsets:
        data[off : off + len(tag)] = tag
    path.write_bytes(bytes(data))
    return bytes(data)


def failed(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert a clean failure: status != 0, no traceback, one ``diskrsync:`` line last;
    anything before it is the remote's own stderr, relayed as ``testhost: ...``."""
    assert res.returncode != 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    *relayed, last = res.stderr.splitlines() or [""]
    assert last.startswith("diskrsync: "), res.stderr
    assert all(line.startswith("testhost: ") for line in relayed), res.stderr
    assert not any(line.startswith("testhost: diskrsync:") for line in relayed), res.stderr
    for n in needles:
        assert n in last, last
    if os.environ.get("SHOW_ERRORS"):
        print(f"\n{res.stderr}", end="")
    return last


# -- working pushes ------------------------------------------------------------------------


@pytest.mark.process
def test_push_then_pull_first_and_incremental(env: Env, tmp_path: Path) -> None:
    src = tmp_path / f"src {ODD}.img"
    size = 24 * MiB + 12345  # a short last chunk
    data = disk(src, size)
    image = env.remote / "web 1.spgz"

    first = env.ok(str(src), env.rpath("web 1.spgz"))
    assert first["generation"] == 1 and not first["resumed"]
    assert first["bytes_sent"] > 12 * MiB  # the random half cannot compress
    assert content(image, tmp_path) == data

    data = patch(src, [5 * MiB, 13 * MiB + 7, size - 10])
    second = env.ok(str(src), env.rpath("web 1.spgz"))
    assert second["generation"] == 2
    assert second["chunks_differing"] == 3
    assert second["bytes_sent"] < 1 * MiB
    assert second["target"]["chunks_written"] == 3  # what the serving end reported
    assert set(second["phases"]) == {"connect", "compare", "drain", "commit"}
    assert content(image, tmp_path) == data
    assert content(image, tmp_path, 1) != data  # the older generation is still there

    # the backup server pulls the image (and a raw file) from the remote host
    local = tmp_path / "pulled.spgz"
    pulled = env.ok(env.rpath("web 1.spgz"), str(local))
    assert pulled["generation"] == 1
    assert pulled["size"] == size and pulled["root_hash"] == second["root_hash"]
    assert pulled["bytes_sent"] > 12 * MiB  # source-to-target bytes, as for a push
    assert content(local, tmp_path) == data

    data = patch(src, [1 * MiB])
    env.ok(str(src), env.rpath("web 1.spgz"))
    again = env.ok(env.rpath("web 1.spgz"), str(local))
    assert again["generation"] == 2 and again["chunks_differing"] == 1
    assert again["target"]["chunks_written"] == 1  # this end, the target of the pull
    assert again["bytes_sent"] < 1 * MiB
    assert content(local, tmp_path) == data

    raw_remote = env.remote / "disk.raw"
    raw_remote.write_bytes(data)
    from_raw = env.ok(f"testhost:{raw_remote}", str(local))
    assert from_raw["chunks_differing"] == 0 and from_raw["bytes_sent"] < 1 * MiB

    # -v on a pull: what this end (the target) did; it does not pretend to know the source's
    verbose = env.push(f"testhost:{raw_remote}", str(local), "-v")
    assert verbose.returncode == 0, verbose.stderr
    assert f"target:   {local}: wrote 0 chunks, committed generation " in verbose.stdout
    assert "read:" not in verbose.stdout and "phases:" not in verbose.stdout


@pytest.mark.process
def test_encrypted_push_to_a_host_that_never_sees_the_key(env: Env, tmp_path: Path) -> None:
    """The serve end stores ciphertext and keyed digests: the remote file holds no
    plaintext and no source name; later pushes need the passphrase, not --encrypt; a pull
    out of an encrypted remote image is refused (the remote end would need the key)."""
    src = tmp_path / "secret-disk.img"
    size = 8 * MiB + 777
    data = disk(src, size)
    pw = tmp_path / "pw"
    pw.write_text("a passphrase of some length\n")
    keys = {"DISKRSYNC_STATE_DIR": str(tmp_path / "state"), "DISKRSYNC_KDF": "1024,1,1"}
    first = env.ok("--encrypt", "--passphrase-file", str(pw), str(src), env.rpath("enc.spgz"),
                   env=keys)
    assert first["generation"] == 1
    stored = (env.remote / "enc.spgz").read_bytes()
    assert data[size // 2 : size // 2 + 64] not in stored  # the text part
    assert b"secret-disk" not in stored
    data = patch(src, [3 * MiB])
    second = env.ok("--passphrase-file", str(pw), str(src), env.rpath("enc.spgz"), env=keys)
    assert second["generation"] == 2 and second["chunks_differing"] == 1
    res = cli("restore", "-q", "--passphrase-file", str(pw), str(env.remote / "enc.spgz"),
              str(tmp_path / "back"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "back").read_bytes() == data
    nokey = env.push(str(src), env.rpath("enc.spgz"), env=keys)
    assert nokey.returncode == 2 and "passphrase" in nokey.stderr
    pull = env.push("--passphrase-file", str(pw), env.rpath("enc.spgz"),
                    str(tmp_path / "pulled.spgz"), env=keys)
    assert pull.returncode == 2 and "needs its key" in pull.stderr, pull.stderr
    assert "Traceback" not in pull.stderr


@pytest.mark.process
def test_raw_target_no_compress_and_dry_run(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = disk(src, 8 * MiB, seed=1)
    raw = env.remote / "copy 'of' disk.raw"
    env.ok(str(src), env.rpath(raw.name), "--raw-target")
    assert raw.read_bytes() == data

    data = patch(src, [2 * MiB, 6 * MiB])
    image_before = sha(raw)
    dry = env.ok(str(src), env.rpath(raw.name), "--no-compress", "--dry-run")
    assert dry["dry_run"] and dry["chunks_differing"] == 2
    assert sha(raw) == image_before  # nothing written

    inc = env.ok(str(src), env.rpath(raw.name), "--no-compress")
    assert inc["chunks_differing"] == 2 and inc["bytes_sent"] < 1 * MiB
    assert raw.read_bytes() == data

    # dry runs of a push to an image and of a pull change nothing either
    env.ok(str(src), env.rpath("img.spgz"))
    image = env.remote / "img.spgz"
    patch(src, [3 * MiB])
    before = sha(image)
    dry = env.ok(str(src), env.rpath("img.spgz"), "-n")
    assert dry["chunks_differing"] == 1 and dry["generation"] is None
    assert sha(image) == before
    local = tmp_path / "local.raw"
    local.write_bytes(data)
    mine = patch(local, [7 * MiB])  # the image holds `data`: one chunk differs
    dry_pull = env.ok(env.rpath("img.spgz"), str(local), "--no-compress", "-n")
    assert dry_pull["dry_run"] and dry_pull["generation"] is None
    assert dry_pull["chunks_differing"] == 1  # counted by the remote source
    assert dry_pull["differing_ranges"] == [[7 * MiB, 128 * 1024]]
    assert local.read_bytes() == mine


# -- failures ---------------------------------------------------------------------------------


@pytest.fixture
def committed(env: Env, tmp_path: Path) -> tuple[Path, Path, str]:
    """A source and a remote image with one generation; returns (src, image, image sha)."""
    src = tmp_path / "src.img"
    disk(src, 2 * MiB, seed=2)
    env.ok(str(src), env.rpath("keep.spgz"))
    patch(src, [MiB])
    image = env.remote / "keep.spgz"
    return src, image, sha(image)


def _bad_config(env: Env, **extra: str) -> list[str]:
    cfg = env.srv.write_ssh_config(env.tmp / "bad_config", **extra)
    return ["-F", str(cfg)]


@pytest.mark.process
def test_connection_failures(env: Env, committed: tuple[Path, Path, str]) -> None:
    src, image, before = committed
    srv = env.srv
    known = {"UserKnownHostsFile": str(srv.known_hosts)}
    # connection refused
    res = env.push(str(src), env.rpath("keep.spgz"),
                   ssh=_bad_config(env, Port=str(free_port()), **known))
    failed(res, "connection refused")
    # unknown host name
    res = env.push(str(src), f"no-such-host.invalid:{image}", ssh=["-i", str(srv.client_key)])
    failed(res, "cannot resolve host name 'no-such-host.invalid'")
    # authentication failure: a key the server does not know
    stranger = make_key(env.tmp / "stranger")
    res = env.push(str(src), env.rpath("keep.spgz"),
                   ssh=_bad_config(env, IdentityFile=str(stranger), **known))
    failed(res, f"authentication as {srv.user}@127.0.0.1 failed", str(stranger), "-i KEY")
    # unknown host key: fingerprint and the flag that accepts it
    empty = env.tmp / "empty_known_hosts"
    res = env.push(str(src), env.rpath("keep.spgz"),
                   ssh=_bad_config(env, UserKnownHostsFile=str(empty)))
    fp = subprocess.run(["ssh-keygen", "-lf", f"{srv.host_key}.pub"], capture_output=True,
                        text=True, check=True).stdout.split()[1]
    failed(res, "unknown host key", fp, "--accept-new-host-key")
    # changed host key
    other = make_key(env.tmp / "other_host_key")
    wrong = srv.write_known_hosts(env.tmp / "wrong_known_hosts", key=other)
    res = env.push(str(src), env.rpath("keep.spgz"),
                   ssh=_bad_config(env, UserKnownHostsFile=str(wrong)))
    failed(res, "HOST KEY OF", "HAS CHANGED", fp, "ssh-keygen -R")
    # remote command missing (exit 127)
    res = env.push(str(src), env.rpath("keep.spgz"), cmd="/nonexistent/diskrsync")
    failed(res, "/nonexistent/diskrsync not found on testhost (exit 127)", "--remote-cmd")
    assert sha(image) == before
    # with --accept-new-host-key the unknown key is learnt and the push goes through
    fresh = env.tmp / "fresh_known_hosts"
    res = env.push(str(src), env.rpath("keep.spgz"), "--accept-new-host-key",
                   ssh=_bad_config(env, UserKnownHostsFile=str(fresh)))
    assert res.returncode == 0, res.stderr
    assert fresh.read_text().startswith(f"{srv.host_pattern} ssh-ed25519 ")


def _fake_remote(tmp: Path, name: str, script: str) -> str:
    tool = tmp / name
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    return str(tool)


@pytest.mark.process
def test_pull_of_a_missing_source_is_a_usage_error(env: Env, tmp_path: Path) -> None:
    """A pull whose remote source is missing, a directory or has no generation -g is the
    user's error (exit 2), as the same mistake for a local source or a remote target is; the
    remote end failed before speaking, so the puller saw a closed connection (exit 5)."""
    (env.remote / "adir").mkdir()
    (env.remote / "raw.img").write_bytes(b"x" * 4096)
    cases = {
        "missing.img": ([], "No such file or directory"),
        "adir": ([], "is a directory"),
        "raw.img": (["-g", "3"], "has no generation 3"),
    }
    for name, (extra, why) in cases.items():
        res = env.push(*extra, env.rpath(name), str(tmp_path / "x.spgz"))
        failed(res, "testhost:", why)
        assert res.returncode == 2, res.stderr
        assert not (tmp_path / "x.spgz").exists()


@pytest.mark.process
def test_foreign_or_other_version_remote(env: Env, committed: tuple[Path, Path, str]) -> None:
    src, image, before = committed
    cases = {
        # the original Go tool answers its own magic
        "go": ("printf BSNC0002; cat >/dev/null", ["original Go diskrsync", "--legacy"]),
        # ... or rejects `serve` as a usage error
        "go-usage": ("echo 'Usage: diskrsync [--ssh-flags=...] src dst' >&2; exit 2",
                     ["exited with status 2 before speaking the diskrsync protocol", "Usage:",
                      "--legacy"]),
        # a newer diskrsync: the decoder names both versions
        "newer": ("printf 'DRSYNC\\000\\011'; cat >/dev/null",
                  ["testhost:", "protocol version 9", "version 1"]),
    }
    for name, (script, needles) in cases.items():
        res = env.push(str(src), env.rpath("keep.spgz"),
                       cmd=_fake_remote(env.tmp, name, script))
        failed(res, *needles)
    assert sha(image) == before


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.process
def test_push_and_pull_with_bwlimit(env: Env, tmp_path: Path) -> None:
    """--bwlimit paces this end's channel both ways (tests/test_bwlimit.py counts the bytes
    against a fake clock); over SSH it only has to deliver the same result."""
    src = tmp_path / "src.img"
    data = os.urandom(MiB)
    src.write_bytes(data)
    image = env.remote / "limited.spgz"
    assert env.ok(str(src), f"testhost:{image}", "--bwlimit", "64M")["generation"] == 1
    assert content(image, tmp_path) == data
    pulled = tmp_path / "pulled.spgz"
    assert env.ok(f"testhost:{image}", str(pulled), "--bwlimit", "64M")["generation"] == 1
    assert content(pulled, tmp_path) == data


@pytest.mark.process
def test_remote_disk_full(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with tmpfs(env.remote / "small fs", "6m") as small:
        first = os.urandom(2 * MiB)
        src.write_bytes(first)
        env.ok(str(src), f"testhost:{small}/full.spgz")
        image = small / "full.spgz"
        src.write_bytes(os.urandom(16 * MiB))
        res = env.push(str(src), f"testhost:{small}/full.spgz")
        failed(res, "diskrsync: testhost: ", "no space left on device")
        assert res.returncode == 5
        assert content(image, tmp_path) == first
        assert [g["number"] for g in info(image)["generations"]] == [1]


@pytest.mark.process
def test_remote_first_push_that_will_not_fit_is_refused(env: Env, tmp_path: Path) -> None:
    """The server asks for the source's estimate (a first push) and refuses it before
    writing."""
    src = tmp_path / "src.img"
    with tmpfs(env.remote / "small fs", "2m") as small:
        src.write_bytes(os.urandom(4 * MiB))
        res = env.push(str(src), f"testhost:{small}/full.spgz")
        failed(res, "diskrsync: testhost: ", "not enough space for a first push into",
               "nothing was written")
        assert res.returncode == 5
        assert list(small.iterdir()) == []


def _serve_pids(srv: SshServer, what: str) -> list[int]:
    return [q.pid for q in srv.descendants() if "serve" in q.cmdline and what in q.cmdline]


def _wait_growth(path: Path, proc: subprocess.Popen[str], at_least: int) -> None:
    deadline = time.monotonic() + 120
    start = path.stat().st_size if path.exists() else 0
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= start + at_least:
            return
        if proc.poll() is not None:
            pytest.fail(f"push ended early: {proc.communicate()}")
        time.sleep(0.01)
    pytest.fail("the remote image did not grow")


@pytest.mark.process
def test_link_drop_keeps_checkpoint_and_resumes(env: Env, tmp_path: Path) -> None:
    srv = env.srv
    src = tmp_path / "big.img"
    size = 128 * MiB
    old = os.urandom(4 * MiB)
    src.write_bytes(old)
    image = env.remote / "big.spgz"
    env.ok(str(src), env.rpath("big.spgz"))
    new = os.urandom(size)
    src.write_bytes(new)
    args = (str(src), env.rpath("big.spgz"), "--checkpoint-interval", "1M")

    # 1. the remote serve process is killed once checkpoints exist
    proc = env.popen(*args)
    _wait_growth(image, proc, 16 * MiB)
    pids = _serve_pids(srv, "big.spgz")
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)  # did not hang
    failed(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
           "testhost", "killed by a signal")
    state = info(image)
    assert state["checkpoint"]
    assert [g["number"] for g in state["generations"]] == [1]
    assert content(image, tmp_path) == old

    # 2. the SSH session dies (network child killed): serve sees its stdin cut, saves a
    # checkpoint of everything received, and the client notices the dropped link at once.
    # No --checkpoint-interval here: only that final checkpoint can make step 3 cheap.
    # Keepalives far apart: the client must notice the closed link itself, within the guard.
    proc = env.popen(*args[:2], env={"DISKRSYNC_SSH_KEEPALIVE": "600,3"})
    _wait_growth(image, proc, 64 * MiB)
    session = [q.pid for q in srv.descendants() if q.comm == "sshd" and "@notty" in q.cmdline]
    assert session
    for pid in session:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)  # did not hang
    failed(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
           "lost connection to testhost")
    deadline = time.monotonic() + 60
    while _serve_pids(srv, "big.spgz") and time.monotonic() < deadline:
        time.sleep(0.05)  # the remote saves its checkpoint, then exits
    assert info(image)["checkpoint"]
    assert content(image, tmp_path) == old

    # 3. the next push resumes and sends only what is missing
    stats = env.ok(*args)
    assert stats["resumed"]
    assert stats["bytes_sent"] < size - 64 * MiB
    assert content(image, tmp_path) == new
    assert not info(image)["checkpoint"]


@pytest.mark.process
def test_silent_link_detected_by_keepalive(env: Env, tmp_path: Path) -> None:
    srv = env.srv
    src = tmp_path / "big.img"
    src.write_bytes(os.urandom(96 * MiB))
    image = env.remote / "silent.spgz"
    proc = env.popen(str(src), env.rpath("silent.spgz"), "--checkpoint-interval", "1M",
                     env={"DISKRSYNC_SSH_KEEPALIVE": "0.5,3"})
    _wait_growth(image, proc, 8 * MiB)
    # the remote host freezes: its sshd session and the serve process stop answering
    frozen = [q.pid for q in srv.descendants() if q.comm == "sshd" or "serve" in q.cmdline]
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        out, err = proc.communicate(timeout=60)  # did not hang: the keepalive gave up
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    failed(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
           "lost connection to testhost", "no response from testhost",
           "(3 keepalives unanswered)")  # DISKRSYNC_SSH_KEEPALIVE's count, not the default


@pytest.mark.process
def test_serve_timeout_frees_a_frozen_clients_lock(tmp_path: Path) -> None:
    """A client that says hello, sends two chunks and then nothing (frozen, or a dead link
    TCP has not noticed): serve --timeout 2 gives up with exit 5, keeps what arrived as a
    checkpoint and releases the image's writer lock, so the next push works."""

    src, image = tmp_path / "src.img", tmp_path / "img.spgz"
    data = disk(src, 4 * MiB, seed=5)
    assert cli("push", "-q", str(src), str(image)).returncode == 0
    src.write_bytes(os.urandom(4 * MiB))
    new = src.read_bytes()
    to_serve, from_serve = os.pipe(), os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "diskrsync.cli", "serve", "--target",
                             str(image), "--timeout", "2"],
                            stdin=to_serve[0], stdout=from_serve[1], stderr=subprocess.PIPE,
                            text=True)
    os.close(to_serve[0])
    os.close(from_serve[1])
    try:
        ch = FramedChannel(FdStream(from_serve[0], to_serve[1]))
        ch.send(p.Hello("source", len(new), 128 * 1024, 128, "frozen test",
                        {"hash": p.HASH, "caps": ["zstd"]}))
        cs = 128 * 1024
        for c in range(2):
            piece = new[c * cs : (c + 1) * cs]
            ch.send(p.Chunk(c, Kind.RAW, leaf_hash(piece), piece))
        _out, err = proc.communicate(timeout=60)  # generous: "did not hang"
    finally:
        os.close(from_serve[0])
        os.close(to_serve[1])
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5, err
    assert err.splitlines()[-1] == "diskrsync: no data from the peer for 2 s"
    state = info(image)
    assert state["checkpoint"] and [g["number"] for g in state["generations"]] == [1]
    assert content(image, tmp_path) == data
    res = cli("push", "--json", str(src), str(image))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["resumed"]
    assert content(image, tmp_path) == new


@pytest.mark.inproc
def test_alive_frames_keep_a_quiet_conversation_within_the_timeout() -> None:
    """Both ends with a 2 s timeout stay quiet for longer (a long scan of unchanged data):
    the Alive frames keep them connected, and neither end ever sees one."""

    a_to_b, b_to_a = os.pipe(), os.pipe()
    a = FramedChannel(FdStream(b_to_a[0], a_to_b[1], timeout=2))
    b = FramedChannel(FdStream(a_to_b[0], b_to_a[1], timeout=2))
    caps = {"hash": p.HASH, "caps": list(p.CAPABILITIES)}
    try:
        a.send(p.Hello("source", 0, 128 * 1024, 128, "a", caps))
        assert isinstance(b.recv(), p.Hello)
        b.send(p.Hello("target", 0, 128 * 1024, 128, "b", caps))
        assert isinstance(a.recv(), p.Hello)
        time.sleep(5)  # longer than the timeout: only Alive frames cross meanwhile
        a.send(p.NeedLeaves(7))
        assert b.recv() == p.NeedLeaves(7)
        b.send(p.Leaves(7, b""))
        assert a.recv() == p.Leaves(7, b"")
        a.close()
        assert b.recv() is None
    finally:
        b.close()
        for fd in (a_to_b[0], b_to_a[0]):
            os.close(fd)


@pytest.mark.inproc
def test_source_stops_when_the_target_closes_early(tmp_path: Path) -> None:
    """A target that answers hello and then goes away: the source stops scanning at once
    with a clear error, rather than reading the whole disk first."""
    import threading

    src = tmp_path / "src.img"
    with src.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))

    class Counting(RawSource):
        read_bytes = 0

        def read(self, offset: int, length: int) -> bytes:
            Counting.read_bytes += length
            time.sleep(0.002)  # a disk, not a page cache
            return super().read(offset, length)

    to_target, to_source = os.pipe(), os.pipe()

    def target() -> None:
        ch = FramedChannel(FdStream(to_target[0], to_source[1]))
        assert isinstance(ch.recv(), p.Hello)
        ch.send(p.Hello("target", 0, 128 * 1024, 128, "gone",
                        {"hash": p.HASH, "caps": ["zstd"]}))
        os.close(to_target[0])
        os.close(to_source[1])

    thread = threading.Thread(target=target)
    thread.start()
    reader = Counting(str(src))
    try:
        with pytest.raises(ConnectionClosed,
                           match=r"the peer closed the connection|before committing"):
            SourceSession(FramedChannel(FdStream(to_source[0], to_target[1])), reader,
                          SourceOptions()).run()
    finally:
        reader.close()
        thread.join(10)
        for fd in (to_source[0], to_target[1]):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert Counting.read_bytes < 32 * MiB


@pytest.mark.process
def test_client_timeout_when_the_serve_process_freezes(env: Env, tmp_path: Path) -> None:
    """The remote serve is stopped while its sshd still answers keepalives: push --timeout 2
    fails with a clear one-line error instead of waiting forever."""
    src = tmp_path / "big.img"
    src.write_bytes(os.urandom(64 * MiB))
    image = env.remote / "frozen.spgz"
    proc = env.popen(str(src), env.rpath("frozen.spgz"), "--timeout", "2")
    _wait_growth(image, proc, 4 * MiB)
    frozen = _serve_pids(env.srv, "frozen.spgz")
    assert frozen
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        out, err = proc.communicate(timeout=60)  # generous: "did not hang"
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
    last = failed(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                  "testhost")
    assert proc.returncode == 5
    assert "for 2 s" in last, last


@pytest.mark.process
def test_serve_timeout_ends_a_frozen_clients_push(env: Env, tmp_path: Path) -> None:
    """The client is SIGSTOPped mid-push (its sshd session lives on): the forced command's
    serve --timeout 2 exits, keeping a checkpoint and freeing the lock; the client, once
    continued, reports the server's reason; the next push resumes."""
    srv = env.srv
    backups = env.remote / "backups"
    backups.mkdir()
    forced = f"{remote_cmd()} serve --restrict-to {shlex.quote(str(backups))} --timeout 2"
    srv.set_authorized_keys(f'command="{forced.replace(chr(34), chr(92) + chr(34))}",restrict')
    src = tmp_path / "big.img"
    src.write_bytes(os.urandom(64 * MiB))
    image = backups / "big.spgz"
    try:
        proc = env.popen(str(src), f"testhost:{image}", "--checkpoint-interval", "1M")
        _wait_growth(image, proc, 4 * MiB)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60  # generous: "did not hang"
            while _serve_pids(srv, "--timeout 2") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _serve_pids(srv, "--timeout 2")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
        failed(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
               "testhost: no data from the peer for 2 s")
        assert proc.returncode == 5
        assert info(image)["checkpoint"]
        stats = env.ok(str(src), f"testhost:{image}")
        assert stats["resumed"]
        assert content(image, tmp_path) == src.read_bytes()
    finally:
        srv.set_authorized_keys()


# -- restricted forced command ----------------------------------------------------------------


@pytest.mark.process
def test_restricted_forced_command(env: Env, tmp_path: Path) -> None:
    srv = env.srv
    backups = env.remote / "backups"
    backups.mkdir()
    outside = env.remote / "elsewhere"
    outside.mkdir()
    (backups / "link").symlink_to(outside)
    (backups / "dangling.spgz").symlink_to(outside / "new.spgz")
    forced = f"{remote_cmd()} serve --restrict-to {shlex.quote(str(backups))} --write-only"
    src = tmp_path / "src.img"
    data = disk(src, 4 * MiB, seed=3)
    srv.set_authorized_keys(f'command="{forced.replace(chr(34), chr(92) + chr(34))}",restrict')
    try:
        # allowed: a file under DIR, then a directory (DIR/<name of SRC>.spgz)
        env.ok(str(src), f"testhost:{backups}/web1.spgz", "--keep", "3")
        assert content(backups / "web1.spgz", tmp_path) == data
        env.ok(str(src), f"testhost:{backups}/")
        assert (backups / "src.img.spgz").exists()
        refusals = {
            f"{outside}/x.spgz": "is outside",
            f"{backups}/../escape.spgz": "is outside",
            f"{backups}/link/x.spgz": "is outside",
            f"{backups}/dangling.spgz": "is outside",
        }
        for path, why in refusals.items():
            res = env.push(str(src), f"testhost:{path}")
            failed(res, "diskrsync: testhost: refused:", why, str(backups))
        res = env.push(f"testhost:{backups}/web1.spgz", str(tmp_path / "stolen.spgz"))
        failed(res, "refused: this key is write-only")
        assert not list(outside.iterdir())
        assert not (tmp_path / "stolen.spgz").exists()
        assert not (env.remote / "escape.spgz").exists()

        # without --write-only the key may also pull, still only from under DIR
        forced = forced.removesuffix(" --write-only")
        srv.set_authorized_keys(f'command="{forced.replace(chr(34), chr(92) + chr(34))}"'
                                f',restrict')
        env.ok(f"testhost:{backups}/web1.spgz", str(tmp_path / "restored.spgz"))
        assert content(tmp_path / "restored.spgz", tmp_path) == data
        (outside / "secret.raw").write_bytes(b"secret" * 1000)
        res = env.push(f"testhost:{outside}/secret.raw", str(tmp_path / "secret.spgz"))
        failed(res, "refused:", "is outside")
    finally:
        srv.set_authorized_keys()


@pytest.mark.parametrize("policy", [["--keep", "4"], ["--append-only"]],
                         ids=["keep-floor", "append-only"])
@pytest.mark.process
def test_restricted_key_cannot_shrink_history(env: Env, tmp_path: Path,
                                              policy: list[str]) -> None:
    """A stolen write-only key pushing zeros with --keep 1 (ransomware) adds a generation;
    with the server's --keep floor or --append-only it cannot prune the good ones, nor
    overwrite the image in place with --no-compress."""
    srv = env.srv
    backups = env.remote / "backups"
    backups.mkdir()
    forced = (f"{remote_cmd()} serve --restrict-to {shlex.quote(str(backups))} --write-only "
              f"{' '.join(policy)}")
    srv.set_authorized_keys(f'command="{forced.replace(chr(34), chr(92) + chr(34))}",restrict')
    src = tmp_path / "src.img"
    image = backups / "web1.spgz"
    dst = f"testhost:{image}"
    try:
        good = [disk(src, 2 * MiB, seed=seed) for seed in range(3)]
        for data in good:
            src.write_bytes(data)
            env.ok(str(src), dst, "--keep", "3")
        src.write_bytes(bytes(2 * MiB))
        res = env.push(str(src), dst, "--keep", "1")
        assert res.returncode == 0, res.stderr
        assert "testhost: diskrsync: note: this server keeps" in res.stderr
        gens = [g["number"] for g in info(image)["generations"]]
        assert gens == [1, 2, 3, 4]
        for number, data in zip(gens, good, strict=False):
            assert content(image, tmp_path, number) == data
        failed(env.push(str(src), dst, "--raw-target"), "refused:", "--raw-target")
        assert [g["number"] for g in info(image)["generations"]] == gens
    finally:
        srv.set_authorized_keys()


# The server side of a restricted push, with a swap made between the path check (the plan,
# before the client's Hello) and the open (after it): deterministic, no timing involved.
_SWAP_SERVE = """
import json, os, sys
from diskrsync.cli.main import _run, build_parser
from diskrsync.cli.serve import _plan_restricted, _serve_restricted
root, swaps = sys.argv[1], json.loads(sys.argv[2])
args = build_parser().parse_args(["serve", "--restrict-to", root, "--write-only"])
def main():
    plan = _plan_restricted(args)
    for kind, a, b in swaps:
        os.rename(a, b) if kind == "rename" else os.symlink(a, b)
    return _serve_restricted(*plan)
sys.exit(_run(main))
"""


def _push_with_swap(tmp: Path, root: Path, request: str, swaps: list[tuple[str, str, str]],
                    data: bytes, options: str = "") -> tuple[int, str]:
    """Push ``data`` through a restricted serve of ``root`` asked for ``request``; returns
    the serve's exit status and stderr."""

    src = tmp / "src.img"
    src.write_bytes(data)
    to_serve, from_serve = os.pipe(), os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SWAP_SERVE, str(root), json.dumps(swaps)],
        stdin=to_serve[0], stdout=from_serve[1], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SSH_ORIGINAL_COMMAND": f"diskrsync serve --target "
                                                   f"{shlex.quote(request)} {options}"})
    os.close(to_serve[0])
    os.close(from_serve[1])
    try:
        with contextlib.suppress(DiskrsyncError):
            serve_source(FramedChannel(FdStream(from_serve[0], to_serve[1])), str(src), None,
                         SourceOptions())
    finally:
        os.close(from_serve[0])
        with contextlib.suppress(OSError):
            os.close(to_serve[1])
        _out, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.process
def test_restricted_ancestor_swapped_for_a_symlink_stays_beneath(tmp_path: Path) -> None:
    """DIR/sub is checked, then swapped for a symlink to outside before the open: the push
    lands in the directory that was checked (held open), nothing outside."""
    root, outside = tmp_path / "backups", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    data = os.urandom(MiB)
    rc, err = _push_with_swap(tmp_path, root, f"{root}/sub/web1.spgz",
                              [("rename", f"{root}/sub", f"{root}/sub.old"),
                               ("symlink", str(outside), f"{root}/sub")], data)
    assert rc == 0, err
    assert list(outside.iterdir()) == []
    assert content(root / "sub.old" / "web1.spgz", tmp_path) == data


@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
@pytest.mark.process
def test_restricted_final_symlink_is_refused(tmp_path: Path, raw: bool) -> None:
    """The image's own name becomes a symlink to a file outside after the check: refused
    (exit 2), the file outside untouched."""
    root, outside = tmp_path / "backups", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    victim = outside / ("secret.raw" if raw else "other.spgz")
    if raw:
        victim.write_bytes(b"secret" * 1000)
    else:
        (tmp_path / "other.img").write_bytes(os.urandom(MiB))
        assert cli("push", "-q", str(tmp_path / "other.img"), str(victim)).returncode == 0
    before = victim.read_bytes()
    request = f"{root}/web1.{'raw' if raw else 'spgz'}"
    rc, err = _push_with_swap(tmp_path, root, request, [("symlink", str(victim), request)],
                              os.urandom(MiB), "--no-compress" if raw else "")
    assert rc == 2, err
    assert "refused:" in err and "symbolic link" in err
    assert victim.read_bytes() == before
    assert sorted(outside.iterdir()) == [victim]


@pytest.mark.parametrize("raw", [False, True], ids=["image", "raw"])
@pytest.mark.process
def test_nofollow_store_refuses_a_final_symlink(tmp_path: Path, raw: bool) -> None:
    """The last line of defence when the symlink appears after the serve's own check: the
    stores open the final component with O_NOFOLLOW."""

    victim = tmp_path / "victim"
    if raw:
        victim.write_bytes(b"secret")
    else:
        (tmp_path / "v.img").write_bytes(os.urandom(MiB))
        assert cli("push", "-q", str(tmp_path / "v.img"), str(victim)).returncode == 0
    before = victim.read_bytes()
    link = tmp_path / "link"
    link.symlink_to(victim)
    hello = p.Hello("source", MiB, 128 * 1024, 64, "test", {"hash": p.HASH})
    with pytest.raises(UsageError, match="symbolic links"):
        open_store(str(link), hello, TargetOptions(nofollow=True), raw=raw).close()
    assert victim.read_bytes() == before


@pytest.mark.pure
def test_retention_policy_over_a_client_request(capsys: pytest.CaptureFixture[str]) -> None:
    """Clients may ask to keep more than the server's floor, never less; append-only keeps
    everything; either refuses a raw target (no history)."""

    def keep(client: int, **policy: Any) -> int:
        req = _parse_request(f"diskrsync serve --target /b/x.spgz --keep {client}")
        apply_retention(req, **policy)
        return int(req.keep)

    assert keep(1, floor=None, append_only=False) == 1
    assert keep(1, floor=3, append_only=False) == 3
    assert keep(9, floor=3, append_only=False) == 9
    assert keep(9, floor=3, append_only=True) == KEEP_ALL
    assert "--keep-last 9 is ignored" in capsys.readouterr().err
    raw = _parse_request("diskrsync serve --target /b/x.raw --no-compress")
    apply_retention(raw, floor=None, append_only=False)
    for policy in ({"floor": 2, "append_only": False}, {"floor": None, "append_only": True}):
        with pytest.raises(UsageError, match=r"refused: .*--raw-target"):
            apply_retention(raw, **policy)
    with pytest.raises(UsageError, match="at least 1"):
        keep(2, floor=0, append_only=False)


@pytest.mark.pure
def test_restricted_request_parsing() -> None:
    ns = _parse_request("'/opt/x y/diskrsync' serve --target '/srv/b/a b.spgz' --keep=3 -n "
                        "--chunk-size 64K --checkpoint-interval 1M --no-compress")
    assert ns.target == "/srv/b/a b.spgz" and ns.keep == 3 and ns.dry_run
    assert ns.chunk_size == 64 * 1024 and ns.checkpoint_interval == MiB and ns.no_compress
    ns = _parse_request("diskrsync serve --source /srv/b/x.spgz -g 4")
    assert ns.source == "/srv/b/x.spgz" and ns.generation == 4 and ns.target is None
    # the real serve parser reads the request: same values, same defaults as a command line
    words = ["--target", "/b/x.spgz", "--chunk-size", "1M", "--ignore-read-errors"]
    ns, real = _parse_request(shlex.join(["diskrsync", "serve", *words])), \
        build_parser().parse_args(["serve", *words])
    for name in ("target", "chunk_size", "ignore_read_errors", "dry_run", "no_compress",
                 "generation", "checkpoint_interval"):
        assert getattr(ns, name) == getattr(real, name), name

    for bad in ["rm -rf /", "diskrsync serve", "diskrsync serve --target a --source b",
                "diskrsync serve --target a --restrict-to /", "diskrsync serve --target",
                "diskrsync serve --target a --keep x", "diskrsync serve --target 'a"]:
        with pytest.raises(UsageError, match="refused"):
            _parse_request(bad)


@pytest.mark.process
def test_refusal_is_a_protocol_error_frame(tmp_path: Path) -> None:
    """Without the client's bytes: serve --restrict-to answers a bad request with an Error
    frame on stdout (what the waiting client decodes) and one line on stderr."""
    res = subprocess.run(
        [sys.executable, "-m", "diskrsync.cli", "serve", "--restrict-to", str(tmp_path)],
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
        env={**os.environ, "SSH_ORIGINAL_COMMAND": "diskrsync serve --target /etc/x.spgz"})
    assert res.returncode == 2
    dec = p.Decoder()
    dec.feed(res.stdout)
    msg = dec.next()
    assert isinstance(msg, p.Error) and "refused: /etc/x.spgz is outside" in msg.message
    assert res.stderr.decode().count("\n") == 1


@pytest.mark.process
def test_restricted_name_too_long_is_a_refusal(tmp_path: Path) -> None:
    """A client's image name longer than the file system allows (ENAMETOOLONG from the
    symlink check) is one refusal line and exit 2; it was a traceback on the server."""
    long_name = "a" * 300 + ".spgz"
    res = subprocess.run(
        [sys.executable, "-m", "diskrsync.cli", "serve", "--restrict-to", str(tmp_path),
         "--write-only"],
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
        env={**os.environ, "SSH_ORIGINAL_COMMAND": f"diskrsync serve --target "
                                                   f"{tmp_path}/{long_name}"})
    assert res.returncode == 2, res.stderr
    assert b"Traceback" not in res.stderr
    dec = p.Decoder()
    dec.feed(res.stdout)
    msg = dec.next()
    assert isinstance(msg, p.Error) and "refused:" in msg.message
    assert "File name too long" in msg.message
    assert res.stderr.decode().count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.process
def test_serve_help_states_serves_own_defaults() -> None:
    """An administrator writing a forced command reads ``serve --help``: it said --timeout
    defaults to 0 (never), while serve's default is 600 s."""
    res = subprocess.run([sys.executable, "-m", "diskrsync.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=30, env={**os.environ,
                                                                          "COLUMNS": "200"})
    assert res.returncode == 0
    assert "(default 600; 0: never)" in res.stdout
    assert "default 0: never" not in res.stdout
    assert "never fewer" in res.stdout


@pytest.mark.inproc
def test_ssh_options_from_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    args = argparse.Namespace(identity=["k1", "k2"], ssh_config="/x/cfg",
                              accept_new_host_key=True,
                              remote_cmd="sudo -n '/opt/my tools/diskrsync'")
    monkeypatch.setenv("DISKRSYNC_SSH_KEEPALIVE", "0.5,3")
    opts, extra = ssh_options(args)
    assert opts.remote_cmd == "sudo" and extra == ["-n", "/opt/my tools/diskrsync"]
    assert opts.identity_files == (Path("k1"), Path("k2")) and opts.ssh_config == Path("/x/cfg")
    assert opts.accept_new_host_key
    assert (opts.keepalive_interval, opts.keepalive_count) == (0.5, 3)
    monkeypatch.setenv("DISKRSYNC_SSH_KEEPALIVE", "fast")
    with pytest.raises(UsageError, match="INTERVAL,COUNT"):
        ssh_options(args)
