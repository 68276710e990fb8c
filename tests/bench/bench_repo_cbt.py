#!/usr/bin/env python3
"""Pushes into an encrypted repository read only what changed (a script, not a test):

    .venv/bin/python tests/bench/bench_repo_cbt.py --data /work/bench-data [--runs 3]

DIR holds synth.img, synth2.img and synth2.changed_blocks.txt (the 128 KiB chunks synth2
changes, from ../shared/bench/gen_synth.py). An encrypted repository in a directory holds
synth.img; then, alternating so that every push changes the same 163 chunks:

* map: synth2.img with a map of changed ranges naming those chunks (what a QEMU dirty bitmap
  gives), relative to the newest generation;
* full: the way back to synth.img with the same base but no ranges (the reader knows none:
  the whole source is read), the reference.

Both commit a generation of the same 163 changed chunks; figures are medians of the time
and the bytes read from the source, page cache warm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from diskrsync.compression.crypto import MasterKey
from diskrsync.compression.objstore import DirStore
from diskrsync.compression.repository import Repository
from diskrsync.compression.sources import RawSource
from diskrsync.synccore.push import PushRequest, push_sealed
from diskrsync.synccore.source import PushStats

CHUNK = 128 << 10
BASE = {"map": "bench-map", "bitmap": "b"}


class MapSource(RawSource):
    def __init__(self, path: Path, ranges: list[tuple[int, int]] | None) -> None:
        super().__init__(str(path))
        self.ranges = ranges

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        return self.ranges

    def change_base(self) -> dict[str, Any] | None:
        return BASE


def push(repo: Repository, path: Path, ranges: list[tuple[int, int]] | None
         ) -> tuple[float, PushStats]:
    reader = MapSource(path, ranges)
    t0 = time.perf_counter()
    try:
        stats = push_sealed(reader, repo, "vm", PushRequest(), None)
    finally:
        reader.close()
    return time.perf_counter() - t0, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/bench-data")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    data = Path(args.data)
    blocks = [int(x) for x in (data / "synth2.changed_blocks.txt").read_text().split()]
    ranges = [(b * CHUNK, CHUNK) for b in sorted(blocks)]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        repo = Repository.init(DirStore(tmp), key=MasterKey.generate())
        t, first = push(repo, data / "synth.img", [])
        print(f"first push of synth.img: {t:.2f} s, {first.bytes_read >> 20} MiB read "
              f"({first.map}: {first.map_fallback})")
        times: dict[str, list[float]] = {"map": [], "full": []}
        read: dict[str, list[int]] = {"map": [], "full": []}
        for _ in range(args.runs):
            for case, path, rng in (("map", "synth2.img", ranges), ("full", "synth.img", None)):
                t, stats = push(repo, data / path, rng)
                assert stats.chunks_differing <= len(blocks), stats.chunks_differing
                times[case].append(t)
                read[case].append(stats.bytes_read)
        changed = len(blocks) * CHUNK
        tm, tf = statistics.median(times["map"]), statistics.median(times["full"])
        rm, rf = statistics.median(read["map"]), statistics.median(read["full"])
        print(f"map:  {tm:.3f} s, {rm / 2**20:.1f} MiB read ({rm / changed:.2f}x the changed "
              f"chunks' {changed / 2**20:.1f} MiB)")
        print(f"full: {tf:.3f} s, {rf / 2**20:.1f} MiB read")
        print(f"map / full: {tm / tf:.3f}x the time, {rm / rf:.4f}x the bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
