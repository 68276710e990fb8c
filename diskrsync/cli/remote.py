"""``push`` with a remote end (over SSH, or ``--legacy`` toward a Go diskrsync): imported only
then, since it loads the SSH stack."""

from __future__ import annotations

import argparse

from diskrsync.cli.requests import remote_options
from diskrsync.synccore.go_remote import legacy_push
from diskrsync.synccore.location import Location
from diskrsync.synccore.push import PushRequest
from diskrsync.synccore.remote import remote_push
from diskrsync.synccore.source import PushStats


def push(src: Location, dst: Location, req: PushRequest, args: argparse.Namespace) -> PushStats:
    """The push engine for a remote end, with the CLI's flags as typed options."""
    opts = remote_options(args)
    if args.legacy:
        return legacy_push(src, dst, req, opts)
    return remote_push(src, dst, req, opts)
