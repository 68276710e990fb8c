"""The user guide runs as written, its error messages are the real ones, and the generated
references (completion, man page, docs/cli.md) match the CLI's parser.

Fence info strings in docs/user-guide.md say what a block is:

* ``sh test``: run, in order, in one scratch directory (``contrib`` linked into it);
* ``sh test root``: the same, when we are root with loop devices and /dev/fuse;
* ``sh test ssh``: the same, against a private sshd that the guide's host names (vault, web1)
  point to, through a ``~/.ssh/config`` in a temporary HOME; the guide's server paths are
  mapped into the scratch directory (``SSH_PATHS``);
* ``console error=NAME``: ``$ command`` lines, the output they must print (``<...>`` matches
  anything) and ``[exit status N]``; ``SCENARIOS[NAME]`` sets the situation up and the commands
  run as written;
* ``sh`` (no ``test``): must parse (``bash -n``), and every ``diskrsync ...`` line in it must be
  accepted by the CLI's parser.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docgen
import pytest
from support.sshd import SshServer, make_key

from diskrsync.cli.main import build_parser
from diskrsync.compression.image import Image, writer_active
from diskrsync.synccore.source import PushStats

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "user-guide.md"
VENV_BIN = Path(sys.executable).parent
DISKRSYNC = VENV_BIN / "diskrsync"


# -- reading the guide ---------------------------------------------------------------------


@dataclass
class Block:
    info: str  # the fence's info string
    text: str
    line: int  # where the fence opens (1-based)

    @property
    def words(self) -> list[str]:
        return self.info.split()

    @property
    def test_kind(self) -> str | None:
        """None: not run; "" plain test; "root" / "ssh"."""
        w = self.words
        if len(w) >= 2 and w[0] == "sh" and w[1] == "test":
            return w[2] if len(w) > 2 else ""
        return None

    def __str__(self) -> str:
        return f"user-guide.md:{self.line} ({self.info})"


def blocks(path: Path = GUIDE) -> list[Block]:
    found: list[Block] = []
    body: list[str] = []
    info: str | None = None
    start = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if info is None:
            if stripped.startswith("```"):
                info, start, body = stripped[3:].strip(), n, []
                indent = len(line) - len(line.lstrip())
        elif stripped == "```":
            found.append(Block(info, "\n".join(body) + "\n", start))
            info = None
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
    assert info is None, f"unclosed fence at line {start}"
    return found


BLOCKS = blocks()
RUN_BLOCKS = [b for b in BLOCKS if b.test_kind is not None]
ERROR_BLOCKS = {b.words[1].removeprefix("error="): b for b in BLOCKS
                if b.words[:1] == ["console"] and len(b.words) > 1
                and b.words[1].startswith("error=")}


def _ends_command(word: str) -> bool:
    return word in {"|", "||", "&&", ";", "&"} or re.match(r"\d*[<>]", word) is not None


def _cut_comment(line: str) -> str:
    """``line`` without its comment, as the shell cuts it: ``#`` starts one only at the
    start of a word (``repo:DIR#DISK`` is one word), never inside quotes."""
    quote = ""
    escaped = False
    for i, c in enumerate(line):
        if escaped:
            escaped = False
        elif c == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def diskrsync_lines(text: str) -> list[str]:
    """The ``diskrsync ...`` commands of a shell block (continuations joined, comments cut)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(_cut_comment(line))
        for i, w in enumerate(words):
            before = words[i - 1] if i else ";"
            if w != "diskrsync" or not (_ends_command(before) or before.endswith(";")
                                         or before in {"then", "do", "!"}):
                continue
            cmd = []
            for x in words[i + 1:]:
                if _ends_command(x):
                    break
                if x.endswith(";"):
                    cmd.append(x[:-1])
                    break
                cmd.append(x)
            out.append(" ".join(shlex.quote(c) for c in cmd))
    return out


# -- the scratch directory the tutorial runs in --------------------------------------------


def can_mount() -> str | None:
    """Why root blocks cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "needs /dev/fuse and fusermount3"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices"
    return None


def base_env(home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "LC_ALL": "C.UTF-8"}
    env.pop("DISKRSYNC_CONF_DIR", None)
    if home is not None:
        env["HOME"] = str(home)
    return env


def run_shell(script: str, cwd: Path, env: dict[str, str],
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def release_mounts(work: Path) -> None:
    """Undo whatever a failed root block left: filesystems, loop devices, the FUSE mount."""
    for sub in ("files",):
        if os.path.ismount(work / sub):
            subprocess.run(["umount", "-l", str(work / sub)], check=False)
    if os.geteuid() == 0 and shutil.which("losetup"):
        out = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE"], capture_output=True,
                             text=True, check=False).stdout
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and str(work) in parts[1]:
                subprocess.run(["losetup", "-d", parts[0]], check=False)
    mnt = work / "mnt"
    with contextlib.suppress(OSError):
        if os.path.ismount(mnt) or _stale(mnt):
            subprocess.run([str(DISKRSYNC), "umount", str(mnt)], check=False,
                           capture_output=True)


def _stale(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


class Tutorial:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.failed: str | None = None
        (work / "contrib").symlink_to(ROOT / "contrib")


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory) -> Iterator[Tutorial]:
    work = tmp_path_factory.mktemp("guide")
    t = Tutorial(work)
    try:
        yield t
    finally:
        release_mounts(work)


# -- SSH -----------------------------------------------------------------------------------

# the guide's paths on the servers, mapped into the scratch directory
SSH_PATHS = {
    "/usr/local/bin/diskrsync": lambda work: str(DISKRSYNC),
    "/srv/backups": lambda work: str(work / "srv-backups"),
    "/srv/images/web1.img": lambda work: str(work / "disk.img"),
}


@dataclass
class Ssh:
    server: SshServer
    home: Path
    known_hosts: Path

    def config(self, known_hosts: Path | None = None) -> None:
        s = self.server
        kh = known_hosts or self.known_hosts
        text = "".join(
            f"Host {alias}\n    HostName {s.host}\n    Port {s.port}\n    User {s.user}\n"
            f"    IdentityFile {s.client_key}\n    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {kh}\n"
            for alias in ("vault", "web1"))
        (self.home / ".ssh" / "config").write_text(text)


@contextlib.contextmanager
def ssh_server(base: Path) -> Iterator[Ssh]:
    if not shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin"):
        pytest.skip("sshd not installed")
    home = base / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    with SshServer(base / "sshd") as server:
        ssh = Ssh(server, home, home / ".ssh" / "known_hosts")
        ssh.config()
        yield ssh


@pytest.fixture(scope="module")
def tutorial_ssh(tutorial) -> Iterator[Ssh]:
    with ssh_server(tutorial.work / "ssh") as ssh:
        yield ssh


def map_ssh_paths(text: str, work: Path) -> str:
    for path, target in sorted(SSH_PATHS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, target(work))
    return text


# -- the tutorial blocks, in order ---------------------------------------------------------


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=str)
@pytest.mark.process
def test_guide_block_runs(block: Block, tutorial: Tutorial, request) -> None:
    if tutorial.failed:
        pytest.skip(f"an earlier block failed: {tutorial.failed}")
    env = base_env()
    script = block.text
    if block.test_kind == "root":
        why = can_mount()
        if why:
            pytest.skip(why)
    elif block.test_kind == "ssh":
        ssh = request.getfixturevalue("tutorial_ssh")
        (tutorial.work / "srv-backups").mkdir(exist_ok=True)
        env = base_env(ssh.home)
        script = map_ssh_paths(script, tutorial.work)
    else:
        assert block.test_kind == "", f"{block}: unknown test kind {block.test_kind!r}"
    r = run_shell(script, tutorial.work, env)
    if r.returncode != 0:
        tutorial.failed = str(block)
        if block.test_kind == "root":
            release_mounts(tutorial.work)
    assert r.returncode == 0, f"{block} failed ({r.returncode}):\n{block.text}\n" \
                              f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.pure
def test_guide_shows_every_command_at_work() -> None:
    shown = {line.split()[0] for b in RUN_BLOCKS for line in diskrsync_lines(b.text)
             if line}
    commands = {c.name for c in docgen.model().commands}
    # convert needs a Go diskrsync SPGZ0001 file: docs/migration.md shows it
    assert commands - {"convert"} <= shown, f"not run in the guide: {commands - shown}"


# -- every shell block parses, every diskrsync line is accepted ----------------------------


SH_BLOCKS = [b for b in BLOCKS if b.words[:1] == ["sh"]]


@pytest.mark.parametrize("block", SH_BLOCKS, ids=str)
@pytest.mark.process
def test_shell_blocks_parse(block: Block) -> None:
    r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert r.returncode == 0, f"{block}: {r.stderr}"
    parser = build_parser()
    for line in diskrsync_lines(block.text):
        argv = shlex.split(line)
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, f"{block}: the CLI rejects `diskrsync {line}`"


@pytest.mark.pure
def test_diskrsync_lines_are_found() -> None:
    """The extractor the parse test relies on (so that test cannot pass by finding nothing)."""
    text = ("diskrsync push a b  # comment\nx=1; diskrsync info c | head\n"
            "diskrsync restore \\\n    img -\nfoo diskrsync\n")
    assert diskrsync_lines(text) == ["push a b", "info c", "restore img -"]
    assert sum(len(diskrsync_lines(b.text)) for b in SH_BLOCKS) > 30


# -- the documented error messages are the real ones ---------------------------------------


@dataclass
class Expect:
    command: str
    lines: list[str] = field(default_factory=list)
    status: int | None = None


def parse_error_block(block: Block) -> list[Expect]:
    out: list[Expect] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            out.append(Expect(line[2:]))
        elif m := re.fullmatch(r"\[exit status (\d+)\]", line):
            out[-1].status = int(m.group(1))
        elif line.strip():
            out[-1].lines.append(line)
    assert out, f"{block}: no $ command"
    return out


def line_pattern(expected: str) -> re.Pattern[str]:
    parts = re.split(r"<[A-Z_]+>", expected)
    return re.compile(".+?".join(re.escape(p) for p in parts))


def check_expectations(block: Block, cwd: Path, env: dict[str, str],
                       rewrite: Callable[[str], str] = lambda c: c) -> None:
    for exp in parse_error_block(block):
        r = run_shell(rewrite(exp.command), cwd, env)
        got = (r.stdout + r.stderr).splitlines()
        for want in exp.lines:
            pat = line_pattern(rewrite(want))
            assert any(pat.fullmatch(g) for g in got), \
                f"{block}: `{exp.command}` did not print\n  {want}\nit printed:\n" + \
                "\n".join(f"  {g}" for g in got)
        if exp.status is not None:
            assert r.returncode == exp.status, \
                f"{block}: `{exp.command}` exited {r.returncode}, the guide says {exp.status}"
        assert "Traceback" not in r.stderr


def make_sample(work: Path) -> None:
    """The guide's own first block (the sample disk), then a first backup."""
    first = RUN_BLOCKS[1]
    assert "sgdisk" in first.text, "the sample-disk block moved"
    r = run_shell(first.text + "diskrsync push -q disk.img backups/disk.spgz\n", work,
                  base_env())
    assert r.returncode == 0, r.stderr


def writer_locked(path: Path) -> bool:
    return writer_active(str(path))


Scenario = Callable[[Block, Path], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(f: Scenario) -> Scenario:
        SCENARIOS[name] = f
        return f
    return register


@scenario("missing-source")
@scenario("not-an-image")
def _plain(block: Block, work: Path) -> None:
    check_expectations(block, work, base_env())


@scenario("dest-not-image")
def _dest_not_image(block: Block, work: Path) -> None:
    r = run_shell("diskrsync restore -q backups/disk.spgz restored.img", work, base_env())
    assert r.returncode == 0, r.stderr
    check_expectations(block, work, base_env())


@scenario("not-a-push-target")
def _not_a_push_target(block: Block, work: Path) -> None:
    os.mkfifo(work / "backups" / "queue")
    try:
        check_expectations(block, work, base_env())
        assert stat.S_ISFIFO(os.lstat(work / "backups" / "queue").st_mode)
    finally:
        os.unlink(work / "backups" / "queue")


@scenario("busy")
def _busy(block: Block, work: Path) -> None:
    # a real second push, stopped while it holds the image's writer lock
    (work / "big.img").write_bytes(os.urandom(48 << 20))
    image = work / "backups" / "disk.spgz"
    p = subprocess.Popen([str(DISKRSYNC), "push", "-q", "big.img", "backups/disk.spgz"],
                         cwd=work, env=base_env())
    try:
        deadline = time.monotonic() + 60
        while not writer_locked(image):
            assert p.poll() is None, "the holding push ended before it could be caught"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGSTOP)
        check_expectations(block, work, base_env())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
        p.wait(timeout=60)


def _ssh_scenario(block: Block, work: Path, known: str) -> None:
    with ssh_server(work / "ssh") as ssh:
        kh = ssh.known_hosts
        if known == "right":
            ssh.server.write_known_hosts(kh)
        elif known == "wrong":
            other = make_key(work / "ssh" / "other_key")
            ssh.server.write_known_hosts(kh, key=other)
        (work / "srv-backups").mkdir(exist_ok=True)
        check_expectations(block, work, base_env(ssh.home),
                           rewrite=lambda c: map_ssh_paths(c, work))


@scenario("host-key-unknown")
def _host_key_unknown(block: Block, work: Path) -> None:
    _ssh_scenario(block, work, "none")


@scenario("host-key-changed")
def _host_key_changed(block: Block, work: Path) -> None:
    _ssh_scenario(block, work, "wrong")


@scenario("remote-cmd-missing")
@scenario("remote-dir-missing")
def _remote(block: Block, work: Path) -> None:
    _ssh_scenario(block, work, "right")


@scenario("disk-full")
def _disk_full(block: Block, work: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = work / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(small)], check=True)
    try:
        check_expectations(block, work, base_env())
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@scenario("corrupt-chunk")
def _corrupt_chunk(block: Block, work: Path) -> None:
    path = work / "backups" / "disk.spgz"
    with Image.open(str(path)) as img, img.snapshot() as snap:
        entry = next(e for e in (snap.tree.entry(i) for i in range(snap.chunk_count))
                     if e.length > 64)
    with open(path, "r+b") as f:
        f.seek(entry.offset + entry.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    check_expectations(block, work, base_env())


SECRET = "another long passphrase"


def _encrypted_sample(work: Path) -> dict[str, str]:
    """backups/secret.spgz, encrypted as the guide's section 12 makes it; the environment
    that unlocks it."""
    env = {**base_env(), "DISKRSYNC_PASSPHRASE": SECRET}
    r = run_shell("diskrsync push -q --encrypt disk.img backups/secret.spgz", work, env)
    assert r.returncode == 0, r.stderr
    return env


@scenario("wrong-passphrase")
def _wrong_passphrase(block: Block, work: Path) -> None:
    _encrypted_sample(work)
    check_expectations(block, work, base_env())
    assert not (work / "secret-out.img").exists()


@scenario("rolled-back")
def _rolled_back(block: Block, work: Path) -> None:
    # a copy of the encrypted image set aside, then a newer generation this client sees,
    # then the old copy put back in its place (what a host serving old backups does)
    env = _encrypted_sample(work)
    image, old = work / "backups" / "secret.spgz", work / "secret-old.spgz"
    shutil.copyfile(image, old)
    r = run_shell("dd if=/dev/urandom of=disk.img bs=4k count=1 seek=300 conv=notrunc "
                  "status=none && diskrsync push -q disk.img backups/secret.spgz "
                  "&& diskrsync info backups/secret.spgz > /dev/null", work, env)
    assert r.returncode == 0, r.stderr
    shutil.copyfile(old, image)
    check_expectations(block, work, env)


@scenario("source-changed")
def _source_changed(block: Block, work: Path) -> None:
    cs, n = 128 * 1024, 512
    live = work / "live.img"
    live.write_bytes(os.urandom(cs * n))
    r = run_shell("diskrsync push -q live.img backups/live.spgz", work, base_env())
    assert r.returncode == 0, r.stderr
    stop = threading.Event()

    def scribble() -> None:  # a live source: small writes all over it, all the time
        fd = os.open(live, os.O_WRONLY)
        try:
            while not stop.is_set():
                os.pwrite(fd, os.urandom(16), random.randrange(n) * cs)
                time.sleep(0.0002)
        finally:
            os.close(fd)

    last: AssertionError | None = None
    for _attempt in range(8):  # the race is likely, not certain: try a few pushes
        stop.clear()
        t = threading.Thread(target=scribble)
        t.start()
        try:
            check_expectations(block, work, base_env())
            return
        except AssertionError as e:
            last = e
        finally:
            stop.set()
            t.join()
    assert last is not None
    raise last


@scenario("stale-mount")
def _stale_mount(block: Block, work: Path) -> None:
    why = can_mount()
    if why:
        pytest.skip(why)
    mnt = work / "mnt"
    mnt.mkdir()
    # absolute paths: they tell our mount process from any other one
    r = run_shell(f"diskrsync mount {work}/backups/disk.spgz {mnt}", work, base_env())
    assert r.returncode == 0, r.stderr
    try:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and _is_mount_process(p, work)]
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not _stale(mnt):
            assert time.monotonic() < deadline, "the mount did not go stale"
            time.sleep(0.05)
        check_expectations(block, work, base_env())
    finally:
        release_mounts(work)


def _is_mount_process(proc: Path, work: Path) -> bool:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        return b"mount" in argv and str(work / "mnt").encode() in argv
    except OSError:
        return False


@pytest.mark.pure
def test_every_documented_error_has_a_scenario_and_back() -> None:
    assert set(ERROR_BLOCKS) == set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(ERROR_BLOCKS), ids=str)
@pytest.mark.process
def test_documented_error_is_real(name: str, tmp_path: Path) -> None:
    make_sample(tmp_path)
    SCENARIOS[name](ERROR_BLOCKS[name], tmp_path)


@pytest.mark.pure
def test_error_patterns_are_strict() -> None:
    """A placeholder matches something, the rest must match exactly (so a changed message
    fails the test above)."""
    pat = line_pattern("diskrsync: cannot read <PATH>: No such file or directory")
    assert pat.fullmatch("diskrsync: cannot read /dev/x: No such file or directory")
    assert not pat.fullmatch("diskrsync: cannot open /dev/x: No such file or directory")
    assert not pat.fullmatch("diskrsync: cannot read : No such file or directory")


# -- links, anchors, exit codes ------------------------------------------------------------


def slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


# docs the other parts of the project write; checked once they exist
PENDING = {"docs/ssh.md", "docs/mount.md", "docs/migration.md"}


@pytest.mark.inproc
def test_links_and_anchors() -> None:
    text = GUIDE.read_text()
    anchors = {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}
    pending = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            assert anchor in anchors, f"no heading for #{anchor}"
            continue
        resolved = (GUIDE.parent / path).resolve()
        rel = str(resolved.relative_to(ROOT))
        if rel in PENDING and not resolved.exists():
            pending.append(rel)
            continue
        assert resolved.exists(), f"broken link {target}"
    if pending:
        pytest.skip(f"links to docs not written yet: {sorted(set(pending))}")


@pytest.mark.inproc
def test_exit_code_table_matches_the_code() -> None:
    text = GUIDE.read_text()
    section = text[text.index("## Exit codes"):]
    documented = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", section, re.M)}
    assert documented == {code for code, _ in docgen.EXIT_CODES}


# -- generated references are up to date ---------------------------------------------------


@pytest.mark.parametrize("kind", sorted(docgen.OUTPUTS))
@pytest.mark.inproc
def test_generated_file_is_up_to_date(kind: str) -> None:
    path = ROOT / docgen.OUTPUTS[kind]
    assert path.exists(), f"{path} missing: run `make docs`"
    assert path.read_text() == docgen.generate(kind), \
        f"{docgen.OUTPUTS[kind]} is out of date: run `make docs`"


@pytest.mark.pure
def test_docgen_follows_the_parser() -> None:
    """A new option or command shows up in every output (so the up-to-date test bites)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["push"].add_argument("--frobnicate", metavar="LEVEL", help="frob harder")
    new = sub.add_parser("zap", help="Zap an image.")
    new.add_argument("image", metavar="IMAGE")
    sub._choices_actions[-1].help = "Zap an image."
    for kind in docgen.GENERATORS:
        out = docgen.generate(kind, parser)
        assert "frobnicate" in out and "zap" in out, kind
        assert "serve" not in out.replace("served", ""), f"{kind} shows the hidden serve"
    assert "--checkpoint-interval" not in docgen.generate("markdown")


@pytest.mark.process
def test_docgen_cli_entry_point() -> None:
    script = str(ROOT / "scripts" / "docgen.py")
    r = subprocess.run([sys.executable, script, "markdown"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout == docgen.generate("markdown")
    r = subprocess.run([sys.executable, script, "html"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2


@pytest.mark.process
def test_bash_completion_completes() -> None:
    script = (ROOT / docgen.OUTPUTS["bash"]).read_text()
    probe = script + r"""
t() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=(); _diskrsync;
      printf '%s\n' "${COMPREPLY[*]}"; }
t diskrsync pu
t diskrsync push --ch
t diskrsync mount --cache-size 1G x ""
t diskrsync
"""
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd="/",
                       timeout=30)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stderr
    assert lines[0] == "push"
    assert lines[1] == "--chunk-size"
    assert "tmp" in lines[2].split() and "etc" in lines[2].split()  # directories for MOUNTPOINT
    assert all(Path("/", d).is_dir() for d in lines[2].split())


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh not installed")
@pytest.mark.process
def test_zsh_completion_parses() -> None:
    r = subprocess.run(["zsh", "-n", str(ROOT / docgen.OUTPUTS["zsh"])], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.process
def test_man_page_renders() -> None:
    if not shutil.which("groff"):
        pytest.skip("groff not installed")
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / "contrib/diskrsync.1")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@pytest.mark.process
def test_json_summary_fields_used_by_the_metrics_hook_exist() -> None:
    from dataclasses import fields

    names = {f.name for f in fields(PushStats)}
    hook = (ROOT / "contrib" / "diskrsync-metrics").read_text()
    used = set(re.findall(r'"(\w+)"\),?\n', hook)) | set(re.findall(r's\.get\("(\w+)"\)', hook))
    assert used and used <= names, used - names
