"""mount and umount."""

from __future__ import annotations

import argparse
import os

from diskrsync.compression.container import open_image
from diskrsync.fsmount.mount import mount_main, umount_main


def cmd_mount(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.image)
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    mount_main(lambda: open_image(path), args.mountpoint, foreground=args.foreground,
               generation=args.generation, allow_other=args.allow_other,
               cache_size=args.cache_size, verbose=args.verbose, log_file=log_file)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    umount_main(args.mountpoint)
    return 0
