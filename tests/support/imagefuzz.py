"""Child process of the mutated-image fuzz test: mutates an image many times and runs `info`,
`verify` and a full snapshot read on each mutant, under an address-space limit and a per-mutant
alarm, printing one JSON line per mutant for the parent to judge.

    python imagefuzz.py BASE WORK SEED FIRST COUNT GEN1.raw GEN2.raw ...

BASE is a pristine image whose generations 1..N hold the bytes of GEN1.raw..GENN.raw. Mutant i
(FIRST <= i < FIRST + COUNT) is a function of (SEED, i): 1-4 of bit flips, random or zeroed
byte runs (half of them inside the metadata: the superblocks and the table copies), a
truncation or appended garbage. Anything but a DiskrsyncError escaping (a traceback, a
MemoryError past the limit, the alarm) is reported as ``crash``.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import resource
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from diskrsync.base.errors import DataError, DiskrsyncError
from diskrsync.cli import main as cli_main
from diskrsync.compression.format import SLOT_SIZE, SUPERBLOCK_SLOTS, Superblock
from diskrsync.compression.image import Image

MEMORY_LIMIT = 1 << 30  # bytes of address space
ALARM_S = 20  # per mutant: far beyond what a small image needs


class Hung(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hung()


def metadata(image: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the superblock slots and of every table a valid slot names."""
    out = [(0, 2 * SLOT_SIZE)]
    for off in SUPERBLOCK_SLOTS:
        with contextlib.suppress(DataError):
            sb = Superblock.decode(image[off : off + SLOT_SIZE])
            out.append((sb.table_offset, sb.table_length))
    return out


def mutate(rnd: random.Random, data: bytearray, meta: list[tuple[int, int]]) -> str:
    done = []
    for _ in range(rnd.randint(1, 4)):
        if rnd.random() < 0.5:
            off, length = rnd.choice(meta)
            at = off + rnd.randrange(max(length, 1))
        else:
            at = rnd.randrange(len(data))
        how = rnd.choice(["bits", "bits", "random", "zeros", "truncate", "append"])
        if how == "bits":
            for _ in range(rnd.randint(1, 8)):
                pos = min(at + rnd.randrange(16), len(data) - 1)
                data[pos] ^= 1 << rnd.randrange(8)
        elif how in ("random", "zeros"):
            n = rnd.randint(1, 4096 if how == "zeros" else 64)
            data[at : at + n] = rnd.randbytes(n) if how == "random" else bytes(n)
        elif how == "truncate":
            del data[at:]
            if not data:
                done.append("truncate 0")
                break
        else:
            data += rnd.randbytes(rnd.randint(1, 8192))
        done.append(f"{how}@{at}")
    return " ".join(done)


def run_cli(*args: str) -> tuple[int, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli_main(list(args))
    doc = None
    if "--json" in args and out.getvalue().strip():
        doc = json.loads(out.getvalue())
    return code, doc


def read_all(path: str, model: list[bytes]) -> dict[str, Any]:
    """Open and read every chunk of every generation: what is served, and whether any chunk
    came back different from what was committed."""
    try:
        img = Image.open(path)
    except DiskrsyncError as e:
        return {"error": e.exit_code}
    served: list[int] = []
    bad = wrong = 0
    with img:
        for g in img.generations():
            served.append(g.number)
            try:
                snap = img.snapshot(g.number)
            except DiskrsyncError:
                bad += 1
                continue
            with snap:
                want = model[g.number - 1]
                if snap.size != len(want):
                    wrong += 1
                    continue
                cs = snap.chunk_size
                for c in range(snap.chunk_count):
                    try:
                        got = snap.read_chunk(c)
                    except DiskrsyncError:
                        bad += 1
                        continue
                    if got != want[c * cs : (c + 1) * cs]:
                        wrong += 1
    return {"served": served, "bad": bad, "wrong": wrong}


def main() -> None:
    base, work, seed, first, count = sys.argv[1:6]
    model = [Path(p).read_bytes() for p in sys.argv[6:]]
    pristine = Path(base).read_bytes()
    meta = metadata(pristine)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _alarm)
    for i in range(int(first), int(first) + int(count)):
        rnd = random.Random(f"{seed}:{i}")
        data = bytearray(pristine)
        rec: dict[str, Any] = {"i": i, "what": mutate(rnd, data, meta)}
        with open(work, "wb") as f:
            f.write(data)
        signal.alarm(ALARM_S)
        try:
            rec["info"], doc = run_cli("info", "--json", work)
            if doc is not None and "error" not in doc:  # a failure prints an error object
                rec["info_gens"] = [g["number"] for g in doc["generations"]]
            rec["verify"], _ = run_cli("verify", "--json", work)
            rec["read"] = read_all(work, model)
        except BaseException:
            rec["crash"] = traceback.format_exc(limit=-6)
        finally:
            signal.alarm(0)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
