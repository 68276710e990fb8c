"""The worker pool: as many threads as cores (capped), ``--workers`` to choose."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskrsync.base import parallel
from diskrsync.base.errors import UsageError
from diskrsync.base.parallel import (
    MAX_AUTO_WORKERS,
    ordered_map,
    set_workers,
    worker_count,
)
from diskrsync.cli.main import main


@pytest.fixture(autouse=True)
def _default_workers() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)  # main() installs its handler
    yield
    set_workers(None)
    signal.signal(signal.SIGTERM, before)


@pytest.mark.pure
@pytest.mark.parametrize(("cores", "want"), [(None, 1), (1, 1), (2, 2), (16, 16),
                                             (64, MAX_AUTO_WORKERS)])
def test_workers_follow_the_cores(monkeypatch: pytest.MonkeyPatch, cores: int | None,
                                  want: int) -> None:
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: cores)
    assert worker_count() == want
    set_workers(3)
    assert worker_count() == 3
    set_workers(None)
    assert worker_count() == want


@pytest.mark.pure
@pytest.mark.parametrize("n", [0, -1, 10_000])
def test_workers_out_of_range_is_a_usage_error(n: int) -> None:
    with pytest.raises(UsageError):
        set_workers(n)


@pytest.mark.pure
@pytest.mark.parametrize("n", [1, 3, 8])
def test_ordered_map_keeps_every_worker_busy(n: int) -> None:
    """n tasks run at once on n workers (a barrier of n is passed), in order, even with a
    window smaller than n asked for."""
    set_workers(n)
    barrier = threading.Barrier(n, timeout=30)  # a guard against hanging, not a timing

    def task(i: int) -> int:
        if i < n:
            barrier.wait()
        return i * i

    assert list(ordered_map(task, range(4 * n), window=2)) == [i * i for i in range(4 * n)]


@pytest.mark.inproc
def test_workers_option(tmp_path: Path) -> None:
    src, img, out = tmp_path / "disk.img", tmp_path / "disk.spgz", tmp_path / "out.img"
    src.write_bytes(bytes(range(256)) * 8192)
    assert main(["push", "-q", "--workers", "1", str(src), str(img)]) == 0
    assert main(["verify", "--workers", "3", str(img)]) == 0
    assert main(["restore", "-q", "--workers", "2", str(img), str(out)]) == 0
    assert out.read_bytes() == src.read_bytes()
    assert worker_count() == 2
    assert main(["info", str(img)]) == 0  # a command without the option: one per core again
    assert worker_count() == min(parallel.os.cpu_count() or 1, MAX_AUTO_WORKERS)
    assert main(["push", "-q", "--workers", "0", str(src), str(img)]) == 2
