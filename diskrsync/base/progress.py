"""Progress on a terminal: the sink long operations report to.

One line on stderr, redrawn a few times a second and erased at the end, in the units of every
summary (``human``: KiB, MiB, GiB, powers of 1024). Nothing at all when stderr is not a
terminal, so logs, pipes and cron mails stay clean. A terminal that reports 0 columns (a
serial console, some containers) still gets a line, 80 columns wide.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from diskrsync.base.units import human

#: Seconds between redraws (updates arrive far more often: one per chunk batch).
INTERVAL = 0.2
#: Width used when the terminal does not say (0 columns) or cannot be asked.
FALLBACK_COLUMNS = 80


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def columns(stream: TextIO) -> int:
    """The terminal's width, or ``FALLBACK_COLUMNS`` when it reports none."""
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        cols = 0
    return cols if cols > 0 else FALLBACK_COLUMNS


class Progress:
    """A progress line for ``total`` units (0: unknown) of ``desc``; ``unit`` is ``"B"``
    (bytes, written as ``human`` writes them) or a word counted as is (``"chunks"``).
    Thread-safe: worker threads may report."""

    def __init__(self, total: int, desc: str, enabled: bool = True, *, unit: str = "B",
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.on = enabled and self.stream.isatty()
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.sent: int | None = None
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._width = 0  # of the line on screen, to erase it
        self._lock = threading.Lock()

    def update(self, n: int, sent: int | None = None) -> None:
        """Advance by ``n`` units; ``sent``: bytes sent so far (pushes)."""
        if not self.on:
            return
        with self._lock:
            self.done += n
            if sent is not None:
                self.sent = sent
            now = time.monotonic()
            if now - self._drawn_at >= INTERVAL:
                self._draw(now)

    def stage(self, desc: str, total: int, unit: str = "B") -> None:
        """Start over for the next step of a command of several (prune: marking, then
        repacking, then deleting), each with its own total and unit."""
        with self._lock:
            self.desc, self.total, self.unit = desc, total, unit
            self.done, self.sent = 0, None
            self.started = time.monotonic()
            self._drawn_at = 0.0

    def set_total(self, total: int) -> None:
        """The total, once known (a pull learns it from the other end)."""
        with self._lock:
            self.total = total

    def _amount(self, n: float) -> str:
        return human(n) if self.unit == "B" else f"{n:.0f} {self.unit}"

    def line(self, now: float, width: int) -> str:
        """The line for the state at ``now``, at most ``width - 1`` characters."""
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}:"
        if self.total:
            head += f" {min(100, self.done * 100 // self.total):3d}%"
            amount = f"{self._amount(self.done)} of {self._amount(self.total)}"
        else:
            amount = self._amount(self.done)
        tail = [amount, f"{self._amount(rate)}/s"]
        if self.sent is not None:
            tail.append(f"sent {human(self.sent)}")
        if self.total and rate > 0 and self.done < self.total:
            tail.append(f"ETA {_duration((self.total - self.done) / rate)}")
        text = " ".join(tail)
        room = width - 1 - len(head) - len(text) - 4
        if self.total and room >= 10:
            filled = min(room, room * self.done // self.total)
            return f"{head} [{'#' * filled}{'-' * (room - filled)}] {text}"
        return f"{head} {text}"[: width - 1]

    def _draw(self, now: float) -> None:
        text = self.line(now, columns(self.stream))
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
        self._drawn_at = now

    def close(self) -> None:
        """Erase the line (the summary follows where it was)."""
        with self._lock:
            if self.on and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
            self.on = False
