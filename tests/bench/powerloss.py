"""Power-loss crash states, many of them: run before a release (a script, not a test).

    .venv/bin/python tests/bench/powerloss.py [--seeds 5] [--per-cut 400] [--seed N]

The same recording and checks as ``tests/test_powerloss.py`` (see ``tests/support/powerloss.py``
for the durability model and ``tests/support/powerpaths.py`` for what every state is held to),
over several seeds, with more states per cut point and the next push run on every state.
Prints the states checked per path; exits 1 at the first state that fails, naming it and the
seed that replays it.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.powerloss import crash_states
from support.powerpaths import PATHS, SPGZ_VECTOR, check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="recorded runs per path")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--per-cut", type=int, default=400, help="states tried per cut point")
    ap.add_argument("--only", nargs="*", default=None, help="paths to run")
    args = ap.parse_args()
    first = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed={first} (seeds {first}..{first + args.seeds - 1})")
    names = args.only or list(PATHS)
    if not SPGZ_VECTOR.exists():
        names = [n for n in names if "convert" not in n]
        print("Go vectors not found: the convert paths are skipped")
    total: Counter[str] = Counter()
    cuts: Counter[str] = Counter()
    warned: Counter[str] = Counter()
    start = time.monotonic()
    for name in names:
        path = PATHS[name]
        for seed in range(first, first + args.seeds):
            with tempfile.TemporaryDirectory() as base:
                run, contents = path.record(base, seed)
                rng = random.Random(f"{seed}:{name}:states")
                cuts[name] += len(run.cuts())
                for st in crash_states(run, rng, args.per_cut):
                    try:
                        out = check(path, run, contents, st, base, rng, again=True)
                    except AssertionError as e:
                        print(f"FAILED (seed={seed}): {e}")
                        return 1
                    total[name] += 1
                    warned[name] += out.warned
        print(f"{name:14} {total[name]:6} states over {cuts[name]:4} cut points "
              f"({warned[name]} with a redundancy warning while a commit was in flight)")
    print(f"total: {sum(total.values())} crash states, {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
