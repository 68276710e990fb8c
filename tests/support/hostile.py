"""Helpers for the hostile-peer tests: hand-made frames, bounded child processes, image state.

A hostile stream is judged by what the receiving end does with it: exit 5 with one line (or
a clean ``DiskrsyncError`` in-process), bounded memory and time, and the target image at its
previous generation with nothing new in it. Children run with ``RLIMIT_AS`` so that an
allocation the size of a peer's number fails instead of swapping the machine.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diskrsync.compression.image import Image
from diskrsync.compression.maintenance import verify
from diskrsync.synccore import protocol as p

DISKRSYNC = [sys.executable, "-m", "diskrsync.cli"]
MEMORY_LIMIT = 1 << 30  # address space of a child; gigabyte allocations fail under it
TIMEOUT = float(os.environ.get("DISKRSYNC_HOSTILE_TIMEOUT", 120))  # generous: catches hangs


def limit_memory(limit: int = MEMORY_LIMIT) -> None:
    """preexec_fn: cap the child's address space."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_bounded(argv: list[str], stdin: bytes, *, env: dict[str, str] | None = None,
                cwd: Path | None = None,
                timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with ``stdin`` under the memory limit; TimeoutExpired means it hung."""
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                          preexec_fn=limit_memory, env=env, cwd=cwd)


def frame(t: int, payload: bytes) -> bytes:
    """A raw native frame of type ``t`` (no checks: the point is to send anything)."""
    return struct.pack("<IB", len(payload) + 1, t) + payload


def json_frame(t: int, body: dict[str, Any] | str) -> bytes:
    """A JSON frame from a dict or from raw text (for what json.dumps would not write)."""
    text = body if isinstance(body, str) else json.dumps(body)
    return frame(t, text.encode())


def hello(role: str = "source", size: int = 0, chunk_size: int = 16384,
          **fields: Any) -> dict[str, Any]:
    """The fields of a well-formed Hello; override any with ``fields``."""
    d: dict[str, Any] = {"role": role, "size": size, "chunk_size": chunk_size, "fanout": 128,
                         "software": "hostile 0", "info": {"hash": p.HASH,
                                                           "caps": list(p.CAPABILITIES)}}
    d.update(fields)
    return d


def one_error_line(stderr: bytes) -> bool:
    """What a user must see: one ``diskrsync: ...`` line and no traceback."""
    text = stderr.decode(errors="replace").strip()
    return text.startswith("diskrsync: ") and "\n" not in text and "Traceback" not in text


@dataclass(frozen=True)
class ImageState:
    """What must not change when a push fails: generations, checkpoint, what the retained
    generations store, health. ``file_size`` may grow by what the peer sent (written into
    free space, reclaimed by the next writer), never by more."""

    generations: tuple[tuple[int, bytes], ...]
    checkpoint: bool
    stored: int
    verify_ok: bool
    file_size: int = field(compare=False)


def image_state(path: Path | str) -> ImageState:
    img = Image.open(str(path))
    try:
        gens = tuple((g.number, g.root_hash) for g in img.generations())
        return ImageState(gens, img.table.checkpoint is not None, img.usage()["stored"],
                          verify(img).ok, os.stat(path).st_size)
    finally:
        img.close()
