"""What generation N of a crash-test image holds, computed the same way by the writer child
(``crashwriter.py``) and by the test that kills it.

Everything is a function of (seed, generation number): the size the generation resizes to,
which chunks it rewrites, their bytes, and whether (and where) it checkpoints mid-way. So the
parent can rebuild every generation's exact bytes without talking to the child, and a child that
resumes a killed generation from its checkpoint writes the same thing again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CS = 16 * 1024
FANOUT = 4
KEEP = 2
# a few hundred KiB: exact multiples, a short last chunk, an empty disk, a one-page tree
SIZES = (0, CS * 2 + 1, CS * 5 + 100, CS * 13, CS * 17 + 7, CS * 24)


@dataclass(frozen=True)
class Plan:
    number: int
    size: int
    chunks: tuple[int, ...]  # chunks rewritten, in write order
    checkpoint_after: int | None  # checkpoint after this many chunk writes


def plan(seed: int, number: int) -> Plan:
    rnd = random.Random(f"{seed}:{number}")
    size = rnd.choice(SIZES)
    n = -(-size // CS)
    chunks: tuple[int, ...] = ()
    if n:
        chunks = tuple(rnd.sample(range(n), rnd.randint(1, n)))
    cp = rnd.randint(0, len(chunks)) if chunks and rnd.random() < 0.4 else None
    return Plan(number, size, chunks, cp)


def chunk_bytes(seed: int, number: int, chunk: int, length: int) -> bytes:
    """Incompressible (stored raw), compressible (zstd) or zero, depending on (number, chunk)."""
    rnd = random.Random(f"{seed}:{number}:{chunk}")
    kind = rnd.random()
    if kind < 0.4:
        return rnd.randbytes(length)
    if kind < 0.8:
        word = f"gen {number} chunk {chunk} {rnd.random():.6f} ".encode()
        return (word * (length // len(word) + 1))[:length]
    return bytes(length)


def apply(seed: int, before: bytes, p: Plan) -> bytes:
    """The generation's bytes given the previous generation's."""
    model = bytearray(before[: p.size].ljust(p.size, b"\0"))
    for c in p.chunks:
        length = min(CS, p.size - c * CS)
        model[c * CS : c * CS + length] = chunk_bytes(seed, p.number, c, length)
    return bytes(model)


class Model:
    """Expected bytes of generation 1, 2, ... computed in order, keeping only recent ones."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.done = 0
        self.cache: dict[int, bytes] = {0: b""}

    def __getitem__(self, number: int) -> bytes:
        while self.done < number:
            nxt = self.done + 1
            self.cache[nxt] = apply(self.seed, self.cache[self.done], plan(self.seed, nxt))
            self.done = nxt
            for old in [k for k in self.cache if k < self.done - 8]:
                del self.cache[old]
        if number not in self.cache:
            raise KeyError(f"generation {number} is too old for the model cache")
        return self.cache[number]
