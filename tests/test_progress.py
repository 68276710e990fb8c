"""The progress line: only on a terminal, in the summaries' units (KiB, MiB: powers of 1024),
drawn also where the terminal reports 0 columns, and reaching its total in verify."""

from __future__ import annotations

import io
import os
import pty
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskrsync.base import progress
from diskrsync.base.progress import Progress
from diskrsync.cli.main import main
from diskrsync.compression.image import Image
from diskrsync.compression.maintenance import verify, verify_chunks

MiB = 1 << 20


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal and has no size (like a serial console)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.pure
def test_nothing_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(10 * MiB, "push", stream=out)
    bar.update(MiB)
    bar.close()
    assert out.getvalue() == "" and not bar.on


@pytest.mark.pure
def test_disabled_prints_nothing_on_a_terminal() -> None:
    out = FakeTerminal()
    bar = Progress(10 * MiB, "push", False, stream=out)
    bar.update(MiB)
    bar.close()
    assert out.getvalue() == ""


@pytest.mark.pure
def test_drawn_with_zero_columns_and_erased() -> None:
    out = FakeTerminal()
    bar = Progress(10 * MiB, "restore", stream=out)
    bar.update(3 * MiB)
    drawn = out.getvalue()
    assert drawn.startswith("\rrestore:  30% [") and "3.0 MiB of 10.0 MiB" in drawn
    assert len(drawn) <= progress.FALLBACK_COLUMNS
    bar.close()
    assert out.getvalue().endswith("\r") and out.getvalue().count("\r") == 3


@pytest.mark.pure
def test_zero_columns_of_a_real_terminal() -> None:
    """A pty that reports 0x0 (what `stty size` says on some consoles) still gets a line."""
    leader, follower = pty.openpty()
    try:
        assert os.get_terminal_size(follower).columns == 0
        with os.fdopen(os.dup(follower), "w") as stream:
            assert progress.columns(stream) == progress.FALLBACK_COLUMNS
            bar = Progress(MiB, "verify", stream=stream)
            assert bar.on
            bar.update(MiB // 2)
            bar.close()
        assert b"verify:  50%" in os.read(leader, 4096)
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.pure
def test_units_are_the_summaries() -> None:
    """Regression: the bar said "MB" and "MB/s" for powers of 1024."""
    bar = Progress(4 << 30, "push", stream=FakeTerminal())
    bar.done, bar.sent = 1 << 30, 5 * MiB
    line = bar.line(bar.started + 4, 100)
    assert "1.0 GiB of 4.0 GiB" in line and "256.0 MiB/s" in line and "sent 5.0 MiB" in line
    assert "ETA 0:12" in line and " 25% [" in line and len(line) == 99
    assert "MB" not in line


@pytest.mark.pure
def test_unknown_total_and_counted_units() -> None:
    pull = Progress(0, "pull", stream=FakeTerminal())
    pull.done = 3 * MiB
    line = pull.line(pull.started + 1, 80)
    assert line == "pull: 3.0 MiB 3.0 MiB/s"
    chunks = Progress(200, "verify", unit="chunks", stream=FakeTerminal())
    chunks.done = 50
    line = chunks.line(chunks.started + 1, 30)
    assert line.startswith("verify:  25% 50 chunks of 200") and len(line) == 29


@pytest.mark.pure
def test_a_new_stage_starts_over_with_its_own_total_and_unit() -> None:
    bar = Progress(0, "prune", stream=FakeTerminal())
    bar.stage("prune: marking", 4, "generations")
    bar.update(4)
    bar.stage("prune: repacking", 8 * MiB)
    bar.update(2 * MiB)
    line = bar.line(bar.started + 1, 120)
    assert line.startswith("prune: repacking:  25% [") and "2.0 MiB of 8.0 MiB" in line


@pytest.fixture
def _keep_sigterm() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.usefixtures("_keep_sigterm")
@pytest.mark.inproc
def test_verify_progress_reaches_its_total(tmp_path: Path) -> None:
    src, img = tmp_path / "disk.img", tmp_path / "disk.spgz"
    src.write_bytes(os.urandom(MiB) + bytes(MiB) + os.urandom(MiB // 2))
    assert main(["push", "-q", "--chunk-size", "16K", str(src), str(img)]) == 0
    with open(src, "r+b") as f:
        f.write(b"x")
    assert main(["push", "-q", str(src), str(img)]) == 0
    counted: list[int] = []
    with Image.open(str(img)) as image:
        total = verify_chunks(image)
        report = verify(image, progress=counted.append)
        assert verify_chunks(image, 1) == total // 2
    assert report.ok and total == 2 * (5 * 64 // 2) and sum(counted) == total
