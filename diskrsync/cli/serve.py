"""``diskrsync serve``: the remote end of a push, started over SSH (also as a forced command)."""

from __future__ import annotations

import argparse
import os

from diskrsync.base.errors import UsageError
from diskrsync.cli.requests import push_request
from diskrsync.remote import restricted_serve
from diskrsync.synccore.channel import FdStream, FramedChannel
from diskrsync.synccore.push import run_target_end, serve_source


def cmd_serve(args: argparse.Namespace) -> int:
    if args.restrict_to or args.append_only or os.environ.get("SSH_ORIGINAL_COMMAND"):
        return restricted_serve(args)  # owns stdout: it may have to send a refusal
    if args.keep is None:
        args.keep = 2  # the client always names it; a person typing serve may not
    if not (args.target or args.source):
        raise UsageError("serve needs --target PATH or --source PATH")
    # stdout carries the protocol: nothing else may be printed there
    out_fd = os.dup(1)
    os.dup2(2, 1)
    channel = FramedChannel(FdStream(0, out_fd, args.timeout))
    if args.target:
        run_target_end(channel, args.target, push_request(args), verify=True)
    else:
        # the source's options (--dry-run, --ignore-read-errors) come from the pulling client
        serve_source(channel, args.source, args.generation, push_request(args).source)
    return 0
