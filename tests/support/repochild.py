"""A repository command in a child process, for tests that SIGKILL it at random points:

    python repochild.py push STORE DISK SEED CHUNKS   # write_disk of a deterministic disk
    python repochild.py prune STORE DISK NUMBER       # prune one generation, grace 0

STORE is a directory or s3://bucket/prefix (endpoint and credentials from the
environment). Small chunks and packs (16 KiB, 64 KiB), so a push writes many packs.
"""

from __future__ import annotations

import random
import sys

from diskrsync.base.errors import DiskrsyncError
from diskrsync.compression.objstore import open_store
from diskrsync.compression.repoimport import write_disk
from diskrsync.compression.repomaint import prune
from diskrsync.compression.repository import Repository

CHUNK = 16 * 1024
PACK = 64 * 1024


def disk_bytes(seed: int, chunks: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(CHUNK) if i % 4 else bytes(CHUNK) for i in range(chunks))


def open_or_init(url: str) -> Repository:
    store = open_store(url)
    if store.head("config") is None:
        return Repository.init(store, chunk_size=CHUNK, fanout=8, pack_size=PACK)
    return Repository.open(store)


def main(argv: list[str]) -> None:
    op, url, disk = argv[:3]
    repo = open_or_init(url)
    if op == "push":
        data = disk_bytes(int(argv[3]), int(argv[4]))
        write_disk(repo, disk, lambda off, n: data[off : off + n], len(data))
    elif op == "prune":
        number = int(argv[3])
        prune(repo, [g for g in repo.generations(disk) if g.number == number], grace=0)
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DiskrsyncError as e:  # as the command line reports it: one line, its exit code
        print(f"diskrsync: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
