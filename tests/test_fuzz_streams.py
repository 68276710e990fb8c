"""Seeded mutation fuzzing of both protocols' byte streams, under memory and time limits.

Recorded conversations (a native push over pipes; the Go tools' BSNC0002 transcripts) are
mutated (bit flips, truncation, spliced, dropped, swapped and duplicated frames, huge length,
size and index fields, evil JSON values) and fed to the other end. Every run must end in
success or a clean ``DiskrsyncError``, within a time bound, and leave the target image
verifying at its old generation or at a correctly completed new one (support/fuzzing.py).
The whole fuzzer runs in a child under ``RLIMIT_AS``. The seed is random unless
``DISKRSYNC_FUZZ_SEED`` is set; it is printed, and named in any failure, to replay a run.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
from support.hostile import run_bounded
from support.legacy_vectors import have_vectors

pytestmark = pytest.mark.process

TESTS = Path(__file__).resolve().parent
RUNS = {"native": 250, "go": 250}


def _fuzz(kind: str, tmp_path: Path) -> dict:
    seed = int(os.environ.get("DISKRSYNC_FUZZ_SEED", random.randrange(1 << 32)))
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
            f"from support.fuzzing import main; main()")
    r = run_bounded([sys.executable, "-c", code, kind, str(seed), str(RUNS[kind]),
                     str(tmp_path)], b"", timeout=300)
    print(f"{kind} stream fuzzer: seed {seed} (DISKRSYNC_FUZZ_SEED={seed} replays it)")
    assert r.returncode == 0, f"seed {seed}: {r.stderr.decode(errors='replace')[-3000:]}"
    report = json.loads(r.stdout.decode().strip().splitlines()[-1])
    print(f"{kind}: {report['runs']} mutated streams: {report.get('outcomes')}")
    assert report["bad"] == [], f"seed {seed}: " + "\n".join(report["bad"][:20])
    return report


def test_mutated_native_streams(tmp_path):
    report = _fuzz("native", tmp_path)
    assert report["runs"] == RUNS["native"]
    assert report["outcomes"].get("committed", 0) > 0  # some mutations are harmless
    assert sum(report["outcomes"].values()) == RUNS["native"]


@pytest.mark.skipif(not have_vectors(), reason="Go vectors not found")
def test_mutated_go_streams(tmp_path):
    report = _fuzz("go", tmp_path)
    assert report["runs"] == RUNS["go"]
    assert sum(report["outcomes"].values()) == RUNS["go"]
