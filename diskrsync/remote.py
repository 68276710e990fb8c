"""Pushes where one end is on another host, over SSH (filled in with the SSH work)."""

from __future__ import annotations

import argparse
from typing import Any

from diskrsync.errors import UsageError


def remote_push(src: Any, dst: Any, req: Any, args: argparse.Namespace) -> Any:
    raise UsageError("remote pushes are not implemented yet")


def restricted_serve(args: argparse.Namespace) -> int:
    raise UsageError("serve --restrict-to is not implemented yet")
