"""Power-loss crash safety: every recorded write and barrier of each code path, replayed into
the states a power cut could leave (see ``support/powerloss.py`` for the model and
``support/powerpaths.py`` for what each state is held to).

The seed is printed (``seed=...``); set DISKRSYNC_POWERLOSS_SEED to replay a run.
``tests/bench/powerloss.py`` runs the same with many more states per path.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
from support.powerloss import Run, crash_states
from support.powerpaths import PATHS, SPGZ_VECTOR, check

pytestmark = pytest.mark.inproc

SEED = int(os.environ.get("DISKRSYNC_POWERLOSS_SEED") or random.randrange(2**32))
PER_CUT = 250  # states tried per cut point (identical ones are checked once)
AGAIN_EVERY = 4  # the next push runs on every 4th state (each costs a push)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATHS))
def test_power_loss(name: str, tmp_path: Path) -> None:
    """A few hundred crash states of one path: none loses a reported generation, serves
    wrong bytes or blocks the next push."""
    if "spgz" in str(PATHS[name].setup.__qualname__) and not SPGZ_VECTOR.exists():
        pytest.skip("Go vectors not found")
    print(f"seed={SEED}")
    path = PATHS[name]
    run, contents = path.record(str(tmp_path), SEED)
    rng = random.Random(f"{SEED}:{name}:states")
    n = 0
    for n, st in enumerate(crash_states(run, rng, PER_CUT), 1):
        check(path, run, contents, st, str(tmp_path), rng, again=n % AGAIN_EVERY == 0)
    print(f"{name}: {n} crash states over {len(run.cuts())} cut points, {len(run.ops)} ops")
    assert n >= 50, "too few distinct crash states: the recorder saw too little"


def _without(run: Run, pick: str) -> Run:
    """The run as code lacking one barrier would have made it: the fsync just before the
    first superblock write ("fsync"), or the first directory fsync ("dirsync")."""
    ops = run.ops
    if pick == "dirsync":
        drop = next(i for i, op in enumerate(ops) if op.kind == "dirsync")
    else:
        sb = next(i for i, op in enumerate(ops) if op.kind == "write" and op.off == 0
                  and len(op.data) == 4096 and i > 0 and ops[i - 1].kind == "fsync")
        drop = sb - 1
    return replace(run, ops=ops[:drop] + ops[drop + 1 :])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "pick"), [("push-existing", "fsync"), ("push-new", "dirsync")])
def test_power_loss_catches_a_missing_barrier(name: str, pick: str, tmp_path: Path) -> None:
    """The check has teeth: the same run without the fsync that orders a commit's table
    before its superblock, or without the directory fsync of a new image, fails some state."""
    path = PATHS[name]
    run, contents = path.record(str(tmp_path), SEED)
    broken = _without(run, pick)
    rng = random.Random(f"{SEED}:{name}:broken")
    failures = 0
    for st in crash_states(broken, rng, PER_CUT):
        try:
            check(path, broken, contents, st, str(tmp_path), rng, again=False)
        except AssertionError:
            failures += 1
    assert failures, f"no crash state of {name} without its {pick} failed (seed={SEED})"
