"""Child process of the crash tests: commits generations of an image in a loop until killed.

    python crashwriter.py IMAGE SEED [--max-gens N] [--target T --nth N --how H --cut K]

Each generation follows ``crashplan.plan(SEED, number)`` (resize, rewrite some chunks, maybe a
checkpoint mid-way) and is committed with keep=2; after ``commit`` returns the child prints
``committed N`` (flushed), so the parent knows the newest generation that must be current.

With ``--target`` the child kills itself with SIGKILL at its ``--nth`` matching I/O call
(``os.pwrite``/``os.fsync`` are wrapped): ``any`` counts every pwrite and fsync, ``fsync``
only fsyncs, ``sb`` only superblock-slot writes, ``table`` only the last pwrite before an fsync
(the generation table). ``--how`` is ``before`` (the call never happens), ``after`` (it
happens, then the kill) or ``torn`` (only the first ``--cut`` bytes of the write land). Before
dying it prints ``KILL <what>`` so the parent can tell which step it hit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diskrsync.compression.format import SLOT_SIZE, SUPERBLOCK_SLOTS
from diskrsync.compression.image import Image
from support.crashplan import CS, KEEP, chunk_bytes, plan


def die(what: str) -> None:
    print(f"KILL {what}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install_killer(target: str, nth: int, how: str, cut: int) -> None:
    real_pwrite, real_fsync = os.pwrite, os.fsync
    count = 0
    last_write: tuple[int, bytes, int] | None = None

    def due(category: str) -> bool:
        nonlocal count
        if target not in ("any", category):
            return False
        count += 1
        return count == nth

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal last_write
        is_sb = offset in SUPERBLOCK_SLOTS and len(data) == SLOT_SIZE
        category = "sb" if is_sb else "data"
        last_write = (fd, data, offset) if not is_sb else None
        if due(category):
            what = f"{how} pwrite {category} at {offset} ({len(data)} bytes)"
            if how == "after":
                real_pwrite(fd, data, offset)
            elif how == "torn":
                real_pwrite(fd, data[: max(1, min(cut, len(data) - 1))], offset)
            die(what)
        return int(real_pwrite(fd, data, offset))

    def fsync(fd: int) -> None:
        nonlocal count, last_write
        last, last_write = last_write, None
        if target == "table" and last is not None:
            # the pwrite just before the first fsync of a publish is the generation table;
            # count it here (after it landed): kill now, or tear it
            count += 1
            if count == nth:
                lfd, data, offset = last
                if how == "torn":
                    real_pwrite(lfd, bytes(len(data) - cut % len(data)), offset + cut % len(data))
                die(f"{how} table write at {offset} ({len(data)} bytes)")
        if due("fsync"):
            if how == "after":
                real_fsync(fd)
            die(f"{how} fsync")
        real_fsync(fd)

    os.pwrite = pwrite  # type: ignore[assignment]
    os.fsync = fsync  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("seed", type=int)
    ap.add_argument("--max-gens", type=int, default=10**9)
    ap.add_argument("--target", choices=["any", "fsync", "sb", "table"])
    ap.add_argument("--nth", type=int, default=1)
    ap.add_argument("--how", choices=["before", "after", "torn"], default="before")
    ap.add_argument("--cut", type=int, default=1)
    args = ap.parse_args()

    img = Image.open(args.image)
    if args.target:
        install_killer(args.target, args.nth, args.how, args.cut)
    print("ready", flush=True)
    for _ in range(args.max_gens):
        img.refresh()
        number = img.table.next_number
        p = plan(args.seed, number)
        tx = img.begin()
        tx.resize(p.size)
        for i, c in enumerate((*p.chunks, None)):
            if i == p.checkpoint_after:
                tx.checkpoint(source=f"gen {number} part")
                if number % 2:
                    # odd generations go on in a new transaction from the checkpoint, as a
                    # restarted push would; even ones continue the same transaction
                    tx.abort()
                    tx = Image.open(args.image).begin()
                    assert tx.resumed_from is not None and tx.size == p.size
            if c is None:
                break
            length = min(CS, p.size - c * CS)
            tx.write_chunk(c, chunk_bytes(args.seed, number, c, length))
        g = tx.commit(source=f"gen {number}", keep=KEEP)
        assert g.number == number, (g.number, number)
        print(f"committed {number}", flush=True)


if __name__ == "__main__":
    main()
