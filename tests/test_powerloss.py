"""Power-loss crash safety: every recorded write and barrier of each code path, replayed into
the states a power cut could leave (see ``support/powerloss.py`` for the model and
``support/powerpaths.py`` for what each state is held to).

The seed is printed (``seed=...``); set DISKRSYNC_POWERLOSS_SEED to replay a run.
``tests/bench/powerloss.py`` runs the same with many more states per path.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from support.powerloss import crash_states
from support.powerpaths import PATHS, SPGZ_VECTOR, check

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
