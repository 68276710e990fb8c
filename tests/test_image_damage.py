"""Damaged image metadata never makes a committed generation disappear silently.

Each commit writes its generation table twice (own sectors each) and both superblock slots,
so one damaged copy (slot 0, slot 1, table copy A, table copy B) still serves the newest
generation everywhere (info, verify, restore, the mount's reader), and verify exits 12 naming
the lost redundancy. An image last written one slot per commit (older diskrsync), or a valid
newer superblock whose table is unreadable, may have lost its newest commit: every command
fails with exit 6 naming it, no writer frees anything, until ``verify --repair``.

The random tests print their seed (``seed=...``); DISKRSYNC_DAMAGE_SEED replays a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from support.imagetools import (
    CS,
    cli,
    commit,
    content,
    flip,
    generations,
    one_slot_image,
    superblocks,
)

from diskrsync.base.errors import EXIT_REDUNDANCY_LOST, DataError
from diskrsync.compression.container import open_image
from diskrsync.compression.format import FLAG_MIRRORED, SECTOR, SUPERBLOCK_SLOTS
from diskrsync.compression.image import Image
from diskrsync.fsmount.vfs import load_generation

SEED = int(os.environ.get("DISKRSYNC_DAMAGE_SEED") or random.randrange(2**32))
RANDOM_DAMAGES = 150  # per image layout


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_line_error(r: subprocess.CompletedProcess[bytes], code: int, *needles: str) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == code, (r.returncode, r.stdout, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diskrsync: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def copy_regions(path: str) -> dict[str, tuple[int, int]]:
    """(offset, length) of each metadata copy of the newest commit."""
    a, b = superblocks(path)
    assert a is not None and b is not None
    assert a.flags & FLAG_MIRRORED and b.flags & FLAG_MIRRORED
    assert a.counter == b.counter and a.table_offset != b.table_offset
    # no sector holds a byte of both table copies
    sectors = [
        set(range(sb.table_offset // SECTOR, (sb.table_offset + sb.table_length - 1) // SECTOR + 1))
        for sb in (a, b)
    ]
    assert not sectors[0] & sectors[1]
    return {
        "slot0": (SUPERBLOCK_SLOTS[0], 76),
        "slot1": (SUPERBLOCK_SLOTS[1], 76),
        "tableA": (a.table_offset, a.table_length),
        "tableB": (b.table_offset, b.table_length),
    }


@pytest.mark.parametrize("where", ["slot0", "slot1", "tableA", "tableB"])
@pytest.mark.process
def test_one_damaged_copy_still_serves_the_newest_generation(tmp_path, where):
    path = str(tmp_path / "d.img")
    gens = generations(path, 3)
    off, length = copy_regions(path)[where]
    flip(path, off + length // 2, 3)
    # the image's own reader, restore, info, the mount's reader
    assert content(path) == (3, gens[2])
    with Image.open(path) as img:
        assert [g.number for g in img.generations()] == [1, 2, 3]
        assert img.lost_commits == () and len(img.damaged_slots) == 1
    out = tmp_path / "out.raw"
    r = cli("restore", "-q", path, str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == gens[2]
    r = cli("info", "--json", path)
    assert r.returncode == 0 and [g["number"] for g in json.loads(r.stdout)["generations"]] \
        == [1, 2, 3]
    with open_image(path) as img:
        view = load_generation(img, img.generations()[-1].number)
        try:
            assert view.info.number == 3
            assert view.snapshot.read(0, view.snapshot.size) == gens[2]
        finally:
            view.close()
    # verify: every chunk is fine, the lost copy is named, exit 12
    r = cli("verify", path)
    text = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == EXIT_REDUNDANCY_LOST, text
    assert "warning: " in r.stderr.decode() and "copy" in r.stderr.decode()
    report = json.loads(cli("verify", "--json", path).stdout)
    assert report["ok"] and len(report["warnings"]) == 1 and report["problems"] == []
    # the next commit writes both copies again and never reuses a number
    model = bytearray(gens[2])
    model[5 * CS : 6 * CS] = random.Random(5).randbytes(CS)
    assert commit(path, bytes(model), chunks=[5]) == 4
    with Image.open(path) as img:
        assert img.damaged_slots == () and [g.number for g in img.generations()] == [2, 3, 4]
    assert cli("verify", path).returncode == 0
    assert content(path, 3) == (3, gens[2])


@pytest.mark.process
def test_repair_restores_redundancy(tmp_path):
    path = str(tmp_path / "r.img")
    gens = generations(path, 2)
    flip(path, SUPERBLOCK_SLOTS[1] + 30)
    r = cli("verify", "--repair", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "repair: rewritten: superblock copy 1" in r.stderr.decode()
    with Image.open(path) as img:
        assert img.damaged_slots == () and [g.number for g in img.generations()] == [1, 2]
    assert content(path) == (2, gens[1])


def lost_image(tmp_path: Path, kind: str) -> tuple[str, list[bytes]]:
    """A one-slot-per-commit image whose newest commit is damaged: its superblock
    ("slot") or its generation table ("table")."""
    path = str(tmp_path / f"{kind}.img")
    gens = one_slot_image(path, 3)
    sbs = superblocks(path)
    newest = max((sb.counter, i) for i, sb in enumerate(sbs) if sb is not None)[1]
    sb = sbs[newest]
    assert sb is not None and not sb.flags & FLAG_MIRRORED
    assert content(path) == (3, gens[2])  # readable before the damage
    if kind == "slot":
        flip(path, SUPERBLOCK_SLOTS[newest] + 40, 2)
    else:
        flip(path, sb.table_offset + sb.table_length // 2)
    return path, gens


@pytest.mark.parametrize("kind", ["slot", "table"])
@pytest.mark.process
def test_possibly_lost_commit_fails_loudly_and_frees_nothing(tmp_path, kind):
    path, gens = lost_image(tmp_path, kind)
    before = digest(path)
    with pytest.raises(DataError, match="refusing to use the older state"):
        Image.open(path)
    with Image.open(path, accept_loss=True) as img:
        assert img.lost_commits and [g.number for g in img.generations()] == [1, 2]
        with pytest.raises(DataError, match="refusing"):
            img.begin()
    needle = "superblock copy"
    one_line_error(cli("info", path), 6, needle, "verify --repair")
    one_line_error(cli("restore", "-q", path, str(tmp_path / "out")), 6, needle)
    assert not (tmp_path / "out").exists()
    one_line_error(cli("prune", "--keep", "1", path), 6, needle)
    src = tmp_path / "src.raw"
    src.write_bytes(gens[2])
    one_line_error(cli("push", "-q", str(src), path), 6, needle)
    r = cli("verify", path)
    assert r.returncode == 6 and "problem: superblock copy" in r.stdout.decode(), r.stdout
    assert digest(path) == before, "a refused command changed the image"
    if os.path.exists("/dev/fuse") and os.geteuid() == 0:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        try:
            one_line_error(cli("mount", path, str(mnt)), 6, needle)
            assert not os.path.ismount(mnt)
        finally:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    # the explicit repair accepts the loss; the lost commit's number is never handed out
    r = cli("verify", "--repair", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "repair: accepted as lost: superblock copy" in r.stderr.decode()
    assert content(path) == (2, gens[1])
    assert commit(path, gens[2], chunks=[0]) == 4
    assert cli("verify", path).returncode == 0
    with Image.open(path) as img:
        assert [g.number for g in img.generations()] == [1, 2, 4]


@pytest.mark.process
def test_healthy_one_slot_image_is_read_and_upgraded(tmp_path):
    path = str(tmp_path / "old.img")
    gens = one_slot_image(path, 3)
    assert cli("verify", path).returncode == 0
    assert content(path) == (3, gens[2])
    model = bytearray(gens[2])
    model[:CS] = bytes(CS)
    assert commit(path, bytes(model), chunks=[0], keep=4) == 4
    sbs = superblocks(path)
    assert all(sb is not None and sb.flags & FLAG_MIRRORED for sb in sbs)
    assert len({sb.counter for sb in sbs if sb is not None}) == 1


def damage(rnd: random.Random, path: str, regions: list[tuple[int, int]]) -> str:
    """One random damage inside one sector of one of ``regions``: flipped bits, a run of
    random bytes, or a zeroed run."""
    off, length = rnd.choice(regions)
    at = off + rnd.randrange(max(length, 1))
    sector_end = (at // SECTOR + 1) * SECTOR
    n = rnd.randint(1, min(64, sector_end - at))
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(n)
        how = rnd.choice(["bits", "random", "zeros"])
        if how == "bits":
            new = bytes(b ^ (1 << rnd.randrange(8)) for b in old)
        elif how == "random":
            new = rnd.randbytes(len(old))
        else:
            new = bytes(len(old))
        f.seek(at)
        f.write(new)
    return f"{how} {n} at {at}"


@pytest.mark.parametrize("layout", ["mirrored", "one-slot"])
@pytest.mark.inproc
def test_random_metadata_damage_never_rolls_back_silently(tmp_path, layout):
    """Many single-sector damages of the metadata of the newest commit and of the previous
    one: the generation served is the newest committed one, or the open fails with a
    DataError (exit 6). Mirrored images always serve the newest."""
    print(f"seed={SEED}")
    rnd = random.Random(f"{SEED}:{layout}")
    base = str(tmp_path / "base.img")
    gens = generations(base, 3) if layout == "mirrored" else one_slot_image(base, 3)
    regions = [(0, 2 * SECTOR)]
    for sb in superblocks(base):
        assert sb is not None
        regions.append((sb.table_offset, sb.table_length))
    pristine = Path(base).read_bytes()
    served = refused = 0
    work = str(tmp_path / "work.img")
    for i in range(RANDOM_DAMAGES):
        Path(work).write_bytes(pristine)
        what = damage(rnd, work, regions)
        try:
            number, data = content(work)
        except DataError:
            assert layout == "one-slot", f"damage {i} ({what}) of a mirrored image refused"
            refused += 1
            continue
        assert number == 3, f"damage {i} ({what}): generation {number} served, 3 committed"
        assert data == gens[2]
        served += 1
    print(f"{layout}: {RANDOM_DAMAGES} damages, served newest {served}, refused {refused}")
    assert served + refused == RANDOM_DAMAGES
