"""Retention (issue 15): the --keep-* rules as a pure function, their use by commits, prune
and the forced-command server's floor, and pushes that change nothing (no generation used).

The rules' semantics are restic's (see diskrsync/base/retention.py and the user guide's
"Generations and retention"); the hypothesis tests compare ``select`` with a model written
the other way round (group by period first, then take the newest periods) and check the
properties the server's floor relies on (a larger policy keeps a superset; the union of two
policies keeps exactly what either keeps).
"""

from __future__ import annotations

import calendar
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.imagetools import cli

from diskrsync.base.retention import PERIODS, Retention, select
from diskrsync.base.units import parse_duration
from diskrsync.cli.requests import retention
from diskrsync.cli.serve import KEEP_ALL, _parse_request, apply_retention
from diskrsync.compression.image import Image
from diskrsync.compression.maintenance import verify
from diskrsync.compression.targets import ImageStore, TargetOptions
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.remote import _target_argv
from diskrsync.synccore.source import SourceOptions

CS = 16 * 1024
UTC = time.gmtime  # the pure tests' "local time": the same on every machine


def ts(text: str) -> float:
    """A UTC time ``YYYY-MM-DD HH:MM`` as seconds."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


def kept(gens: list[tuple[int, float]], policy: Retention) -> set[int]:
    return {v.number for v in select(gens, policy, localtime=UTC) if v.kept}


# -- the pure function -----------------------------------------------------------------------

generations_st = st.lists(
    st.tuples(st.integers(1, 10_000), st.floats(1.5e9, 1.9e9, allow_nan=False)),
    max_size=40, unique_by=lambda g: g[0])
policy_st = st.builds(
    Retention, last=st.integers(0, 6), hourly=st.integers(0, 6), daily=st.integers(0, 6),
    weekly=st.integers(0, 6), monthly=st.integers(0, 6), yearly=st.integers(0, 3),
    within=st.sampled_from([0.0, 3600.0, 86400.0, 30 * 86400.0]))


def model(gens: list[tuple[int, float]], policy: Retention) -> set[int]:
    """What each rule keeps, computed period by period."""
    if not gens:
        return set()
    out = {max(n for n, _t in gens)}
    out |= {n for n, _t in sorted(gens, reverse=True)[: policy.last]}
    newest = max(t for _n, t in gens)
    if policy.within:
        out |= {n for n, t in gens if t >= newest - policy.within}
    for rule, period_of in PERIODS.items():
        groups: dict[tuple[int, ...], list[tuple[float, int]]] = {}
        for n, t in gens:
            groups.setdefault(period_of(UTC(t)), []).append((t, n))
        latest = sorted(groups.values(), key=max, reverse=True)[: getattr(policy, rule)]
        out |= {max(group)[1] for group in latest}
    return out


@pytest.mark.pure
@settings(max_examples=300, deadline=None)
@given(generations_st, policy_st)
def test_select_matches_the_period_model(gens, policy):
    verdicts = select(gens, policy, localtime=UTC)
    assert [(v.number, v.time) for v in verdicts] == gens  # same order, one each
    assert {v.number for v in verdicts if v.kept} == model(gens, policy)
    if gens:
        newest = max(n for n, _t in gens)
        assert "newest" in next(v for v in verdicts if v.number == newest).reasons


@pytest.mark.pure
@settings(max_examples=200, deadline=None)
@given(generations_st, policy_st, policy_st)
def test_union_keeps_what_either_keeps_and_larger_keeps_more(gens, a, b):
    """The server's floor rests on these: raising any number never drops a generation, and
    the union of the client's and the server's policy keeps exactly both sets."""
    assert kept(gens, a.union(b)) == kept(gens, a) | kept(gens, b)
    assert kept(gens, a) <= kept(gens, a.union(b))
    assert a.union(b).covers(a) and a.union(b).covers(b)


@pytest.mark.pure
def test_each_rule_on_a_month_of_backups():
    """Four pushes a day for 40 days (06:00, 12:00, 18:00, 23:00 UTC), numbered in order."""
    gens: list[tuple[int, float]] = []
    for day in range(40):
        for hour in (6, 12, 18, 23):
            t = ts("2026-01-01 00:00") + day * 86400 + hour * 3600
            gens.append((len(gens) + 1, t))
    newest = len(gens)
    assert kept(gens, Retention()) == {newest}
    assert kept(gens, Retention(last=3)) == {newest, newest - 1, newest - 2}
    # the 23:00 push of each of the last 7 days
    assert kept(gens, Retention(daily=7)) == {newest - 4 * k for k in range(7)}
    # 2026-02-09 is the newest day (a Monday): its week holds one day, then whole weeks
    # ending on Sundays: 2026-02-08, -02-01, ...
    weekly = select(gens, Retention(weekly=3), localtime=UTC)
    chosen = [v for v in weekly if v.kept]
    assert [time.strftime("%Y-%m-%d %H", UTC(v.time)) for v in chosen] == [
        "2026-02-01 23", "2026-02-08 23", "2026-02-09 23"]
    assert [r for v in chosen for r in v.reasons if r.startswith("weekly")] == [
        "weekly 2026-W05 (3/3)", "weekly 2026-W06 (2/3)", "weekly 2026-W07 (1/3)"]
    assert kept(gens, Retention(monthly=5)) == {31 * 4, newest}  # only two months hold any
    assert kept(gens, Retention(within=36 * 3600)) == set(range(newest - 6, newest + 1))
    # rules combine as a union, a generation may fill a slot of several rules
    both = select(gens, Retention(last=2, daily=2), localtime=UTC)
    assert [v.reasons for v in both if v.kept] == [
        ("daily 2026-02-08 (2/2)",),
        ("last 2/2",),
        ("newest", "last 1/2", "daily 2026-02-09 (1/2)")]


@pytest.mark.pure
def test_periods_follow_the_given_local_time():
    """Two pushes an hour apart either side of UTC midnight are one day in UTC-5."""
    gens = [(1, ts("2026-03-10 23:30")), (2, ts("2026-03-11 00:30"))]
    assert kept(gens, Retention(daily=2)) == {1, 2}

    def utc_minus_5(t: float) -> time.struct_time:
        return time.gmtime(t - 5 * 3600)

    assert {v.number for v in select(gens, Retention(daily=2), localtime=utc_minus_5)
            if v.kept} == {2}


@pytest.mark.pure
def test_a_clock_that_went_back_keeps_the_newest_by_number():
    gens = [(1, ts("2026-03-10 12:00")), (2, ts("2026-03-09 12:00"))]  # 2 committed after 1
    assert kept(gens, Retention()) == {2}
    assert kept(gens, Retention(last=1)) == {2}
    assert kept(gens, Retention(daily=1)) == {1, 2}  # 1 is the newest of the newest day


@pytest.mark.pure
def test_policy_options_round_trip():
    policy = Retention(last=3, daily=7, weekly=4, within=7 * 86400)
    assert policy.options() == ["--keep-last", "3", "--keep-daily", "7", "--keep-weekly", "4",
                                "--keep-within", "7d"]
    ns = _parse_request("diskrsync serve --target /b/x.spgz " + " ".join(policy.options()))
    assert retention(ns) == policy
    with pytest.raises(ValueError):
        Retention(daily=-1)


@pytest.mark.pure
@pytest.mark.parametrize("text,seconds", [
    ("90", 90), ("90s", 90), ("5min", 300), ("36h", 36 * 3600), ("7d", 7 * 86400),
    ("2w", 14 * 86400), ("1y6m", 365 * 86400 + 180 * 86400), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.pure
@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "7d3", "1e9y", "seven days"])
def test_bad_durations(text):
    with pytest.raises(Exception, match="not a duration"):
        parse_duration(text)


# -- the server's floor (forced command) ----------------------------------------------------


@pytest.mark.pure
def test_server_rules_are_a_floor_under_any_client_rules(capsys):
    """A restricted key cannot erase what the server's rules keep, whatever --keep-* rules it
    sends; --append-only keeps everything."""

    def effective(client: str, **server) -> Retention | None:
        req = _parse_request(f"diskrsync serve --target /b/x.spgz {client}")
        apply_retention(req, **server)
        return retention(req)

    floor = Retention(last=2, daily=7)
    assert effective("--keep-last 1", floor=floor, append_only=False) == Retention(last=2,
                                                                                   daily=7)
    assert "raised to --keep-last 2 --keep-daily 7" in capsys.readouterr().err
    assert effective("--keep-daily 30 --keep-within 1d", floor=floor, append_only=False) == \
        Retention(last=2, daily=30, within=86400)
    assert effective("--keep 9", floor=floor, append_only=False) == Retention(last=9, daily=7)
    assert effective("", floor=floor, append_only=False) == Retention(last=2, daily=7)
    assert effective("--keep-hourly 1", floor=None, append_only=True) == \
        Retention(last=KEEP_ALL)
    assert effective("--keep-hourly 1", floor=None, append_only=False) == Retention(hourly=1)
    ns = _parse_request("diskrsync serve --target /b/x.spgz --always-new-generation")
    assert ns.always_new_generation


@pytest.mark.pure
def test_remote_target_argv_names_the_policy():
    """``--keep N`` alone goes as ``--keep N`` (servers before the --keep-* rules take it);
    other policies as their options."""
    simple = PushRequest(target=TargetOptions(keep=Retention(last=4)))
    argv = _target_argv("/b/x.spgz", simple)
    assert argv[3:5] == ["--keep", "4"] and "--always-new-generation" not in argv
    rich = PushRequest(target=TargetOptions(keep=Retention(last=1, weekly=5),
                                            always_new_generation=True))
    argv = _target_argv("/b/x.spgz", rich)
    assert argv[3:7] == ["--keep-last", "1", "--keep-weekly", "5"]
    assert "--always-new-generation" in argv


# -- commits ---------------------------------------------------------------------------------


def _commit(path: str, data: bytes, **kw) -> tuple[int, Image]:
    with Image.open(path) as img:
        tx = img.begin()
    try:
        tx.resize(len(data))
        for c in range(-(-len(data) // CS)):
            tx.write_chunk(c, data[c * CS : (c + 1) * CS])
        number = tx.commit(**kw).number
        return number, tx
    finally:
        tx.close()


def _counter(path: str) -> int:
    with Image.open(path) as img:
        return img._state.sb.counter


@pytest.mark.inproc
def test_unchanged_content_records_the_run_in_the_newest_generation(tmp_path: Path):
    path = str(tmp_path / "i.img")
    Image.create(path, chunk_size=CS).close()
    a, b = os.urandom(CS * 5), os.urandom(CS * 5)
    assert _commit(path, a, new_generation=False)[0] == 1  # nothing to compare with yet
    before = _counter(path)
    number, tx = _commit(path, a, new_generation=False, meta={"note": "second run"})
    assert number == 1 and tx.unchanged and tx.pruned == ()
    assert _counter(path) == before + 1  # still a whole commit (tables, superblocks, fsyncs)
    with Image.open(path) as img:
        (g,) = img.generations()
        assert g.meta["checks"] == 1 and g.meta["note"] == "second run"
        assert g.meta["last_checked"] >= g.commit_time
        assert verify(img).ok
    assert _commit(path, a, new_generation=False)[0] == 1
    # a forced new generation, then a change: numbers continue, nothing was skipped
    assert _commit(path, a, new_generation=True)[0] == 2
    number, tx = _commit(path, b, new_generation=False, keep=1)
    assert number == 3 and not tx.unchanged and tx.pruned == (1, 2)
    with Image.open(path) as img:
        assert [g.number for g in img.generations()] == [3]
        assert "checks" not in img.generations()[0].meta


@pytest.mark.inproc
def test_unchanged_resumed_push_gives_the_checkpoint_space_back(tmp_path: Path):
    """A checkpoint (a killed push) whose content turns out to equal the newest generation:
    the metadata commit drops it and the space its chunks took."""
    path = str(tmp_path / "i.img")
    Image.create(path, chunk_size=CS).close()
    data = os.urandom(CS * 64)
    _commit(path, data)
    with Image.open(path) as img:
        tx = img.begin()
    tx.resize(len(data))
    for c in range(32):
        tx.write_chunk(c, data[c * CS : (c + 1) * CS])
    tx.checkpoint()
    tx.close()
    number, tx = _commit(path, data, new_generation=False)
    assert number == 1 and tx.unchanged
    with Image.open(path) as img:
        assert img.table.checkpoint is None
        assert img.usage()["stored"] < CS * 66


@pytest.mark.inproc
def test_image_store_makes_a_generation_for_a_run_with_warnings(tmp_path: Path):
    """Same root, but zeros stood in for unreadable sectors (or the source changed under
    the scan): that run is a generation of its own; a clean one is not."""
    path = str(tmp_path / "i.img")
    Image.create(path, chunk_size=CS).close()
    data = os.urandom(CS * 4)
    _commit(path, data)

    def finish(info: dict) -> dict:
        store = ImageStore(path, len(data), CS, TargetOptions())
        try:
            r = store.finish(bytes.fromhex(store.info["root"]), info)
        finally:
            store.close()
        return {"generation": r.generation, **r.info}

    assert finish({}) == {"generation": 1, "path": path, "unchanged": True, "pruned": []}
    assert finish({"read_errors": [[0, 512]]})["generation"] == 2
    assert finish({"source_changed_chunks": 1})["generation"] == 3
    assert finish({}) == {"generation": 3, "path": path, "unchanged": True, "pruned": []}


@pytest.mark.inproc
def test_push_reports_unchanged_and_pruned(tmp_path: Path):
    src, dst = tmp_path / "s", tmp_path / "t"
    src.write_bytes(os.urandom(CS * 8))
    req = PushRequest(source=SourceOptions(chunk_size=CS),
                      target=TargetOptions(keep=Retention(last=2)))
    assert local_push(str(src), str(dst), req).generation == 1
    stats = local_push(str(src), str(dst), req)
    assert (stats.generation, stats.unchanged, stats.pruned) == (1, True, [])
    forced = PushRequest(source=req.source, target=TargetOptions(keep=Retention(last=1),
                                                                  always_new_generation=True))
    stats = local_push(str(src), str(dst), forced)
    assert (stats.generation, stats.unchanged, stats.pruned) == (2, False, [1])


@pytest.mark.inproc
def test_commit_applies_time_rules_as_select_says(tmp_path: Path):
    path = str(tmp_path / "i.img")
    Image.create(path, chunk_size=CS).close()
    for _ in range(4):
        _commit(path, os.urandom(CS), keep=10)
    with Image.open(path) as img:
        gens = [(g.number, g.commit_time) for g in img.generations()]
        policy = Retention(hourly=1, last=2)
        want = {v.number for v in select(gens, policy) if v.kept}
        assert {v.number for v in img.verdicts(policy) if v.kept} == want
        assert img.prune(policy) == sorted({1, 2, 3, 4} - want)
    with Image.open(path) as img:
        assert [g.number for g in img.generations()] == sorted(want)


# -- the command line ------------------------------------------------------------------------


@pytest.mark.process
def test_prune_dry_run_says_what_goes_and_why(tmp_path: Path):
    path = str(tmp_path / "i.img")
    Image.create(path, chunk_size=CS).close()
    for _ in range(4):
        _commit(path, os.urandom(CS), keep=10)
    r = cli("prune", "--dry-run", "--keep-last", "2", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [
        ["keep", "4"], ["keep", "3"], ["prune", "2"], ["prune", "1"]]
    assert lines[0].endswith("newest, last 1/2") and lines[1].endswith("last 2/2")
    assert lines[2].endswith("no rule keeps it")
    assert lines[4] == "dry run: would prune generation(s) 1, 2"
    with Image.open(path) as img:
        assert len(img.generations()) == 4  # nothing changed
    r = cli("prune", "--keep-within", "1h", "-n", path)
    assert r.stdout.decode().splitlines()[-1] == "dry run: nothing to prune"
    r = cli("prune", path)
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1
    assert "at least one rule" in r.stderr.decode()
    r = cli("prune", "--keep", "3", path)
    assert r.stdout.decode().strip() == "pruned generation(s) 1"


@pytest.mark.process
def test_cli_push_says_unchanged(tmp_path: Path):
    src, dst = tmp_path / "s.img", tmp_path / "t.spgz"
    src.write_bytes(os.urandom(CS * 8))
    assert cli("push", "-q", str(src), str(dst)).returncode == 0
    r = cli("push", str(src), str(dst))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith("unchanged: generation 1 is still current")
    r = cli("push", "--json", str(src), str(dst))
    out = json.loads(r.stdout)
    assert out["unchanged"] is True and out["generation"] == 1 and out["pruned"] == []
    r = cli("push", "--json", "--always-new-generation", "--keep-last", "1", str(src),
            str(dst))
    out = json.loads(r.stdout)
    assert (out["unchanged"], out["generation"], out["pruned"]) == (False, 2, [1])
    info = cli("info", str(dst)).stdout.decode()
    assert "checked" not in info
    cli("push", "-q", str(src), str(dst))
    info = cli("info", str(dst)).stdout.decode()
    assert "unchanged by 1 later push(es), the last at" in info
