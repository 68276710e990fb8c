"""Work against history (issue 16): what a push, ``info`` and ``prune`` do on an image must
grow at most linearly with its generations. Counted in Python function calls, not timed: a
quadratic step (a list searched for each generation, say) multiplies the count by 16 when
the history grows 4 times, a linear one by 4."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from diskrsync.compression.image import Image
from diskrsync.compression.maintenance import image_info

pytestmark = pytest.mark.inproc

CS = 16384


def calls(fn: Callable[[], Any]) -> int:
    """Python function calls made on this thread while ``fn`` runs."""
    n = 0

    def count(_frame: FrameType, event: str, _arg: Any) -> None:
        nonlocal n
        if event == "call":
            n += 1

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def commit_one(img: Image, g: int, keep: int) -> None:
    tx = img.begin()
    tx.resize(2 * CS)
    tx.write_chunk(g % 2, g.to_bytes(8, "little") * (CS // 8))
    tx.commit(source="history", meta={"note": "x" * 20, "list": [1, 2, 3]}, keep=keep)
    img.refresh()


def history(tmp_path: Any, n: int) -> Image:
    """An image of ``n`` generations, half of them pruned after: the pruned ones are
    zombies in one superblock slot's table, which every later transaction looks at."""
    img = Image.create(str(tmp_path / f"h{n}.spgz"), chunk_size=CS, fanout=4)
    for g in range(n):
        commit_one(img, g, keep=10 * n)
    img.prune(n // 2)
    img.refresh()
    commit_one(img, n, keep=10 * n)
    return img


def pin_all(img: Image) -> None:
    img.refresh()
    for g in img.generations():
        img.snapshot(g.number).close()


def work(img: Image, n: int) -> dict[str, int]:
    return {
        "push": calls(lambda: commit_one(img, n + 1, keep=10 * n)),
        "info": calls(lambda: image_info(img)),
        "pin each (the mount's start)": calls(lambda: pin_all(img)),
        "prune": calls(lambda: img.prune(n // 2 - 1)),
        "push after prune": calls(lambda: commit_one(img, n + 2, keep=10 * n)),
    }


def test_work_grows_linearly_with_history(tmp_path):
    small, large = work(history(tmp_path, 40), 40), work(history(tmp_path, 160), 160)
    for what in small:
        # 4x the generations: linear work grows at most 4x (less, with fixed costs)
        assert large[what] < 5 * small[what], (what, small[what], large[what])
