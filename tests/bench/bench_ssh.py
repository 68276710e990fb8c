#!/usr/bin/env python3
"""Remote pushes over a loopback sshd this script starts itself, each next to the link's
limit and to the same push done locally, measured in one run (medians, then ratios).

    .venv/bin/python tests/bench/bench_ssh.py --data bench-data [--runs 3]

DIR holds synth.img and synth2.img from /work/shared/bench/gen_synth.py. Cases:

* first: synth.img into a new remote image;
* 1%: synth2.img over an image holding synth.img;
* same: synth.img over an image holding synth.img.

Each is timed as a whole ``diskrsync push`` command (interpreter start-up and the SSH
handshake included), next to ``ssh -c aes128-gcm@openssh.com host 'cat > /dev/null' <
synth.img`` (OpenSSH's own throughput with our cipher: the link's limit) and to the same
push between two local paths. Page cache warm; not a test.

Also measured: one SSH connection set-up of our client (TCP, key exchange, authentication,
a session running ``true`` to its exit status, in this process: paramiko already imported),
and ``ssh host true`` for reference. The issue 16 targets are then checked: a first push at
most 1.3x the larger of the local push and ``ssh cat``; a no-change push at most 1.3x the
local no-change push plus one connection set-up.

``--baseline DIR`` times the pushes of another checkout (with its own .venv, e.g. the commit
before a change) in the same runs, interleaved with this one's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.sshd import SshServer  # noqa: E402

from diskrsync.synccore.location import parse_location  # noqa: E402
from diskrsync.synccore.ssh.config import SshOptions  # noqa: E402
from diskrsync.synccore.ssh.connection import connect  # noqa: E402

CIPHER = "aes128-gcm@openssh.com"


def remote_cmd() -> str:
    exe = REPO / ".venv" / "bin" / "diskrsync"
    return str(exe) if exe.exists() else f"{sys.executable} -m diskrsync.cli"


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


#: sshd's listener pid, once started: its reaped sessions' CPU is the server side's
SERVER: list[int] = []


def _server_cpu() -> float:
    """CPU seconds of sshd's listener and of every session it has reaped (with their
    children: sshd waits for each), 0 before it runs."""
    if not SERVER:
        return 0.0
    pid = SERVER[0]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(  # a session just ended: wait for its reaping
            Path(f"/proc/{e}/stat").exists() and _ppid(e) == pid
            for e in os.listdir("/proc") if e.isdigit()):
        time.sleep(0.01)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], **kw: object) -> tuple[float, dict[str, object]]:
    """Seconds of a whole command and its --json; its CPU seconds, both ends (the client and
    what sshd ran for it), go to CPU[-1]."""
    c0 = _own_cpu() + _server_cpu()
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    elapsed = time.perf_counter() - t
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    CPU.append(_own_cpu() + _server_cpu() - c0)
    stats = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    return elapsed, stats


CPU: list[float] = []


def synced_copy(src: Path, dst: Path) -> None:
    """Copy a prepared image and flush it, so a timed commit flushes only its own writes."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


RSH = " (--rsh ssh)"  # the remote pushes through OpenSSH's client instead of paramiko


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench-data")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, help="scratch dir (default: DATA/ssh-bench)")
    ap.add_argument("--baseline", type=Path, help="another checkout to time alongside")
    ap.add_argument("--rsh", action="store_true",
                    help="also time the remote pushes through the system ssh (--rsh)")
    a = ap.parse_args()
    a.data = a.data.resolve()
    synth, synth2 = a.data / "synth.img", a.data / "synth2.img"
    for f in (synth, synth2):
        if not f.exists():
            sys.exit(f"{f} missing: generate it with /work/shared/bench/gen_synth.py {a.data}")
    work = (a.work or a.data / "ssh-bench").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = [sys.executable, "-m", "diskrsync.cli"]
    trees = {"": (py, remote_cmd())}
    if a.baseline is not None:
        base_py = str(a.baseline.resolve() / ".venv" / "bin" / "python")
        trees[" (baseline)"] = ([base_py, "-m", "diskrsync.cli"],
                                str(a.baseline.resolve() / ".venv" / "bin" / "diskrsync"))
    if a.rsh:
        trees[RSH] = trees[""]
    results: dict[str, dict[str, list[float]]] = {}
    setups: dict[str, list[float]] = {"diskrsync's client": [], "ssh host true": []}
    sent: dict[str, int] = {}
    try:
        warm(synth)
        warm(synth2)
        base = work / "base.spgz"
        timed([*py, "push", str(synth), str(base), "-q"])
        with SshServer(Path(tempfile.mkdtemp(prefix="bench-sshd-"))) as srv:
            assert srv.proc is not None
            SERVER.append(srv.proc.pid)
            srv.write_known_hosts()
            cfg = srv.write_ssh_config(work / "ssh_config",
                                       UserKnownHostsFile=str(srv.known_hosts))
            env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
            ssh = ["ssh", "-F", str(cfg), "-c", CIPHER, "-o", "BatchMode=yes", "testhost"]
            cases = {"first": (synth, None), "1%": (synth2, base), "same": (synth, base)}
            for run in range(a.runs):
                for name, (src, start) in cases.items():
                    r = results.setdefault(name, {"ssh cat": []})
                    for tree, (tpy, tremote) in trees.items():
                        for kind in ("remote", "local"):
                            img = work / f"{kind}.spgz"
                            img.unlink(missing_ok=True)
                            if start is not None:
                                synced_copy(start, img)
                            dst = f"testhost:{img}" if kind == "remote" else str(img)
                            warm(src)  # other users of the machine may drop caches
                            cmd = [*tpy, "push", "--json"]
                            if kind == "remote":
                                cmd += ["-F", str(cfg), "--remote-cmd", tremote]
                                if tree == RSH:
                                    cmd += ["--rsh", f"ssh -F {cfg} -c {CIPHER}"]
                            secs, stats = timed([*cmd, str(src), dst], env=env)
                            r.setdefault(kind + tree, []).append(secs)
                            r.setdefault(f"{kind}{tree} cpu", []).append(CPU[-1])
                            sent[f"{name} {kind}{tree}"] = int(stats.get("bytes_sent", 0))  # type: ignore[call-overload]
                    warm(synth)
                    with open(synth, "rb") as f:
                        secs, _ = timed([*ssh, "cat > /dev/null"], stdin=f, env=env)
                    r["ssh cat"].append(secs)
                    r.setdefault("ssh cat cpu", []).append(CPU[-1])
                setups["diskrsync's client"].append(_setup_time(cfg))
                setups["ssh host true"].append(timed([*ssh, "true"], env=env)[0])
                print(f"run {run + 1}/{a.runs} done", file=sys.stderr)
            cipher = _negotiated(cfg, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = synth.stat().st_size
    print(f"\n2 GiB synth images, loopback sshd, {cipher}, median of {a.runs} "
          f"(whole commands, warm page cache, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end)\n")
    setup = {k: statistics.median(v) for k, v in setups.items()}
    print("SSH connection set-up: " + ", ".join(f"{k} {v:.3f} s" for k, v in setup.items()))
    print()
    print("| case | remote push | local push | ssh cat of synth.img | remote/local "
          "| remote/ssh cat | bytes sent (remote) | issue 16 target | ratio to it |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cat = statistics.median(r["ssh cat"])
        for tree in trees:
            rem, loc = (statistics.median(r[k + tree]) for k in ("remote", "local"))
            goal, limit = _target(name, loc, cat, setup["diskrsync's client"])
            ratio = f"{rem / limit:.2f} ({'met' if rem <= limit else 'missed'})" if limit else ""
            print(f"| {name}{tree} | {rem:.2f} s | {loc:.2f} s | {cat:.2f} s "
                  f"({size / cat / 1e6:.0f} MB/s) | {rem / loc:.2f} | {rem / cat:.2f} "
                  f"| {sent[f'{name} remote{tree}']:,} | {goal} | {ratio} |")
    print("\nCPU seconds per command (both ends: the client, sshd and what it ran), medians:\n")
    print("| case | remote push | local push | ssh cat |")
    print("|---|---|---|---|")
    for name, r in results.items():
        for tree in trees:
            rem, loc, cat = (statistics.median(r[k]) for k in
                             (f"remote{tree} cpu", f"local{tree} cpu", "ssh cat cpu"))
            print(f"| {name}{tree} | {rem:.2f} | {loc:.2f} | {cat:.2f} |")


def _target(case: str, local: float, cat: float, setup: float) -> tuple[str, float]:
    """Issue 16's limit for a case: its words and the seconds (0: none)."""
    if case == "first":
        return f"1.3 x max(local, ssh cat) = {1.3 * max(local, cat):.2f} s", 1.3 * max(local, cat)
    if case == "same":
        return f"1.3 x local + set-up = {1.3 * local + setup:.2f} s", 1.3 * local + setup
    return "", 0.0


def _setup_time(cfg: Path) -> float:
    """One SSH connection set-up of our client: connect, authenticate, run ``true``."""
    loc = parse_location("testhost:/x")
    assert not isinstance(loc, str)
    t = time.perf_counter()
    with connect(loc, SshOptions(ssh_config=cfg, remote_cmd="true")) as c:
        proc = c.run([])
        status = proc.wait(30)
        proc.close()
    if status:
        sys.exit(f"true exited with {status} over ssh")
    return time.perf_counter() - t


def _negotiated(cfg: Path, env: dict[str, str]) -> str:
    """The cipher our paramiko client negotiates with this sshd (it should be gcm too)."""
    loc = parse_location("testhost:/x")
    assert not isinstance(loc, str)
    with connect(loc, SshOptions(ssh_config=cfg)) as c:
        return f"diskrsync cipher {c.cipher}, ssh cat cipher {CIPHER}"


if __name__ == "__main__":
    main()
