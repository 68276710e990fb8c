"""The remote end a Go diskrsync client starts over SSH: ``CMD --target|--source [FLAGS] PATH``.

stdin/stdout carry BSNC0002; stdout is moved aside first so that nothing else can be printed
there. stderr carries log lines and, if asked, the progress lines the Go client parses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from diskrsync.base.errors import PeerError
from diskrsync.synccore.go_io import fd_recv, fd_send
from diskrsync.synccore.go_remote import serve_go
from diskrsync.synccore.legacy import parse_go_remote_args


class _Stopped(PeerError):
    """SIGTERM/SIGHUP: the connection is gone; unwind so nothing half done is kept."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stopped(f"stopped by signal {signal.Signals(signum).name}: nothing was committed")


def _stderr(text: str) -> None:
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def _log(message: str) -> None:
    _stderr(f"diskrsync: {message}\n")


def go_remote_main(argv: list[str]) -> int:
    """Act as the Go tool's remote end: ``[CMD] --target|--source [FLAGS] PATH``."""
    req = parse_go_remote_args(argv)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stdout carries the protocol: nothing else may be printed there
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        pipe = (fd_recv(0, "the Go client"), fd_send(out_fd, "the Go client"))
        serve_go(req, pipe, log=_log, write=_stderr)
    finally:
        with contextlib.suppress(OSError):
            os.close(out_fd)
    return 0
