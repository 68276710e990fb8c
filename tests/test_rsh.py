"""``--rsh 'ssh ...'``: the remote end through the system's OpenSSH client instead of paramiko.

The command line is built as OpenSSH expects it (pure tests); then real pushes and pulls go
through the real ``ssh`` against the suite's sshd (tests/support/sshd.py), with an ssh_config
that only the external client reads (HOME is private and diskrsync is not given ``-F``), so
a success proves the external client carried the session. Failures of ssh itself come back
as the built-in client's one-line errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.sshd import SshServer, free_port, make_key

from diskrsync.base.errors import UsageError
from diskrsync.synccore.location import RemotePath
from diskrsync.synccore.ssh.config import SshOptions
from diskrsync.synccore.ssh.errors import (
    AuthError,
    ConnectError,
    HostKeyChangedError,
    LinkError,
    UnknownHostKeyError,
)
from diskrsync.synccore.ssh.external import classify_ssh_failure, rsh_argv

REPO = Path(__file__).resolve().parents[1]
DISKRSYNC = REPO / ".venv" / "bin" / "diskrsync"
SSH = shutil.which("ssh")
needs_ssh = pytest.mark.skipif(SSH is None, reason="no OpenSSH client")
MiB = 1 << 20


# -- the command line ----------------------------------------------------------------------


@pytest.mark.pure
def test_argv_appends_user_port_host_and_one_quoted_command() -> None:
    remote = RemotePath("backup", "vault", 2222, "/srv/a b.spgz")
    argv = rsh_argv(("ssh", "-o", "ControlMaster=auto"), remote, SshOptions(remote_cmd="diskrsync"),
                    ["serve", "--target", "/srv/a b.spgz"])
    assert argv == ["ssh", "-o", "ControlMaster=auto", "-l", "backup", "-p", "2222", "vault",
                    "diskrsync serve --target '/srv/a b.spgz'"]


@pytest.mark.pure
def test_argv_passes_explicit_ssh_options_on() -> None:
    opts = SshOptions(identity_files=(Path("/k/id"),), ssh_config=Path("/etc/cfg"),
                      accept_new_host_key=True, remote_cmd="/opt/d r/diskrsync")
    argv = rsh_argv(("ssh",), RemotePath(None, "h", None, "p"), opts, ["serve"])
    assert argv == ["ssh", "-i", "/k/id", "-F", "/etc/cfg", "-o",
                    "StrictHostKeyChecking=accept-new", "h", "'/opt/d r/diskrsync' serve"]
    # the default config is left to ssh itself; none at all stays none
    assert "-F" not in rsh_argv(("ssh",), RemotePath(None, "h", None, "p"), SshOptions(), [])
    none = rsh_argv(("ssh",), RemotePath(None, "h", None, "p"), SshOptions(ssh_config=None), [])
    assert none[1:3] == ["-F", "none"]


@pytest.mark.pure
def test_argv_refuses_a_host_that_would_be_an_option() -> None:
    with pytest.raises(UsageError, match="bad host name"):
        rsh_argv(("ssh",), RemotePath(None, "-oProxyCommand=x", None, "p"), SshOptions(), [])


# -- ssh's own failure lines (as OpenSSH 9 prints them) --------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize(("lines", "kind", "needle"), [
    (["ssh: connect to host 10.0.0.1 port 22: Connection refused"], ConnectError,
     "cannot connect to 10.0.0.1 port 22: connection refused"),
    (["ssh: connect to host vault port 22: Connection timed out"], ConnectError,
     "cannot connect to vault port 22: connection timed out"),
    (["ssh: Could not resolve hostname vaullt: Name or service not known"], ConnectError,
     "cannot resolve host name 'vaullt'"),
    (["backup@vault: Permission denied (publickey)."], AuthError,
     "authentication as backup@vault failed"),
    (["No ED25519 host key is known for vault and you have requested strict checking.",
      "Host key verification failed."], UnknownHostKeyError, "--accept-new-host-key"),
    (["@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
      "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
      "Add correct host key in /root/.ssh/known_hosts to get rid of this message.",
      "Offending ED25519 key in /root/.ssh/known_hosts:3",
      "  remove with:",
      '  ssh-keygen -f "/root/.ssh/known_hosts" -R "vault"',
      "Host key verification failed."], HostKeyChangedError, "known_hosts:3"),
    (["Timeout, server vault not responding."], LinkError, "no response from vault"),
    (["Connection to vault closed by remote host."], LinkError, "lost connection to vault"),
])
def test_ssh_failures_become_the_built_in_clients_errors(lines: list[str], kind: type,
                                                           needle: str) -> None:
    err = classify_ssh_failure("vault", lines)
    assert type(err) is kind
    assert needle in str(err)
    assert "\n" not in str(err)


@pytest.mark.pure
def test_unknown_lines_are_not_classified() -> None:
    assert classify_ssh_failure("vault", ["usage: something", "bash: x: command not found"]) \
        is None


# -- through the real ssh against a real sshd -----------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer(tmp_path_factory.mktemp("sshd")) as s:
        s.write_known_hosts()
        yield s


class Env:
    """A private HOME without ssh settings; ``cfg`` is an ssh_config only ``--rsh`` reads."""

    def __init__(self, srv: SshServer, tmp: Path) -> None:
        self.srv, self.tmp = srv, tmp
        self.home = tmp / "home"
        (self.home / ".ssh").mkdir(parents=True)
        self.cfg = srv.write_ssh_config(tmp / "ssh_config", alias="viassh",
                                        UserKnownHostsFile=str(srv.known_hosts),
                                        BatchMode="yes")
        self.env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        self.env["HOME"] = str(self.home)

    def run(self, *args: str, rsh: str | None = None) -> subprocess.CompletedProcess[str]:
        rsh = rsh if rsh is not None else f"ssh -F {self.cfg}"
        argv = [sys.executable, "-m", "diskrsync.cli", "push", *args, "--rsh", rsh,
                "--remote-cmd", str(DISKRSYNC)]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env,
                              cwd=self.tmp, timeout=120)

    def ok(self, *args: str, **kw: Any) -> dict[str, Any]:
        res = self.run(*args, "--json", **kw)
        assert res.returncode == 0, res.stderr
        stats: dict[str, Any] = json.loads(res.stdout)
        return stats


@pytest.fixture
def env(srv: SshServer, tmp_path: Path) -> Env:
    return Env(srv, tmp_path)


def one_line_failure(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("diskrsync: "), res.stderr
    assert sum(ln.startswith("diskrsync: ") for ln in res.stderr.splitlines()) == 1, res.stderr
    for n in needles:
        assert n in last, last
    return last


def content(image: Path, tmp: Path) -> bytes:
    out = tmp / "restored"
    res = subprocess.run([sys.executable, "-m", "diskrsync.cli", "restore", str(image),
                          str(out), "-q", "--force"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


@needs_ssh
@pytest.mark.ssh
@pytest.mark.process
def test_push_and_pull_through_the_system_ssh(env: Env, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB) + bytes(MiB)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    remote = tmp_path / "remote dir"
    remote.mkdir()
    # "viassh" exists only in the config the external ssh reads: the built-in client
    # could not even resolve it
    first = env.ok(str(src), f"viassh:{remote}/disk.spgz")
    assert first["generation"] == 1 and first["bytes_sent"] > 3 * MiB
    assert content(remote / "disk.spgz", tmp_path) == data
    again = env.ok(str(src), f"viassh:{remote}/disk.spgz")
    assert again["generation"] == 1 and again["unchanged"] and again["chunks_differing"] == 0
    pulled = env.ok(f"viassh:{remote}/disk.spgz", str(tmp_path / "pulled.spgz"))
    assert pulled["generation"] == 1 and pulled["bytes_sent"] > 3 * MiB
    assert content(tmp_path / "pulled.spgz", tmp_path) == data
    # a pull's generation names the host it came from; --label names what the user says
    assert sources(tmp_path / "pulled.spgz") == [f"viassh:{remote}/disk.spgz (generation 1)"]
    env.ok(f"viassh:{remote}/disk.spgz", str(tmp_path / "pulled.spgz"), "--label",
           "web1:/dev/vg0/root", "--always-new-generation")  # (unchanged: no new one else)
    assert sources(tmp_path / "pulled.spgz")[-1] == "web1:/dev/vg0/root"


def sources(image: Path) -> list[str]:
    res = subprocess.run([sys.executable, "-m", "diskrsync.cli", "info", "--json", str(image)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [g["source"] for g in json.loads(res.stdout)["generations"]]


@needs_ssh
@pytest.mark.ssh
@pytest.mark.process
def test_user_port_and_options_reach_ssh(env: Env, srv: SshServer, tmp_path: Path) -> None:
    """An ssh:// URL's user and port become -l and -p; -i and --accept-new-host-key become
    ssh's options (ssh's own known_hosts here starts empty: accept-new fills it)."""
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(MiB))
    known = tmp_path / "fresh_known_hosts"
    rsh = f"ssh -F none -o BatchMode=yes -o IdentitiesOnly=yes -o UserKnownHostsFile={known}"
    url = f"ssh://{srv.user}@{srv.host}:{srv.port}{tmp_path}/u.spgz"
    res = env.run(str(src), url, "-i", str(srv.client_key), rsh=rsh)
    one_line_failure(res, 5, "host key", "--accept-new-host-key")
    stats = env.ok(str(src), url, "-i", str(srv.client_key), "--accept-new-host-key", rsh=rsh)
    assert stats["generation"] == 1
    assert f"[{srv.host}]:{srv.port}" in known.read_text()


@needs_ssh
@pytest.mark.ssh
@pytest.mark.process
def test_control_master_connection_is_reused(env: Env, srv: SshServer,
                                             tmp_path: Path) -> None:
    """The point of --rsh: OpenSSH features such as ControlMaster. The second push runs
    over the first one's master connection (no new SSH session at the server)."""
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(MiB))
    control = tmp_path / "cm"
    rsh = (f"ssh -F {env.cfg} -o ControlMaster=auto -o ControlPath={control} "
           f"-o ControlPersist=120")
    try:
        assert env.ok(str(src), f"viassh:{tmp_path}/c.spgz", rsh=rsh)["generation"] == 1
        check = subprocess.run([SSH or "ssh", "-F", str(env.cfg), "-o",
                                f"ControlPath={control}", "-O", "check", "viassh"],
                               capture_output=True, text=True, env=env.env, timeout=30)
        assert check.returncode == 0, check.stderr  # the master outlived the push
        logins = srv.log.read_text().count("Accepted publickey")
        assert env.ok(str(src), f"viassh:{tmp_path}/c.spgz", rsh=rsh)["unchanged"]
        # no new login at the server: the master's connection carried the second push
        assert srv.log.read_text().count("Accepted publickey") == logins
    finally:
        subprocess.run([SSH or "ssh", "-F", str(env.cfg), "-o", f"ControlPath={control}",
                        "-O", "exit", "viassh"], capture_output=True, env=env.env, timeout=30)


@needs_ssh
@pytest.mark.ssh
@pytest.mark.process
def test_legacy_push_through_the_system_ssh(env: Env, tmp_path: Path) -> None:
    """--legacy uses the same wrapper: our own Go-protocol end stands in for the Go tool."""
    data = os.urandom(MiB)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    res = env.run("--legacy", "-q", str(src), f"viassh:{tmp_path}/go.raw", "--no-compress")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "go.raw").read_bytes() == data


@needs_ssh
@pytest.mark.ssh
@pytest.mark.process
def test_failures_are_explained_in_one_line(env: Env, srv: SshServer, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(b"x" * 100_000)
    dst = f"viassh:{tmp_path}/f.spgz"
    one_line_failure(env.run(str(src), dst, rsh=f"ssh -F {env.cfg} -p {free_port()}"), 5,
                     "cannot connect to", "connection refused")
    one_line_failure(env.run(str(src), "nosuch.invalid:/x", rsh=f"ssh -F {env.cfg}"), 5,
                     "cannot resolve host name")
    one_line_failure(env.run(str(src), dst, rsh=f"ssh -F {env.cfg} -o User=nobody-here"), 5,
                     "authentication as nobody-here@")
    strict = f"ssh -F {env.cfg} -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"
    one_line_failure(env.run(str(src), dst, rsh=strict), 5, "unknown host key for viassh")
    changed = tmp_path / "changed_known_hosts"
    srv.write_known_hosts(changed, key=make_key(tmp_path / "other_host_key"))
    one_line_failure(env.run(str(src), dst, rsh=f"ssh -F {env.cfg} -o UserKnownHostsFile="
                             f"{changed}"), 5, "HAS CHANGED", "changed_known_hosts:1")
    res = subprocess.run([sys.executable, "-m", "diskrsync.cli", "push", str(src), dst,
                          "--rsh", f"ssh -F {env.cfg}", "--remote-cmd", "no-such-diskrsync"],
                         capture_output=True, text=True, env=env.env, timeout=60)
    one_line_failure(res, 5, "no-such-diskrsync not found on viassh (exit 127)")
    one_line_failure(env.run(str(src), dst, rsh="no-such-ssh-program"), 2,
                     "cannot run no-such-ssh-program")
    one_line_failure(env.run(str(src), dst, rsh="'unbalanced"), 2, "bad --rsh")
    assert not (tmp_path / "f.spgz").exists()
