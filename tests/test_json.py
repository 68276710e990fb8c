"""``--json``: every command's real output follows the one schema (diskrsync/cli/jsonout.py,
which docs/json.md is generated from), lists are bounded, and a failure still prints an object
on stdout, and nothing else there."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.legacy_vectors import have_vectors
from support.paths import VECTORS

from diskrsync.cli import jsonout
from diskrsync.cli.main import build_parser, main
from diskrsync.compression.image import Image
from diskrsync.synccore.source import target_report

CS = 16 * 1024  # the smallest chunk size: many chunks from few bytes

@pytest.fixture(autouse=True)
def _keep_sigterm() -> Iterator[None]:
    """``main`` installs its SIGTERM handler; leave the test process's as it was."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """Run ``diskrsync ARGV --json``; its whole stdout must be one object of the schema."""
    capsys.readouterr()
    code = main([*argv, "--json"])
    obj = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert jsonout.check(obj) == [], obj
    return code, obj


def disk(path: Path, chunks: int, *, seed: int = 0, every: int = 1) -> None:
    """A disk of ``chunks`` 16 KiB chunks: every ``every``-th random, the others zeros."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for c in range(chunks):
            f.write(rng.randbytes(CS) if c % every == 0 else bytes(CS))


@pytest.fixture
def image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    src, img = tmp_path / "disk.img", tmp_path / "disk.spgz"
    disk(src, 64)
    assert main(["push", "-q", "--chunk-size", "16K", str(src), str(img)]) == 0
    disk(src, 64, seed=1)
    assert main(["push", "-q", str(src), str(img)]) == 0
    return img


# -- each command's object ---------------------------------------------------------------


@pytest.mark.inproc
def test_push_object(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "disk.img"
    disk(src, 64, seed=2)
    code, obj = run_json(capsys, "push", str(src), str(image))
    assert code == 0
    assert obj["src"] == str(src) and obj["dst"] == str(image)
    assert obj["generation"] == 3 and obj["chunks_differing"] == 64
    assert obj["target"]["chunks_written"] == 64
    assert set(obj["phases"]) == {"connect", "compare", "drain", "commit"}
    code, obj = run_json(capsys, "push", "--dry-run", str(src), str(image))
    assert code == 0 and obj["dry_run"] and obj["generation"] is None


@pytest.mark.inproc
def test_push_raw_target(tmp_path: Path, image: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """--raw-target and its old name --no-compress: the same push."""
    for flag in ("--raw-target", "--no-compress"):
        raw = tmp_path / f"raw{flag}"
        code, obj = run_json(capsys, "push", flag, str(image), str(raw))
        assert code == 0 and obj["generation"] is None
        assert raw.read_bytes() == (tmp_path / "disk.img").read_bytes()


@pytest.mark.inproc
def test_info_object(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, obj = run_json(capsys, "info", str(image))
    assert code == 0 and [g["number"] for g in obj["generations"]] == [1, 2]


@pytest.mark.inproc
def test_verify_object(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, obj = run_json(capsys, "verify", str(image))
    assert code == 0 and obj["ok"] and obj["bad_chunks_total"] == 0
    with Image.open(str(image)) as img, img.snapshot() as snap:
        entry = snap.tree.entry(5)
    with open(image, "r+b") as f:
        f.seek(entry.offset + 1)
        f.write(b"\xff\x00\xff")
    code, obj = run_json(capsys, "verify", str(image), "-g", "2")
    assert code == 6 and not obj["ok"] and obj["generation"] == 2
    assert obj["bad_chunks"][0]["chunk"] == 5 and obj["bad_chunks_total"] == 1


@pytest.mark.inproc
def test_restore_object(tmp_path: Path, image: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.img"
    code, obj = run_json(capsys, "restore", "-g", "1", str(image), str(out))
    assert code == 0 and obj["generation"] == 1 and obj["size"] == 64 * CS
    assert obj["dest"] == str(out) and out.stat().st_size == 64 * CS


@pytest.mark.inproc
def test_restore_json_refuses_stdout(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, obj = run_json(capsys, "restore", str(image), "-")
    assert code == 2 and obj["error"]["category"] == "usage"


@pytest.mark.inproc
def test_prune_object(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, obj = run_json(capsys, "prune", "--keep", "1", str(image))
    assert code == 0 and obj["pruned"] == [1] and obj["kept"] == [2]


@pytest.mark.inproc
def test_copy_object(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"repo:{tmp_path / 'repo'}"
    code, obj = run_json(capsys, "copy", str(image), f"{repo}#vm")
    assert code == 0 and obj["copied"] == [1, 2] and obj["bytes_sent"] > 0


@pytest.mark.inproc
def test_repository_objects(tmp_path: Path, image: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """info, verify and prune of a repository print the REPOSITORY variants of the schema
    (restore's object is the image's)."""
    repo = f"repo:{tmp_path / 'repo'}"
    assert main(["copy", "-q", str(image), f"{repo}#vm"]) == 0
    code, obj = run_json(capsys, "info", repo)
    assert code == 0 and "repository" in obj and obj["disks"][0]["name"] == "vm"
    code, obj = run_json(capsys, "verify", f"{repo}#vm")
    assert code == 0 and obj["ok"] and obj["generations"] == 2
    code, obj = run_json(capsys, "restore", f"{repo}#vm", str(tmp_path / "out.raw"))
    assert code == 0 and obj["generation"] == 2
    code, obj = run_json(capsys, "prune", "--keep", "1", repo)
    assert code == 0 and obj["pruned"] == {"vm": [1]} and obj["kept"] == {"vm": [2]}


@pytest.mark.skipif(not have_vectors(), reason="Go vectors not found")
@pytest.mark.inproc
def test_convert_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new.spgz"
    code, obj = run_json(capsys, "convert", str(VECTORS / "a_mixed_1m.diskrsync.spgz"),
                         str(new))
    assert code == 0 and obj["generation"] == 1 and obj["new"] == str(new)


@pytest.mark.inproc
def test_differing_ranges_are_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: differing_ranges grew with the disk (51 KB for a 448 MiB one)."""
    src = tmp_path / "disk.img"
    n = 2 * (jsonout.CAP + 5)  # every other chunk random: CAP + 5 separate ranges
    disk(src, n, every=2)
    code, obj = run_json(capsys, "push", "--chunk-size", "16K", str(src),
                         str(tmp_path / "x.spgz"))
    assert code == 0
    assert len(obj["differing_ranges"]) == jsonout.CAP
    assert obj["differing_ranges_total"] == jsonout.CAP + 5
    assert obj["differing_ranges"][0] == [0, CS]


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "code", "kind"), [
    (["info", "/nonexistent/x.spgz"], 2, "usage"),
    (["push", "--kep", "3", "a", "b"], 2, "usage"),
    (["pusj", "a", "b"], 2, "usage"),
    (["verify"], 2, "usage"),
])
@pytest.mark.inproc
def test_error_object(argv: list[str], code: int, kind: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    got, obj = run_json(capsys, *argv)
    assert got == code
    assert obj["error"]["exit_code"] == code and obj["error"]["category"] == kind
    assert set(obj) == {"version", "command", "error"}


@pytest.mark.inproc
def test_error_object_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    _code, obj = run_json(capsys, "push", "--kep", "3", "a", "b")
    assert obj["command"] == "push"
    assert "did you mean --keep?" in obj["error"]["message"]
    _code, obj = run_json(capsys, "pusj")
    assert obj["command"] is None


@pytest.mark.inproc
def test_error_object_of_a_data_error(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.spgz"
    junk.write_bytes(os.urandom(4096))
    code, obj = run_json(capsys, "verify", str(junk))
    assert code == 6 and obj["error"]["category"] == "data"


# -- the schema itself -------------------------------------------------------------------


def _json_commands() -> set[str]:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name for name, sp in subs.choices.items()
            if any("--json" in a.option_strings for a in sp._actions)}


@pytest.mark.pure
def test_every_json_command_has_a_schema() -> None:
    assert _json_commands() == set(jsonout.COMMANDS)


@pytest.mark.pure
def test_every_schema_has_a_test_of_the_real_output() -> None:
    tested = {"push": test_push_object, "info": test_info_object,
              "verify": test_verify_object, "restore": test_restore_object,
              "prune": test_prune_object, "convert": test_convert_object,
              "copy": test_copy_object}
    assert set(tested) == set(jsonout.COMMANDS)
    repository = {"info", "verify", "prune"}  # test_repository_objects
    assert repository == set(jsonout.REPOSITORY)


@pytest.mark.pure
def test_check_finds_what_is_wrong() -> None:
    good = jsonout.envelope("prune", {"image": "x", "rules": "--keep-last 1", "dry_run": False,
                                      "pruned": [1], "kept": [2], "started": 1.0,
                                      "duration": 0.5})
    assert jsonout.check(good) == []
    assert jsonout.check({**good, "new": 1}) == [".new: not in the schema"]
    assert jsonout.check({**good, "dry_run": "no"}) == [".dry_run: 'no' is not boolean"]
    missing = dict(good)
    del missing["kept"]
    assert jsonout.check(missing) == [".kept: missing"]
    assert jsonout.check({**good, "pruned": list(range(jsonout.CAP + 1))})
    assert jsonout.check({**good, "version": 0})
    bad_error = jsonout.envelope("push", {"error": {"category": "usage", "exit_code": 99,
                                                    "message": "x"}})
    assert jsonout.check(bad_error) == ["error.exit_code: not a documented exit status"]


@pytest.mark.pure
def test_cap() -> None:
    out: dict[str, Any] = {"r": list(range(jsonout.CAP * 2))}
    jsonout.cap(out, "r")
    assert out["r"] == list(range(jsonout.CAP)) and out["r_total"] == 2 * jsonout.CAP


@pytest.mark.pure
def test_target_report_takes_only_what_it_knows() -> None:
    """The target's Committed info is a peer's word: unknown members and wrong types are
    dropped, so they never reach --json or push -v."""
    good = {"path": "/b/x.spgz", "chunks_written": 3, "commit_seconds": 0.25}
    assert target_report({**good, "extra": [1] * 10}) == good
    assert target_report({"path": 7, "chunks_written": True, "commit_seconds": -1.0}) == {}
    assert target_report({"chunks_written": "3", "commit_seconds": "fast"}) == {}
    assert target_report({"chunks_written": 1 << 70, "commit_seconds": float("inf")}) == {}
    assert target_report({"commit_seconds": float("nan")}) == {}
