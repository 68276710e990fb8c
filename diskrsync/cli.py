"""Command line entry point (filled in below as subcommands land)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("diskrsync: not yet", file=sys.stderr)
    return 1
