"""mount and umount."""

from __future__ import annotations

import argparse
import os

from diskrsync.cli.keys import keyring
from diskrsync.compression.container import open_image
from diskrsync.fsmount.mount import mount_main, umount_main


def cmd_mount(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.image)
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    # the key is unlocked here, before the mount forks into the background (a prompt needs
    # the terminal); the daemon then opens the image with it
    ring = keyring(args)
    with open_image(path, keyring=ring):
        pass
    mount_main(lambda: open_image(path, keyring=ring), args.mountpoint, foreground=args.foreground,
               generation=args.generation, allow_other=args.allow_other,
               cache_size=args.cache_size, verbose=args.verbose, log_file=log_file)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    umount_main(args.mountpoint)
    return 0
