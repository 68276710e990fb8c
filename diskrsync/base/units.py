"""Sizes, durations and byte counts as users type and read them."""

from __future__ import annotations

import argparse
import re

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_seconds(text: str) -> float:
    """A non-negative number of seconds (0: never)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def parse_size(text: str) -> int:
    """'128K', '256M', '1G' or plain bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and t[-1:] else ""
    try:
        n = int(float(t[: len(t) - len(unit)]) * SIZE_UNITS[unit])
    except (ValueError, OverflowError):  # OverflowError: "inf"
        n = -1
    if not 0 <= n < 1 << 63:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128K, 256M)")
    return n


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


#: Duration units as restic writes them (``2y5m7d3h``): m is a month, min a minute.
DURATION_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400,
                  "m": 30 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(min|[smhdwy])")


def parse_duration(text: str) -> float:
    """``7d``, ``36h``, ``2w``, ``1y6m`` (m: a month of 30 days; min: a minute; y: 365
    days), ``90s`` or plain seconds, as seconds."""
    t = text.strip()
    total = -1.0
    if re.fullmatch(r"\d+(\.\d+)?", t):
        total = float(t)
    elif t and _DURATION.sub("", t) == "":
        total = sum(float(n) * DURATION_UNITS[u] for n, u in _DURATION.findall(t))
    if not 0 <= total < 1e12:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 7d, 36h, 2w, 1y6m)")
    return total


def parse_rate(text: str) -> float:
    """A transfer rate as rsync's ``--bwlimit`` reads it, in bytes per second: a plain
    number is KiB/s; a unit K, M, G, T (powers of 1024, optionally followed by B or iB) or B
    alone (bytes), then optionally /s (``10M``, ``1.5MiB/s``, ``500K``, ``800``, ``100B``);
    0 means no limit."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(I?B)?(?:/S)?", text.strip().upper())
    value = -1.0
    if m and not (m[3] == "IB" and not m[2]):
        number, unit, suffix = float(m[1]), m[2], m[3]
        value = number * (SIZE_UNITS[unit] if unit or suffix else 1024)
    if not (value == 0 or 1 <= value < 1 << 50):
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 500K, 10M, 1.5MiB/s; "
                                         f"a plain number is KiB/s)")
    return value
