"""SSH transport: location parsing (pure) and the byte pipe against a real OpenSSH sshd."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.sshd import SSH_KEYGEN, SshServer, free_port, make_key, public_line

from diskrsync.base.errors import PeerError, UsageError
from diskrsync.cli.requests import ssh_options
from diskrsync.synccore.location import LocalPath, RemotePath, parse_location
from diskrsync.synccore.ssh.config import DEFAULT_SSH_CONFIG, SshOptions, load_config, resolve
from diskrsync.synccore.ssh.connection import SshConnection, connect
from diskrsync.synccore.ssh.errors import (
    EXIT_NOT_FOUND,
    AuthError,
    ConnectError,
    HostKeyChangedError,
    LinkError,
    RemoteCommandError,
    UnknownHostKeyError,
)
from diskrsync.synccore.ssh.known_hosts import _host_matches
from diskrsync.synccore.ssh.process import RemoteProcess, remote_command_line

MiB = 1024 * 1024
T = TypeVar("T")

# --------------------------------------------------------------------------------------
# Location parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("disk.img", LocalPath("disk.img")),
        ("/dev/sda", LocalPath("/dev/sda")),
        ("./a:b", LocalPath("./a:b")),
        ("/abs:x", LocalPath("/abs:x")),
        ("dir/a:b", LocalPath("dir/a:b")),
        (":foo", LocalPath(":foo")),
        ("host:img.spgz", RemotePath(None, "host", None, "img.spgz")),
        ("host:/srv/x.spgz", RemotePath(None, "host", None, "/srv/x.spgz")),
        ("backup@host:/srv/x", RemotePath("backup", "host", None, "/srv/x")),
        ("host:a:b", RemotePath(None, "host", None, "a:b")),
        ("host:~/x", RemotePath(None, "host", None, "x")),
        ("host:with space/x", RemotePath(None, "host", None, "with space/x")),
        ("[::1]:/x", RemotePath(None, "::1", None, "/x")),
        ("u@[fe80::1]:x", RemotePath("u", "fe80::1", None, "x")),
        ("ssh://host/srv/x.spgz", RemotePath(None, "host", None, "/srv/x.spgz")),
        ("ssh://host:2222/srv/x", RemotePath(None, "host", 2222, "/srv/x")),
        ("ssh://backup@[::1]:2222/srv/x.spgz", RemotePath("backup", "::1", 2222, "/srv/x.spgz")),
        ("ssh://[::1]/x", RemotePath(None, "::1", None, "/x")),
        ("ssh://h/~/rel/x", RemotePath(None, "h", None, "rel/x")),
        ("ssh://h/~bob/x", RemotePath(None, "h", None, "~bob/x")),
        ("ssh://u@h:22//double", RemotePath("u", "h", 22, "//double")),
    ],
)
@pytest.mark.inproc
def test_parse_location_table(text: str, expected: object) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host:",
        "host:~/",
        "@host:x",
        "ssh://host",
        "ssh://host/",
        "ssh://host:port/x",
        "ssh://host:0/x",
        "ssh://host:65536/x",
        "ssh://[::1/x",
        "ssh://[::1]x/y",
        "ssh:///x",
        "-oProxyCommand=evil:x",
        "[notv6]:x",
    ],
)
@pytest.mark.inproc
def test_parse_location_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_location(text)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_hostname = st.lists(_label, min_size=1, max_size=3).map(".".join)
_ipv6 = st.ip_addresses(v=6).map(str)
_user = st.from_regex(r"[a-z_][a-z0-9_.-]{0,15}", fullmatch=True)
_path = st.text(
    st.characters(exclude_characters="\0", exclude_categories=["Cs"]), min_size=1
).filter(lambda p: not p.startswith("~/"))


@given(
    user=st.none() | _user,
    host=_hostname | _ipv6,
    port=st.none() | st.integers(1, 65535),
    path=_path,
)
@pytest.mark.inproc
def test_remote_path_round_trip(user: str | None, host: str, port: int | None, path: str) -> None:
    loc = RemotePath(user, host, port, path)
    assert parse_location(str(loc)) == loc


@given(st.sampled_from(["/", "./", "../"]), _path)
@pytest.mark.inproc
def test_paths_with_a_slash_before_any_colon_are_local(prefix: str, rest: str) -> None:
    assert parse_location(prefix + rest) == LocalPath(prefix + rest)


@given(st.lists(st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]))))
@pytest.mark.inproc
def test_command_line_quotes_every_word(argv: list[str]) -> None:
    line = remote_command_line("/opt/my tools/diskrsync", argv)
    assert shlex.split(line) == ["/opt/my tools/diskrsync", *argv]


@pytest.mark.inproc
def test_known_hosts_patterns() -> None:
    from paramiko import HostKeys

    assert _host_matches("[127.0.0.1]:2222", "[127.0.0.1]:2222")
    assert not _host_matches("[127.0.0.1]:2222", "[127.0.0.1]:2223")
    assert not _host_matches("[127.0.0.1]:2222", "1")  # brackets are not a char class
    assert _host_matches("a.example,b.example", "b.example")
    assert _host_matches("*.example", "x.example")
    assert _host_matches("host?", "host1")
    assert not _host_matches("*.example,!bad.example", "bad.example")
    assert _host_matches("A.Example", "a.example")
    hashed = HostKeys.hash_host("[h]:22")
    assert _host_matches(hashed, "[h]:22")
    assert not _host_matches(hashed, "[h]:23")


# --------------------------------------------------------------------------------------
# Against a real sshd


@pytest.fixture(autouse=True)
def _hermetic_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may see the developer's ~/.ssh or ssh-agent."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[SshServer]:
    with SshServer(tmp_path / "sshd") as server:
        server.write_known_hosts()
        yield server


def options(srv: SshServer, **kw: object) -> SshOptions:
    base = SshOptions(
        identity_files=(srv.client_key,),
        ssh_config=None,
        known_hosts=srv.known_hosts,
        use_agent=False,
        global_known_hosts=None,
        system_ssh_config=None,
        connect_timeout=10.0,
    )
    return replace(base, **kw)


def remote(srv: SshServer, host: str | None = None) -> RemotePath:
    return RemotePath(None, host or srv.host, srv.port, "/unused")


@pytest.fixture
def conn(srv: SshServer) -> Iterator[SshConnection]:
    with connect(remote(srv), options(srv, remote_cmd="sh")) as c:
        yield c


def read_all(proc: RemoteProcess) -> bytes:
    out = bytearray()
    while chunk := proc.recv(MiB):
        out += chunk
    return bytes(out)


def sh(conn: SshConnection, script: str, **kw: Callable[[str], None]) -> RemoteProcess:
    """Run a shell snippet (the connection's remote_cmd is ``sh``)."""
    return conn.run(["-c", script], **kw)


def finishes(work: Callable[[], T], within: float = 300) -> T:
    """``work()``'s result; fails (instead of hanging the suite) if it is still running
    after ``within`` seconds, far beyond any normal run: a did-not-hang guard."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(within)
    assert not th.is_alive(), f"still running after {within:g} s: stalled"
    if errors:
        raise errors[0]
    return result[0]


def round_trip(conn: SshConnection, total: int) -> float:
    """Push ``total`` random bytes through remote ``cat`` from one thread while another
    reads them back; asserts the SHA-256 matches; returns MB/s (each direction)."""
    proc = conn.run(["-c", "exec cat"])
    block = os.urandom(MiB)
    sent, got = hashlib.sha256(), hashlib.sha256()
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            for i in range(total // MiB):
                piece = block[i % 7 :] + block[: i % 7]  # not one repeated block
                proc.send(piece)
                sent.update(piece)
            proc.close_send()
        except BaseException as e:
            errors.append(e)

    start = time.monotonic()
    th = threading.Thread(target=sender)
    th.start()
    n = 0
    while chunk := proc.recv(4 * MiB):
        got.update(chunk)
        n += len(chunk)
    th.join()
    elapsed = time.monotonic() - start
    assert not errors
    assert n == total
    assert got.hexdigest() == sent.hexdigest()
    assert proc.wait(10) == 0
    return total / elapsed / 1e6


@pytest.mark.ssh
@pytest.mark.process
def test_cat_round_trip_concurrent(conn: SshConnection) -> None:
    rate = round_trip(conn, 128 * MiB)
    assert conn.cipher == "aes128-gcm@openssh.com"
    print(f"cat round trip: {rate:.0f} MB/s each way")


class _KexCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.rekeys = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Rekeying"):
            self.rekeys += 1


@pytest.fixture
def kex_counter() -> Iterator[_KexCounter]:
    log = logging.getLogger("paramiko.transport")
    counter = _KexCounter()
    old = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(counter)
    yield counter
    log.removeHandler(counter)
    log.setLevel(old)


@pytest.mark.ssh
@pytest.mark.slow
@pytest.mark.process
def test_round_trip_across_rekey_does_not_stall(
    conn: SshConnection, kex_counter: _KexCounter
) -> None:
    finishes(lambda: round_trip(conn, 640 * MiB))
    assert kex_counter.rekeys >= 1  # paramiko re-keys every 512 MiB


@pytest.mark.ssh
@pytest.mark.slow
@pytest.mark.process
def test_pull_across_rekey_does_not_stall(conn: SshConnection, kex_counter: _KexCounter) -> None:
    total = 640 * MiB
    proc = sh(conn, f"head -c {total} /dev/zero")

    def pull() -> int:
        n = 0
        while chunk := proc.recv(256 * 1024):  # small reads: many window adjusts
            n += len(chunk)
        return n

    assert finishes(pull) == total
    assert proc.wait(10) == 0
    assert kex_counter.rekeys >= 1


@pytest.mark.ssh
@pytest.mark.process
def test_stderr_relayed_line_by_line(conn: SshConnection) -> None:
    lines: list[str] = []
    proc = sh(conn, "echo one >&2; printf 'two\\nthree' >&2; echo out", on_stderr=lines.append)
    assert read_all(proc) == b"out\n"
    assert proc.wait(5) == 0
    assert lines == ["one", "two", "three"]


@pytest.mark.ssh
@pytest.mark.process
def test_stderr_default_prefix(conn: SshConnection, capfd: pytest.CaptureFixture[str]) -> None:
    proc = sh(conn, "echo 'disk full' >&2")
    assert read_all(proc) == b""
    assert proc.wait(5) == 0
    assert capfd.readouterr().err == f"{conn.host}: disk full\n"


@pytest.mark.ssh
@pytest.mark.parametrize("status", [0, 1, 3, 126])
@pytest.mark.process
def test_exit_status(conn: SshConnection, status: int) -> None:
    proc = sh(conn, f"exit {status}")
    assert read_all(proc) == b""
    assert proc.wait(5) == status


@pytest.mark.ssh
@pytest.mark.process
def test_arguments_arrive_literally(srv: SshServer, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    args = [
        "a b",
        "it's",
        '"dq"',
        f"$(touch {marker})",
        f"`touch {marker}`",
        "*",
        "",
        "semi;colon",
        "new\nline",
        "$HOME",
        "-n",
    ]
    with connect(remote(srv), options(srv, remote_cmd="printf")) as c:
        proc = c.run(["%s\\0", *args])
        out = read_all(proc)
        assert proc.wait(5) == 0
    assert out.split(b"\0")[:-1] == [a.encode() for a in args]
    assert not marker.exists()


@pytest.mark.ssh
@pytest.mark.process
def test_remote_cmd_path_with_spaces(srv: SshServer, tmp_path: Path) -> None:
    tool = tmp_path / "my tools" / "fake diskrsync"
    tool.parent.mkdir()
    tool.write_text('#!/bin/sh\necho "[$0] $#: $1"\n')
    tool.chmod(0o755)
    with connect(remote(srv), options(srv, remote_cmd=str(tool))) as c:
        proc = c.run(["serve", "--x"])
        assert read_all(proc) == f"[{tool}] 2: serve\n".encode()
        assert proc.wait(5) == 0


@pytest.mark.ssh
@pytest.mark.process
def test_missing_remote_command_is_explained(srv: SshServer) -> None:
    lines: list[str] = []
    opts = options(srv, remote_cmd="diskrsync-not-here")
    want = (
        f"diskrsync-not-here not found on {srv.host} (exit 127): "
        "install it there or pass --remote-cmd"
    )
    with connect(remote(srv), opts) as c:
        proc = c.run(["serve"], on_stderr=lines.append)
        with pytest.raises(RemoteCommandError) as info:
            proc.recv(100)
        assert str(info.value) == want
        assert info.value.exit_status == EXIT_NOT_FOUND == 127
        with pytest.raises(RemoteCommandError, match="exit 127") as waited:
            proc.wait(5)
        assert waited.value.exit_status == EXIT_NOT_FOUND
        # a sender learns the same thing
        proc2 = c.run(["serve"], on_stderr=lines.append)
        with pytest.raises(RemoteCommandError) as info2:
            for _ in range(100):
                proc2.send(b"x" * MiB)
        assert str(info2.value) == want
        assert info2.value.exit_status == EXIT_NOT_FOUND
    assert any("not found" in line for line in lines)


def _fingerprint_of(pub: Path) -> str:
    out = subprocess.run([SSH_KEYGEN, "-lf", str(pub)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


@pytest.mark.ssh
@pytest.mark.process
def test_unknown_host_key_fails_with_fingerprint(srv: SshServer, tmp_path: Path) -> None:
    known = tmp_path / "home" / ".ssh" / "known_hosts"
    with pytest.raises(UnknownHostKeyError) as info:
        connect(remote(srv), options(srv, known_hosts=known))
    msg = str(info.value)
    assert "ssh-ed25519" in msg
    assert _fingerprint_of(Path(f"{srv.host_key}.pub")) in msg
    assert "--accept-new-host-key" in msg
    assert "\n" not in msg
    assert not known.exists()


@pytest.mark.ssh
@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.process
def test_accept_new_host_key_adds_it(srv: SshServer, tmp_path: Path, hashed: bool) -> None:
    known = tmp_path / "home" / ".ssh" / "known_hosts"
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host *\n    HashKnownHosts {'yes' if hashed else 'no'}\n")
    opts = options(srv, known_hosts=known, ssh_config=cfg, remote_cmd="true")
    with connect(remote(srv), replace(opts, accept_new_host_key=True)) as c:
        assert c.run([]).wait(5) == 0
    line = known.read_text()
    assert line.endswith(public_line(srv.host_key).rsplit(" ", 1)[0] + "\n")
    assert line.startswith("|1|") == hashed
    assert oct(known.stat().st_mode & 0o777) == "0o600"
    # OpenSSH finds the entry we wrote
    found = subprocess.run([SSH_KEYGEN, "-F", srv.host_pattern, "-f", str(known)], check=False)
    assert found.returncode == 0
    # and the next connection needs no flag
    with connect(remote(srv), opts) as c:
        assert c.run([]).wait(5) == 0
    assert known.read_text() == line


@pytest.mark.ssh
@pytest.mark.parametrize("kind", ["ed25519", "ecdsa"])
@pytest.mark.process
def test_changed_host_key_fails_even_with_accept_new(
    srv: SshServer, tmp_path: Path, kind: str
) -> None:
    other = make_key(tmp_path / "other_host_key", kind)
    srv.write_known_hosts(key=other)
    before = srv.known_hosts.read_text()
    with pytest.raises(HostKeyChangedError) as info:
        connect(remote(srv), options(srv, accept_new_host_key=True))
    msg = str(info.value)
    assert _fingerprint_of(Path(f"{srv.host_key}.pub")) in msg
    assert "ssh-keygen -R" in msg
    assert srv.known_hosts.read_text() == before


@pytest.mark.ssh
@pytest.mark.process
def test_wrong_client_key_is_an_auth_failure(srv: SshServer, tmp_path: Path) -> None:
    wrong = make_key(tmp_path / "wrong_key")
    with pytest.raises(AuthError) as info:
        connect(remote(srv), options(srv, identity_files=(wrong,)))
    msg = str(info.value)
    assert f"authentication as {srv.user}@{srv.host} failed" in msg
    assert str(wrong) in msg
    assert "publickey" in msg


@pytest.mark.ssh
@pytest.mark.process
def test_no_keys_at_all_says_so(srv: SshServer) -> None:
    with pytest.raises(AuthError, match="no keys"):
        connect(remote(srv), options(srv, identity_files=()))


@pytest.mark.ssh
@pytest.mark.process
def test_unreadable_key_file_is_reported(srv: SshServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(AuthError, match=f"{missing} missing"):
        connect(remote(srv), options(srv, identity_files=(missing,)))


@pytest.mark.ssh
@pytest.mark.process
def test_agent_keys_are_used(
    srv: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(srv.client_key)], env=env, check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        opts = options(srv, identity_files=(), use_agent=True, remote_cmd="true")
        with connect(remote(srv), opts) as c:
            assert c.run([]).wait(5) == 0
    finally:
        agent.terminate()
        agent.wait(5)


@pytest.mark.inproc
def test_connection_refused() -> None:
    port = free_port()
    with pytest.raises(ConnectError, match=f"127.0.0.1 port {port}: connection refused"):
        connect(RemotePath(None, "127.0.0.1", port, "/x"), SshOptions(ssh_config=None))


@pytest.mark.inproc
def test_unknown_host_name() -> None:
    with pytest.raises(ConnectError, match=r"cannot resolve host name 'no-such-host\.invalid'"):
        connect(parse_location("no-such-host.invalid:/x"), SshOptions(ssh_config=None))


@pytest.mark.inproc
def test_silent_server_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ConnectError, match="no SSH banner"):
            connect(
                RemotePath(None, "127.0.0.1", port, "/x"),
                SshOptions(ssh_config=None, connect_timeout=1.0),
            )


@pytest.mark.ssh
@pytest.mark.process
def test_ssh_config_hostname_user_port_identityfile(srv: SshServer, tmp_path: Path) -> None:
    cfg = srv.write_ssh_config(tmp_path / "ssh_config", alias="backup")
    opts = options(srv, identity_files=(), ssh_config=cfg, remote_cmd="sh")
    with connect(parse_location("backup:/srv/x.spgz"), opts) as c:
        proc = sh(c, 'echo "$(id -un)"')
        assert read_all(proc) == f"{srv.user}\n".encode()
    # an explicit port beats the config's
    cfg = srv.write_ssh_config(tmp_path / "ssh_config", alias="backup", Port=str(free_port()))
    with connect(RemotePath(None, "backup", srv.port, "/x"), replace(opts, ssh_config=cfg)):
        pass
    with pytest.raises(ConnectError, match="refused"):
        connect(RemotePath(None, "backup", None, "/x"), replace(opts, ssh_config=cfg))


@pytest.mark.ssh
@pytest.mark.process
def test_ssh_config_user_is_used(srv: SshServer, tmp_path: Path) -> None:
    cfg = srv.write_ssh_config(tmp_path / "ssh_config", alias="backup", User="nobody-here")
    with pytest.raises(AuthError, match="nobody-here@"):
        connect(RemotePath(None, "backup", None, "/x"), options(srv, ssh_config=cfg))


@pytest.mark.ssh
@pytest.mark.process
def test_proxy_jump(srv: SshServer, tmp_path: Path) -> None:
    cfg = tmp_path / "ssh_config"
    srv.write_ssh_config(cfg, alias="jump")
    text = cfg.read_text()
    srv.write_ssh_config(cfg, alias="inner", HostName="localhost", ProxyJump="jump")
    cfg.write_text(text + cfg.read_text())
    # the target is reached as "localhost" through the jump: file its key under that name
    kind, blob = public_line(srv.host_key).split()[:2]
    with srv.known_hosts.open("a") as f:
        f.write(f"[localhost]:{srv.port} {kind} {blob}\n")
    opts = options(srv, identity_files=(), ssh_config=cfg, remote_cmd="sh")
    with connect(RemotePath(None, "inner", None, "/x"), opts) as c:
        proc = sh(c, "echo via-jump")
        assert read_all(proc) == b"via-jump\n"
        sessions = [p for p in srv.descendants() if p.comm == "sshd"]
        assert len(sessions) >= 2  # one for the jump, one for the target


@pytest.mark.ssh
@pytest.mark.process
def test_proxy_command(srv: SshServer, tmp_path: Path) -> None:
    proxy = (
        f"ssh -q -o BatchMode=yes -o UserKnownHostsFile={srv.known_hosts} "
        f"-i {srv.client_key} -p {srv.port} {srv.user}@127.0.0.1 -W %h:%p"
    )
    cfg = srv.write_ssh_config(tmp_path / "ssh_config", alias="viaproxy", ProxyCommand=proxy)
    opts = options(srv, identity_files=(), ssh_config=cfg, remote_cmd="echo")
    with connect(RemotePath(None, "viaproxy", None, "/x"), opts) as c:
        proc = c.run(["proxied"])
        assert read_all(proc) == b"proxied\n"


def _transfer_until_error(proc: RemoteProcess, on_started: Callable[[], None]) -> list[Exception]:
    """Stream through the pipe from two threads; call ``on_started`` once data flows;
    return the errors both threads raised (they must raise, not hang)."""
    errors: list[Exception] = []
    started = threading.Event()

    def sender() -> None:
        try:
            while True:
                proc.send(b"z" * MiB)
        except Exception as e:
            errors.append(e)

    def receiver() -> None:
        try:
            while True:
                if not proc.recv(MiB):
                    errors.append(EOFError("clean EOF"))
                    return
                started.set()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=f, daemon=True) for f in (sender, receiver)]
    for t in threads:
        t.start()
    assert started.wait(60)
    on_started()
    for t in threads:
        t.join(60)  # generous: only a hang fails here
        assert not t.is_alive(), "send/recv hung after the link broke"
    return errors


@pytest.mark.ssh
@pytest.mark.process
def test_remote_killed_mid_transfer(conn: SshConnection, srv: SshServer) -> None:
    proc = sh(conn, "exec cat")

    def kill_cat() -> None:
        (cat,) = srv.wait_for("cat")
        os.kill(cat.pid, signal.SIGKILL)

    errors = _transfer_until_error(proc, kill_cat)
    assert len(errors) == 2
    assert all(isinstance(e, PeerError) for e in errors), errors
    assert any("killed by a signal" in str(e) for e in errors)


@pytest.mark.ssh
@pytest.mark.process
def test_sshd_session_killed_mid_transfer(conn: SshConnection, srv: SshServer) -> None:
    proc = sh(conn, "exec cat")

    def kill_session() -> None:
        for pid in srv.session_pids():
            os.kill(pid, signal.SIGKILL)

    errors = _transfer_until_error(proc, kill_session)
    assert len(errors) == 2
    assert all(isinstance(e, LinkError) for e in errors), errors
    assert all("lost connection" in str(e) for e in errors)


@pytest.mark.ssh
@pytest.mark.process
def test_silent_link_detected_by_keepalive(srv: SshServer) -> None:
    opts = options(srv, remote_cmd="sh", keepalive_interval=0.5, keepalive_count=3)
    with connect(remote(srv), opts) as c:
        proc = sh(c, "exec cat")

        def freeze_session() -> None:
            for pid in srv.session_pids():
                os.kill(pid, signal.SIGSTOP)

        errors = _transfer_until_error(proc, freeze_session)
    assert len(errors) == 2
    assert all(isinstance(e, LinkError) for e in errors), errors
    # the configured count ended it (silence >= 0.5 s x 3), not a TCP error or the default
    assert all("(3 keepalives unanswered)" in str(e) for e in errors), errors
    for e in errors:
        m = re.search(r"no response from \S+ for (\d+) s", str(e))
        assert m and int(m[1]) >= 1, e


@pytest.mark.ssh
@pytest.mark.process
def test_idle_but_alive_link_survives_keepalive(srv: SshServer) -> None:
    opts = options(srv, remote_cmd="sh", keepalive_interval=0.5, keepalive_count=3)
    with connect(remote(srv), opts) as c:
        proc = sh(c, "sleep 3; echo alive")  # twice the silence limit, answered probes
        assert read_all(proc) == b"alive\n"
        assert proc.wait(5) == 0


@pytest.mark.ssh
@pytest.mark.process
def test_send_lands_exactly_for_odd_sizes(conn: SshConnection) -> None:
    proc = sh(conn, "exec sha256sum")
    data = os.urandom(3 * MiB + 12345)
    proc.send(memoryview(data)[:1])
    proc.send(bytearray(data[1:70000]))
    proc.send(data[70000:])
    proc.close_send()
    assert read_all(proc).split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert proc.wait(5) == 0


# --------------------------------------------------------------------------------------
# ssh_config as OpenSSH reads it: Include, the system-wide file, StrictHostKeyChecking


def _home_ssh() -> Path:
    ssh_dir = Path(os.environ["HOME"]) / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    return ssh_dir


@pytest.mark.ssh
@pytest.mark.process
def test_include_with_a_glob_relative_to_dot_ssh(srv: SshServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`ssh -G vault` works through an Include: so must we (relative to ~/.ssh, not to
    the working directory)."""
    ssh_dir = _home_ssh()
    (ssh_dir / "conf.d").mkdir()
    srv.write_ssh_config(ssh_dir / "conf.d" / "20-vault.conf", alias="vault")
    (ssh_dir / "conf.d" / "10-other.conf").write_text("Host elsewhere\n    Port 1\n")
    (ssh_dir / "config").write_text("# comment\nInclude conf.d/*.conf missing/*.conf\n")
    monkeypatch.chdir(tmp_path)
    opts = options(srv, identity_files=(), ssh_config=DEFAULT_SSH_CONFIG, remote_cmd="sh")
    with connect(RemotePath(None, "vault", None, "/x"), opts) as c:
        assert read_all(sh(c, "echo included")) == b"included\n"


@pytest.mark.ssh
@pytest.mark.process
def test_system_config_is_read_after_the_users(srv: SshServer, tmp_path: Path) -> None:
    """The system file (its relative Includes next to it, as /etc/ssh) supplies what the
    user's file does not say; where both say something, the user's value wins."""
    etc = tmp_path / "etc-ssh"
    (etc / "ssh_config.d").mkdir(parents=True)
    srv.write_ssh_config(etc / "ssh_config.d" / "vault.conf", alias="vault")
    system = etc / "ssh_config"
    system.write_text("Include ssh_config.d/*.conf\nHost *\n    User nobody-at-all\n")
    user = tmp_path / "user_config"
    user.write_text("# nothing about vault yet\n")
    opts = options(srv, identity_files=(), ssh_config=user, system_ssh_config=system,
                   remote_cmd="sh")
    with connect(RemotePath(None, "vault", None, "/x"), opts) as c:
        assert read_all(sh(c, 'echo "$(id -un)"')) == f"{srv.user}\n".encode()
    user.write_text("Host vault\n    User nobody-here\n")
    with pytest.raises(AuthError, match="nobody-here@"):
        connect(RemotePath(None, "vault", None, "/x"), opts)
    # as ssh -F FILE: the system file is not read, so vault is unknown
    with pytest.raises(ConnectError, match="resolve"):
        connect(RemotePath(None, "vault", None, "/x"), replace(opts, system_ssh_config=None))


@pytest.mark.ssh
@pytest.mark.parametrize("value", ["accept-new", "no"])
@pytest.mark.process
def test_strict_host_key_checking_accept_new_from_the_config(
        srv: SshServer, tmp_path: Path, value: str) -> None:
    known = tmp_path / "new_known_hosts"
    cfg = srv.write_ssh_config(tmp_path / "ssh_config", alias="vault",
                               StrictHostKeyChecking=value, HashKnownHosts="no")
    opts = options(srv, identity_files=(), ssh_config=cfg, known_hosts=known,
                   remote_cmd="true")
    with connect(RemotePath(None, "vault", None, "/x"), opts) as c:
        assert c.run([]).wait(5) == 0
    assert known.read_text().startswith(f"{srv.host_pattern} ssh-ed25519 ")
    # a changed key is refused all the same
    srv.write_known_hosts(known, key=make_key(tmp_path / "other_key"))
    with pytest.raises(HostKeyChangedError):
        connect(RemotePath(None, "vault", None, "/x"), opts)
    # without the setting an unknown key is still refused
    cfg = srv.write_ssh_config(tmp_path / "ssh_config", alias="vault")
    known.unlink()
    with pytest.raises(UnknownHostKeyError):
        connect(RemotePath(None, "vault", None, "/x"), opts)


@pytest.mark.inproc
def test_include_inside_a_host_block_applies_only_there(tmp_path: Path) -> None:
    """Lines of a file included from a Host block, and its own Host blocks, apply only
    where that block does; the lines after the Include are still that block's."""
    ssh_dir = _home_ssh()
    (ssh_dir / "inner").write_text("Port 2201\nHost *\n    User inner-user\n")
    (ssh_dir / "config").write_text(
        "Host vault\n    Include inner\n    HostName vault.example\n"
        "Host *\n    User outer-user\n")
    opts = SshOptions(system_ssh_config=None)
    cfg = load_config(opts)
    vault = resolve("vault", None, None, cfg, opts)
    assert (vault.hostname, vault.port, vault.user) == ("vault.example", 2201, "inner-user")
    other = resolve("other", None, None, cfg, opts)
    assert (other.hostname, other.port, other.user) == ("other", 22, "outer-user")


@pytest.mark.inproc
def test_include_loop_is_an_error_not_a_hang(tmp_path: Path) -> None:
    cfg = tmp_path / "loop"
    cfg.write_text(f"Include {cfg}\n")
    with pytest.raises(UsageError, match="nested more than 16"):
        load_config(SshOptions(ssh_config=cfg, system_ssh_config=None))


@pytest.mark.inproc
def test_dash_f_replaces_both_configs_as_ssh_does() -> None:
    def opts(config: str | None) -> SshOptions:
        ns = argparse.Namespace(ssh_config=config, identity=[], remote_cmd="diskrsync",
                                accept_new_host_key=False)
        return ssh_options(ns)[0]

    assert opts(None).ssh_config == DEFAULT_SSH_CONFIG
    assert opts(None).system_ssh_config == Path("/etc/ssh/ssh_config")
    assert opts("/x/cfg").system_ssh_config is None
    assert opts("none").ssh_config is None


@pytest.mark.inproc
def test_unparsable_config_names_the_files_read(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.write_text("Host x\n    User a\n")
    system = tmp_path / "system"
    system.write_text("Match nonsense-criterion\n")
    with pytest.raises(UsageError, match=f"cannot parse ssh config {user} \\+ {system}"):
        load_config(SshOptions(ssh_config=user, system_ssh_config=system))
