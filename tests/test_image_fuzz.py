"""Mutated images: many seeded random mutations of small multi-generation images, each run
through `info`, `verify` and a full read in a child process limited to 1 GiB of address space
and an alarm per mutant (``support/imagefuzz.py``).

Whatever the damage: no traceback, exit codes only 0, 6 and 12 (verify's "redundancy lost");
the generation served is the newest committed one unless the command failed with exit 6; no
chunk ever reads back different from what was committed; verify passes only if every chunk
reads back. Both layouts are mutated: both superblocks per commit, and one slot per commit as
older diskrsync versions wrote.

The seed is printed (``seed=...``); DISKRSYNC_FUZZ_SEED replays a run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from support.imagetools import generations, one_slot_image

pytestmark = [pytest.mark.process, pytest.mark.slow]

FUZZER = Path(__file__).parent / "support" / "imagefuzz.py"
SEED = int(os.environ.get("DISKRSYNC_FUZZ_SEED") or random.randrange(2**32))
MUTANTS = 250  # per layout
NEWEST = 3


@pytest.mark.parametrize("layout", ["mirrored", "one-slot"])
def test_mutated_images(tmp_path, layout):
    print(f"seed={SEED}")
    base = str(tmp_path / "base.img")
    gens = generations(base, NEWEST) if layout == "mirrored" else one_slot_image(base, NEWEST)
    models = []
    for n, data in enumerate(gens, 1):
        p = tmp_path / f"gen{n}.raw"
        p.write_bytes(data)
        models.append(str(p))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    r = subprocess.run(
        [sys.executable, str(FUZZER), base, str(tmp_path / "mutant.img"), f"{SEED}:{layout}",
         "0", str(MUTANTS), *models],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == MUTANTS, r.stderr[-4000:]
    seen: Counter[str] = Counter()
    for rec in records:
        where = f"mutant {rec['i']} ({rec['what']}), seed {SEED}"
        assert "crash" not in rec, f"{where}:\n{rec['crash']}"
        assert rec["info"] in (0, 6), where
        assert rec["verify"] in (0, 6, 12), where
        read = rec["read"]
        if "error" in read:
            assert read["error"] == 6 and rec["info"] == 6, where
            seen["refused"] += 1
            continue
        # served: the newest committed generation (older retained ones listed beside it)
        assert read["served"][-1] == NEWEST, f"{where}: served {read['served']}"
        if rec["info"] == 0:  # (info also fails, exit 6, when an index page is damaged)
            assert rec["info_gens"][-1] == NEWEST, where
        assert read["wrong"] == 0, f"{where}: wrong bytes served"
        if rec["verify"] in (0, 12):
            assert read["bad"] == 0, f"{where}: verify passed, reading failed"
            seen["intact" if rec["verify"] == 0 else "redundancy lost"] += 1
        else:
            seen["damage found"] += 1
    print(f"{layout}: {MUTANTS} mutants: {dict(seen)}")
