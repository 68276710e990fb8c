"""The command line on repositories (docs/repository.md, "Naming a repository"): push into
and out of a repository disk, info, verify, restore, prune, copy and mount, on a local
repository directory (``repo:DIR#DISK``, fast) and a few on the real S3 service (Swift)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from support.mounts import MountCleanup
from support.swift import ACCESS_KEY, REGION, SECRET_KEY, SwiftServer

from diskrsync.base.errors import CorruptChunkError, UsageError
from diskrsync.cli import jsonout
from diskrsync.cli.main import main
from diskrsync.compression.crypto import Envelope, KdfParams, Keyring, MasterKey
from diskrsync.compression.image import Image
from diskrsync.compression.objstore import DirStore
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repolocation import parse_repo_location
from diskrsync.compression.repository import RepoDisk, Repository, pack_key
from diskrsync.synccore.channel import channel_pair
from diskrsync.synccore.location import LocalPath, RemotePath, parse_location
from diskrsync.synccore.push import PushRequest, run_target_end


@pytest.fixture(autouse=True)
def _keep_sigterm() -> Iterator[None]:
    """``main`` installs its SIGTERM handler; leave the test process's as it was."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def disk(path: Path, chunks: int, *, seed: int = 0, every: int = 2) -> bytes:
    """A disk of ``chunks`` 128 KiB chunks: every ``every``-th random, the others zeros."""
    rng = random.Random(seed)
    data = b"".join(rng.randbytes(128 * 1024) if c % every == 0 else bytes(128 * 1024)
                    for c in range(chunks))
    path.write_bytes(data)
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code, out = run(capsys, *argv, "--json")
    obj = json.loads(out)
    assert jsonout.check(obj) == [], obj
    return code, obj


# -- naming --------------------------------------------------------------------------------


@pytest.mark.pure
def test_locations_parse() -> None:
    loc = parse_repo_location("s3://bucket/some/prefix#vm1")
    assert loc is not None and (loc.store, loc.disk, loc.is_s3) == (
        "s3://bucket/some/prefix", "vm1", True)
    loc = parse_repo_location("repo:/srv/a#b/repo#vm-2.x")
    assert loc is not None and (loc.store, loc.disk) == ("/srv/a#b/repo", "vm-2.x")
    loc = parse_repo_location("repo:backups")
    assert loc is not None and (loc.store, loc.disk) == ("backups", None)
    assert parse_repo_location("disk#1.spgz") is None  # an image path keeps its meaning
    assert parse_repo_location("host:repo#x") is None
    for bad in ("s3://#vm", "repo:#vm", "repo:dir#", "s3://b/p#../x", "repo:d#a/b"):
        with pytest.raises(UsageError):
            parse_repo_location(bad)


@pytest.mark.pure
def test_repository_locations_are_local_not_ssh_hosts() -> None:
    assert parse_location("repo:dir#vm") == LocalPath("repo:dir#vm")
    assert parse_location("s3://b/p#vm") == LocalPath("s3://b/p#vm")
    assert isinstance(parse_location("repohost:dir"), RemotePath)


# -- a local repository directory ----------------------------------------------------------


@pytest.mark.inproc
def test_push_info_restore_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    data_a, data_b = disk(a, 24), disk(b, 24, seed=1)
    repo = f"repo:{tmp_path / 'repo'}"  # created by the first push
    assert run(capsys, "push", "-q", str(a), f"{repo}#vm1")[0] == 0
    assert run(capsys, "push", "-q", str(b), f"{repo}#vm1")[0] == 0
    assert run(capsys, "push", "-q", str(a), f"{repo}#vm2")[0] == 0  # deduplicated
    code, again = run_json(capsys, "push", str(b), f"{repo}#vm1")  # nothing changed
    assert code == 0 and again["unchanged"] and again["generation"] == 2
    code, info = run_json(capsys, "info", repo)
    assert code == 0 and info["command"] == "info"
    disks = {d["name"]: [g["number"] for g in d["generations"]]
             for d in info["disks"]}  # type: ignore[attr-defined]
    assert disks == {"vm1": [1, 2], "vm2": [1]}
    assert info["logical_bytes"] == 3 * 12 * 128 * 1024
    # vm2 cost nothing: the repository holds 24 distinct random chunks, not 36
    stored = Repository.open(DirStore(str(tmp_path / "repo"))).index()
    assert sum(1 for loc in stored.values() if loc.type == 0) == 24
    code, text = run(capsys, "info", f"{repo}#vm2")
    assert code == 0 and "disk vm2:" in text and "vm1" not in text
    out = tmp_path / "out.raw"
    assert run(capsys, "restore", "-q", "-g", "1", f"{repo}#vm1", str(out))[0] == 0
    assert out.read_bytes() == data_a
    assert run(capsys, "restore", "-q", "--force", f"{repo}#vm1", str(out))[0] == 0
    assert out.read_bytes() == data_b
    code, report = run_json(capsys, "verify", repo)
    assert code == 0 and report["ok"] and report["generations"] == 3


@pytest.mark.inproc
def test_push_out_of_a_repository_into_an_image(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.raw"
    data = disk(a, 16)
    repo = f"repo:{tmp_path / 'repo'}"
    assert run(capsys, "push", "-q", str(a), f"{repo}#vm")[0] == 0
    img = tmp_path / "vm.spgz"
    assert run(capsys, "push", "-q", f"{repo}#vm", str(img))[0] == 0
    with Image.open(str(img)) as image, image.snapshot() as snap:
        assert snap.read(0, snap.size) == data
    # the generation's root is the same in both: the trees are the same
    info = Repository.open(DirStore(str(tmp_path / "repo"))).generation("vm")
    with Image.open(str(img)) as image:
        assert image.generations()[-1].root_hash == info.root


@pytest.mark.inproc
def test_verify_names_the_generations_a_damaged_pack_affects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.raw"
    disk(a, 8)
    repo = f"repo:{tmp_path / 'repo'}"
    assert run(capsys, "push", "-q", str(a), f"{repo}#vm")[0] == 0
    r = Repository.open(DirStore(str(tmp_path / "repo")))
    pack = next(iter({loc.pack for loc in r.index().values()}))
    path = tmp_path / "repo" / pack_key(pack)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(raw)
    code, report = run_json(capsys, "verify", f"{repo}#vm")
    assert code == 6 and not report["ok"]
    assert [(x["disk"], x["generation"]) for x in report["affected"]] == [  # type: ignore[attr-defined]
        ("vm", 1)]


@pytest.mark.inproc
def test_prune_applies_retention_per_disk_and_collects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"repo:{tmp_path / 'repo'}"
    for seed in range(3):
        a = tmp_path / f"{seed}.raw"
        disk(a, 8, seed=seed)
        assert run(capsys, "push", "-q", str(a), f"{repo}#vm")[0] == 0
    assert run(capsys, "push", "-q", str(tmp_path / "0.raw"), f"{repo}#other")[0] == 0
    code, dry = run_json(capsys, "prune", "--dry-run", "--keep-last", "1", repo)
    assert code == 0 and dry["dry_run"] and dry["pruned"] == {"vm": [1, 2], "other": []}
    r = Repository.open(DirStore(str(tmp_path / "repo")))
    assert [g.number for g in r.generations("vm")] == [1, 2, 3]  # nothing changed
    code, text = run(capsys, "prune", "--keep-last", "1", f"{repo}#vm")
    assert code == 0 and "prune generation(s) 1, 2" in text
    assert [g.number for g in r.generations("vm")] == [3]
    assert [g.number for g in r.generations("other")] == [1]
    code, _ = run(capsys, "verify", repo)
    assert code == 0
    # generation 1 of vm is what "other" holds: it can still be restored from there
    out = tmp_path / "out.raw"
    assert run(capsys, "restore", "-q", f"{repo}#other", str(out))[0] == 0
    assert out.read_bytes() == (tmp_path / "0.raw").read_bytes()


@pytest.mark.inproc
def test_copy_image_to_repository_to_repository(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "vm.spgz"
    datas = []
    for seed in range(2):
        a = tmp_path / f"{seed}.raw"
        datas.append(disk(a, 8, seed=seed))
        assert run(capsys, "push", "-q", "--keep-last", "5", str(a), str(img))[0] == 0
    one, two = f"repo:{tmp_path / 'one'}", f"repo:{tmp_path / 'two'}"
    code, out = run_json(capsys, "copy", str(img), f"{one}#vm")
    assert code == 0 and out["copied"] == [1, 2] and out["skipped"] == 0
    code, out = run_json(capsys, "copy", str(img), f"{one}#vm")
    assert code == 0 and out["copied"] == [] and out["skipped"] == 2
    code, out = run_json(capsys, "copy", f"{one}#vm", f"{two}#offsite")
    assert code == 0 and out["copied"] == [1, 2]
    with Image.open(str(img)) as image:
        times = [g.commit_time for g in image.generations()]
    r = Repository.open(DirStore(str(tmp_path / "two")))
    assert [r.manifest(g).time for g in r.generations("offsite")] == times
    for number, data in enumerate(datas, 1):
        out_file = tmp_path / f"r{number}.raw"
        assert run(capsys, "restore", "-q", "-g", str(number), f"{two}#offsite",
                   str(out_file))[0] == 0
        assert out_file.read_bytes() == data
    # and back out into an image: every generation, once
    back = tmp_path / "back.spgz"
    code, out = run_json(capsys, "copy", f"{two}#offsite", str(back))
    assert code == 0 and out["copied"] == [1, 2]
    code, out = run_json(capsys, "copy", f"{two}#offsite", str(back))
    assert code == 0 and out["copied"] == [] and out["skipped"] == 2
    with Image.open(str(back)) as image, Image.open(str(img)) as original:
        assert [g.source for g in image.generations()] == [
            g.source for g in original.generations()]
        for g, data in zip(image.generations(), datas, strict=True):
            with image.snapshot(g.number) as snap:
                assert snap.read(0, snap.size) == data


@pytest.mark.inproc
@pytest.mark.parametrize("argv", [
    ["push", "{a}", "repo:{t}/repo"],  # no disk
    ["push", "--raw-target", "{a}", "repo:{t}/repo#vm"],
    ["push", "{a}", "repo:{t}/no/such/parent#vm"],
    ["push", "{a}", "repo:{t}#vm"],  # a directory with other files, no repository
    ["restore", "repo:{t}/repo", "{t}/x.raw"],
    ["info", "repo:{t}/none"],
    ["copy", "{a}", "{t}/x.spgz"],  # two images: that is push
    ["copy", "repo:{t}/repo#vm", "{t}/x.spgz"],  # no such disk
    ["mount", "repo:{t}/repo", "{t}"],
    ["mount", "--cache-dir", "{t}", "{a}", "{t}"],
    ["verify", "--repair", "repo:{t}/repo"],
])
def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      argv: list[str]) -> None:
    a = tmp_path / "a.raw"
    disk(a, 2)
    (tmp_path / "repo").mkdir()
    Repository.init(DirStore(str(tmp_path / "repo")))
    code, _ = run(capsys, *(x.format(a=a, t=tmp_path) for x in argv))
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.process
def test_a_pull_writes_into_a_local_repository(tmp_path: Path) -> None:
    """The local end of a pull is the repository's writer; the far end is reached through
    a --rsh stand-in that runs the remote command on this machine."""
    a = tmp_path / "a.raw"
    data = disk(a, 8)
    rsh = tmp_path / "rsh"
    rsh.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nshift\n'
                   'exec sh -c "$*"\n')
    rsh.chmod(0o755)
    me = Path(sys.executable).parent / "diskrsync"
    repo = f"repo:{tmp_path / 'repo'}"
    r = cli(_env(), "push", "-q", "--rsh", rsh, "--remote-cmd", me, f"somehost:{a}",
            f"{repo}#vm")
    assert r.returncode == 0, r.stderr
    m = Repository.open(DirStore(str(tmp_path / "repo"))).generation("vm")
    assert m.source == f"somehost:{a}"
    out = tmp_path / "out.raw"
    assert cli(_env(), "restore", "-q", f"{repo}#vm", out).returncode == 0
    assert out.read_bytes() == data


# -- the real S3 service ---------------------------------------------------------------------


def _env(srv: SwiftServer | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONSAFEPATH="1", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE="/nonexistent/diskrsync-tests",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent/diskrsync-tests")
    if srv is not None:
        env["AWS_ENDPOINT_URL"] = srv.endpoint
    return env


def cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskrsync.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env, cwd="/")


@pytest.mark.process
def test_s3_push_restore_prune_copy(tmp_path: Path, swift: SwiftServer) -> None:
    a = tmp_path / "a.raw"
    data = disk(a, 24)
    bucket = swift.new_bucket()
    where = f"s3://{bucket}/backups"
    env = _env()
    r = cli(env, "push", "-q", "--s3-endpoint", swift.endpoint, a, f"{where}#vm")
    assert r.returncode == 0, r.stderr
    env = _env(swift)  # the endpoint from the environment, as AWS tools take it
    assert cli(env, "push", "-q", "--always-new-generation", a, f"{where}#vm").returncode == 0
    out = tmp_path / "out.raw"
    r = cli(env, "restore", "-q", f"{where}#vm", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    r = cli(env, "prune", "--keep-last", "1", "--json", where)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pruned"] == {"vm": [1]}
    r = cli(env, "copy", f"{where}#vm", f"repo:{tmp_path / 'local'}#vm")
    assert r.returncode == 0, r.stderr
    r = cli(env, "verify", f"repo:{tmp_path / 'local'}")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.process
def test_s3_errors_exit_2_with_what_to_check(tmp_path: Path, swift: SwiftServer) -> None:
    a = tmp_path / "a.raw"
    disk(a, 2)
    env = _env(swift)
    r = cli(env, "push", "-q", a, "s3://no-such-bucket-here/x#vm")
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    bad = dict(env, AWS_SECRET_ACCESS_KEY="wrong")
    r = cli(bad, "push", "-q", a, f"s3://{swift.new_bucket()}/x#vm")
    assert r.returncode == 2 and "credentials" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.process
@pytest.mark.fuse
@pytest.mark.slow
def test_mount_a_disk_from_s3_with_a_blob_cache(tmp_path: Path, swift: SwiftServer) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    a = tmp_path / "a.raw"
    data = disk(a, 24)
    where = f"s3://{swift.new_bucket()}/r#vm"
    env = _env(swift)
    assert cli(env, "push", "-q", a, where).returncode == 0
    mp, cache = tmp_path / "mnt", tmp_path / "cache"
    mp.mkdir()
    done = MountCleanup(tmp_path)
    done.fuse.append(mp)
    try:
        r = cli(env, "mount", where, mp, "--cache-dir", cache, "--cache-size", "64M",
                "--log-file", tmp_path / "mount.log")
        assert r.returncode == 0, r.stderr
        assert (mp / "disk.raw").read_bytes() == data
        assert any(cache.rglob("*"))  # fetched blobs were kept
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        done.cleanup()


# -- what is refused, and encrypted repositories -----------------------------------------------


@pytest.mark.inproc
def test_over_ssh_and_dry_run_are_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.raw"
    disk(a, 2)
    repo = tmp_path / "repo"
    for argv in (["push", str(a), f"somehost:repo:{repo}#vm"],  # no SSH is started
                 ["push", f"somehost:repo:{repo}#vm", str(tmp_path / "x.spgz")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "not supported" in err or "cannot" in err, err
    assert not repo.exists() or not any((repo / "disks").glob("*"))
    # the remote end (serve --target) refuses a repository too: its credentials and paths
    # are not the client's to choose
    with pytest.raises(UsageError, match="not a target over SSH"):
        run_target_end(channel_pair()[1], f"repo:{repo}#vm", PushRequest())


def _tree(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


@pytest.mark.inproc
def test_a_dry_run_into_a_repository_compares_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`push --dry-run SRC REPO#DISK` says what a push would send and leaves the store as it
    was: no pack, no index, no manifest, no lock. (It was refused as not supported.)"""
    a = tmp_path / "a.raw"
    data = bytearray(disk(a, 8))
    repo = tmp_path / "repo"
    # nothing to compare with: nothing made
    assert run(capsys, "push", "--dry-run", str(a), f"repo:{repo}#vm")[0] == 2
    assert not repo.exists()
    assert run(capsys, "push", "-q", str(a), f"repo:{repo}#vm")[0] == 0
    data[3 * 128 * 1024 + 5] ^= 1
    a.write_bytes(data)
    before = _tree(repo)
    code, dry = run_json(capsys, "push", "--dry-run", str(a), f"repo:{repo}#vm")
    assert code == 0 and dry["dry_run"] is True and dry["chunks_differing"] == 1, dry
    code, other = run_json(capsys, "push", "--dry-run", str(a), f"repo:{repo}#other")
    # the random half and the changed chunk (zeros cost nothing); compared with that disk only
    assert code == 0 and other["chunks_differing"] == 5
    assert _tree(repo) == before
    assert [g.number for g in Repository.open(DirStore(str(repo))).generations("vm")] == [1]
    # the real push then sends what the dry run said
    code, real = run_json(capsys, "push", str(a), f"repo:{repo}#vm")
    assert code == 0 and real["chunks_differing"] == 1 and real["generation"] == 2


def _encrypted_repo(tmp_path: Path, a: Path, chunks: int,
                    monkeypatch: pytest.MonkeyPatch) -> tuple[str, MasterKey, bytes]:
    """repo:DIR of an encrypted repository (passphrase "a long passphrase") whose disk vm
    holds ``a``, a disk of ``chunks`` chunks; no passphrase in the environment."""
    data = disk(a, chunks)
    (tmp_path / "repo").mkdir()
    key = MasterKey.generate()
    r = Repository.init(DirStore(str(tmp_path / "repo")), key=key,
                        envelope=Envelope.wrap(key, b"a long passphrase", KdfParams(1024, 1, 1)))
    write_disk(r, "vm", lambda o, n: data[o : o + n], len(data))
    monkeypatch.delenv("DISKRSYNC_PASSPHRASE", raising=False)
    return f"repo:{tmp_path / 'repo'}", key, data


@pytest.mark.inproc
def test_an_encrypted_repository_key_is_shown_and_exported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`key show` and `key export` take a repository (its key could not be exported: the
    passphrase was its only copy outside the store); the export is checked first and
    opens the repository in place of its own copy."""
    a = tmp_path / "a.raw"
    repo, key, data = _encrypted_repo(tmp_path, a, 4, monkeypatch)
    code, shown = run(capsys, "key", "show", repo)
    doc = json.loads(shown)
    assert code == 0 and doc["key_id"] == key.key_id.hex() and doc["key_in_repository"]
    wrong, pw = tmp_path / "wrong", tmp_path / "pw"
    wrong.write_text("not the passphrase\n")
    pw.write_text("a long passphrase\n")
    exported = tmp_path / "key.json"
    assert run(capsys, "key", "export", "--passphrase-file", str(wrong), repo,
               str(exported))[0] == 2
    assert not exported.exists()
    assert run(capsys, "key", "export", "--passphrase-file", str(pw), repo,
               str(exported))[0] == 0
    assert Envelope.decode(exported.read_bytes()).key_id == key.key_id
    out = tmp_path / "out.raw"
    assert run(capsys, "restore", "-q", "--key-file", str(exported), "--passphrase-file",
               str(pw), f"{repo}#vm", str(out))[0] == 0
    assert out.read_bytes() == data
    # import and change-passphrase are for images: a repository's config is written once
    for argv in (["key", "import", "--passphrase-file", str(pw), repo, str(exported)],
                 ["key", "change-passphrase", "--passphrase-file", str(pw), repo]):
        capsys.readouterr()
        assert main(argv) == 2
        assert "written once" in capsys.readouterr().err


@pytest.mark.inproc
def test_a_dry_run_into_an_encrypted_repository_is_refused_before_its_passphrase(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal is what the config says: no passphrase is asked for (or demanded, without
    a terminal) only to be told a dry run is not supported. (Without a passphrase source
    it failed on the passphrase instead.)"""
    a = tmp_path / "a.raw"
    repo, _key, _data = _encrypted_repo(tmp_path, a, 2, monkeypatch)
    before = _tree(tmp_path / "repo")
    capsys.readouterr()
    assert main(["push", "--dry-run", str(a), f"{repo}#vm"]) == 2
    err = capsys.readouterr().err
    assert "dry run into an encrypted repository is not supported" in err, err
    assert _tree(tmp_path / "repo") == before


@pytest.mark.inproc
def test_an_encrypted_repository_is_read_with_the_key_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.raw"
    repo, _key, data = _encrypted_repo(tmp_path, a, 8, monkeypatch)
    pw = tmp_path / "pw"
    pw.write_text("a long passphrase\n")
    out = tmp_path / "out.raw"
    assert run(capsys, "restore", "-q", "--passphrase-file", str(pw), f"{repo}#vm",
               str(out))[0] == 0
    assert out.read_bytes() == data
    monkeypatch.setenv("DISKRSYNC_PASSPHRASE", "a long passphrase")
    code, info = run_json(capsys, "info", repo)
    assert code == 0 and info["encrypted"]
    assert run(capsys, "verify", repo)[0] == 0
    monkeypatch.setenv("DISKRSYNC_PASSPHRASE", "the wrong passphrase")
    assert run(capsys, "restore", "-q", "--force", f"{repo}#vm", str(out))[0] != 0
    # a push seals into it on this end: equal content makes no generation, new content one
    monkeypatch.setenv("DISKRSYNC_PASSPHRASE", "a long passphrase")
    code, pushed = run_json(capsys, "push", str(a), f"{repo}#vm")
    assert code == 0 and pushed["unchanged"] and pushed["generation"] == 1
    b = tmp_path / "b.raw"
    data_b = disk(b, 8, seed=5)
    code, pushed = run_json(capsys, "push", str(b), f"{repo}#vm")
    assert code == 0 and pushed["generation"] == 2 and not pushed["unchanged"]
    assert run(capsys, "restore", "-q", "--force", f"{repo}#vm", str(out))[0] == 0
    assert out.read_bytes() == data_b
    monkeypatch.delenv("DISKRSYNC_PASSPHRASE")
    code, pruned = run_json(capsys, "prune", "--keep-last", "1", "--passphrase-file", str(pw),
                            repo)
    assert code == 0 and pruned["pruned"] == {"vm": [1]}
    monkeypatch.setenv("DISKRSYNC_PASSPHRASE", "a long passphrase")
    # a pull (the remote's far end cannot seal for it) into an encrypted repository: refused
    capsys.readouterr()
    with pytest.raises(UsageError, match="encrypted"):
        run_target_end(channel_pair()[1], f"{repo}#vm", PushRequest(), repositories=True)
    # copy goes through the repository's own codec: into it and out of it to a plain one
    img = tmp_path / "img.spgz"
    assert run(capsys, "push", "-q", str(a), str(img))[0] == 0
    assert run(capsys, "copy", "-q", str(img), f"{repo}#fromimage")[0] == 0
    plain = f"repo:{tmp_path / 'plain'}"
    assert run(capsys, "copy", "-q", f"{repo}#fromimage", f"{plain}#vm")[0] == 0
    assert run(capsys, "restore", "-q", "--force", f"{plain}#vm", str(out))[0] == 0
    assert out.read_bytes() == data


@pytest.mark.inproc
def test_push_encrypt_makes_an_encrypted_repository(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.raw"
    data = disk(a, 8)
    monkeypatch.setenv("DISKRSYNC_KDF", "1024,1,1")
    monkeypatch.setenv("DISKRSYNC_PASSPHRASE", "a long passphrase")
    repo = f"repo:{tmp_path / 'secret'}"
    capsys.readouterr()
    assert main(["push", "-q", "--encrypt", str(a), f"{repo}#vm"]) == 0
    assert "keep the passphrase" in capsys.readouterr().err
    raw = b"".join(p.read_bytes() for p in (tmp_path / "secret").rglob("*") if p.is_file())
    assert data[:4096] not in raw
    assert run(capsys, "push", "-q", str(a), f"{repo}#other")[0] == 0  # deduplicated
    r = Repository.open(DirStore(str(tmp_path / "secret")),
                        Keyring(lambda why, new: b"a long passphrase"))
    assert sum(1 for loc in r.index().values() if loc.type == 0) == 4
    out = tmp_path / "out.raw"
    assert run(capsys, "restore", "-q", f"{repo}#other", str(out))[0] == 0
    assert out.read_bytes() == data
    monkeypatch.delenv("DISKRSYNC_PASSPHRASE")
    assert run(capsys, "push", "-q", "--passphrase-file", "/nonexistent", str(a),
               f"{repo}#vm")[0] == 2


@pytest.mark.inproc
def test_copy_encrypt_makes_an_encrypted_repository(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.raw"
    data = disk(a, 8)
    img = tmp_path / "img.spgz"
    assert run(capsys, "push", "-q", str(a), str(img))[0] == 0
    monkeypatch.setenv("DISKRSYNC_KDF", "1024,1,1")  # a fast Argon2id for the test
    monkeypatch.setenv("DISKRSYNC_PASSPHRASE", "a long passphrase")
    secret = f"repo:{tmp_path / 'secret'}"
    assert run(capsys, "copy", "-q", "--encrypt", str(img), f"{secret}#vm")[0] == 0
    r = Repository.open(DirStore(str(tmp_path / "secret")),
                        Keyring(lambda why, new: b"a long passphrase"))
    assert r.config.encryption is not None
    # the store holds no chunk in the clear
    raw = b"".join(p.read_bytes() for p in (tmp_path / "secret").rglob("*") if p.is_file())
    assert data[:4096] not in raw
    out = tmp_path / "out.raw"
    assert run(capsys, "restore", "-q", f"{secret}#vm", str(out))[0] == 0
    assert out.read_bytes() == data
    monkeypatch.delenv("DISKRSYNC_PASSPHRASE")
    assert run(capsys, "copy", "-q", "--encrypt", str(img), f"repo:{tmp_path / 'p'}#vm",
               "--passphrase-file", "/nonexistent")[0] == 2
    plain = f"repo:{tmp_path / 'plain'}"
    assert run(capsys, "copy", "-q", str(img), f"{plain}#vm")[0] == 0
    capsys.readouterr()
    assert main(["copy", "-q", "--encrypt", str(img), f"{plain}#other"]) == 2
    assert "plain repository" in capsys.readouterr().err


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.2, 0.35, 0.5, 0.7])
def test_copy_killed_then_run_again_completes(tmp_path: Path, delay: float) -> None:
    """SIGKILL of `copy` at some point: nothing half-visible, and the next run finishes
    the job (the generations already written are skipped) and verify passes."""
    img = tmp_path / "vm.spgz"
    for seed in range(3):
        a = tmp_path / f"{seed}.raw"
        disk(a, 320, seed=seed, every=1)
        assert cli(_env(), "push", "-q", "--keep-last", "5", a, img).returncode == 0
    repo = f"repo:{tmp_path / 'repo'}"
    proc = subprocess.Popen([sys.executable, "-m", "diskrsync.cli", "copy", "-q", str(img),
                             f"{repo}#vm"], env=_env(), cwd="/", stderr=subprocess.DEVNULL)
    try:
        proc.wait(delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    if (tmp_path / "repo").exists() and (tmp_path / "repo" / "config").exists():
        r = cli(_env(), "verify", repo)  # what is visible is whole
        assert r.returncode == 0, r.stdout + r.stderr
    r = cli(_env(), "copy", "--json", img, f"{repo}#vm")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["copied"]) + out["skipped"] == 3
    r = cli(_env(), "verify", repo)
    assert r.returncode == 0, r.stdout + r.stderr
    restored = tmp_path / "out.raw"
    assert cli(_env(), "restore", "-q", f"{repo}#vm", restored).returncode == 0
    assert restored.read_bytes() == (tmp_path / "2.raw").read_bytes()


@pytest.mark.inproc
def test_a_damaged_pack_fails_only_its_chunks_as_a_mount_reads_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the mount reads through (RepoDisk, as `diskrsync mount REPO#DISK` opens it):
    a chunk whose stored bytes were damaged in its pack is a CorruptChunkError, which the
    FUSE adapter answers with EIO (fsmount/fuse.py), and every other chunk reads right."""
    a = tmp_path / "a.raw"
    data = disk(a, 8)
    repo = f"repo:{tmp_path / 'repo'}"
    assert run(capsys, "push", "-q", str(a), f"{repo}#vm")[0] == 0
    r = Repository.open(DirStore(str(tmp_path / "repo")))
    pack = next(iter({loc.pack for loc in r.index().values()}))
    path = tmp_path / "repo" / pack_key(pack)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(raw)
    failed = []
    with closing(RepoDisk(Repository.open(DirStore(str(tmp_path / "repo"))), "vm")) as view, \
            closing(view.snapshot()) as snap:
        cs = snap.chunk_size
        for c in range(snap.chunk_count):
            try:
                got = snap.read_chunk(c)
            except CorruptChunkError as e:
                assert e.chunk == c and e.offset == c * cs
                failed.append(c)
                continue
            assert got == data[c * cs : (c + 1) * cs]
    assert len(failed) == 1
