"""Commands for working with the original Go diskrsync (filled in with the Go interop work)."""

from __future__ import annotations

from diskrsync.errors import UsageError


def looks_like_go_remote(argv: list[str]) -> bool:
    """True when argv is what a Go diskrsync client runs on its remote end."""
    return bool(argv) and argv[0].strip() in ("--target", "--source")


def go_remote_main(argv: list[str]) -> int:
    raise UsageError("acting as the remote end of a Go diskrsync client is not implemented yet")


def convert(old: str, new: str, *, chunk_size: int) -> int:
    raise UsageError("convert is not implemented yet")
