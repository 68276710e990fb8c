"""mount and umount: an image, or a disk in a repository."""

from __future__ import annotations

import argparse
import os

from diskrsync.base.errors import UsageError
from diskrsync.cli.keys import keyring
from diskrsync.cli.requests import s3_options
from diskrsync.compression.blobcache import BlobCache
from diskrsync.compression.container import open_image
from diskrsync.compression.repolocation import RepoLocation, open_repository, parse_repo_location
from diskrsync.compression.repository import RepoDisk
from diskrsync.fsmount.mount import mount_main, umount_main


def cmd_mount(args: argparse.Namespace) -> int:
    loc = parse_repo_location(args.image)
    if loc is not None:
        return repo_mount(loc, args)
    if args.cache_dir:
        raise UsageError("--cache-dir is for repository disks (an image is read locally)")
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


def repo_mount(loc: RepoLocation, args: argparse.Namespace) -> int:
    disk = loc.need_disk("mount")
    ring, s3 = keyring(args), s3_options(args)
    cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else None
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    if not loc.is_s3:  # the daemon changes its directory to /
        loc = RepoLocation(os.path.abspath(loc.store), loc.disk, loc.text)
    # opened once here, before the mount forks (a passphrase prompt needs the terminal;
    # a wrong location fails in the foreground)
    first = open_repository(loc, keyring=ring, s3=s3)
    if not first.generations(disk):
        raise UsageError(f"{loc.text}: the repository has no disk {disk}")

    def opener() -> RepoDisk:
        repo = open_repository(loc, keyring=ring, s3=s3)
        if cache_dir is not None:
            repo.cache = BlobCache(cache_dir, args.cache_size)
        return RepoDisk(repo, disk)

    mount_main(opener, args.mountpoint, foreground=args.foreground,
               generation=args.generation, allow_other=args.allow_other,
               cache_size=args.cache_size, verbose=args.verbose, log_file=log_file)
    return 0



def cmd_umount(args: argparse.Namespace) -> int:
    umount_main(args.mountpoint)
    return 0
