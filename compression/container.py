"""Open whatever disk container a path holds: a diskrsync image or a Go ``SPGZ0001`` file."""

from __future__ import annotations

import os
import stat

from diskrsync.base.errors import DataError, UsageError, from_oserror
from diskrsync.compression.crypto import Keyring
from diskrsync.compression.format import MAGIC
from diskrsync.compression.image import Image
from diskrsync.compression.spgz import MAGIC as SPGZ_MAGIC
from diskrsync.compression.spgz import SpgzImage


def sniff(path: str) -> str | None:
    """"image", "spgz", or None for anything else (raw files, devices, empty files).

    Opened non-blocking and checked on the descriptor: a FIFO or a terminal given as an image
    is "not an image" at once, never a read that waits forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise from_oserror(e, f"cannot open {path}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"{path} is a directory, not an image")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return None
        head = os.pread(fd, len(MAGIC), 0)
        # the first superblock may be damaged: try the second slot
        if head == MAGIC or os.pread(fd, len(MAGIC), 4096) == MAGIC:
            return "image"
    except OSError as e:
        raise from_oserror(e, f"cannot read {path}") from None
    finally:
        os.close(fd)
    return "spgz" if head == SPGZ_MAGIC else None


def open_image(path: str, *, accept_loss: bool = False,
               keyring: Keyring | None = None) -> Image | SpgzImage:
    """The container at ``path``; a clear error for anything that is not one.
    ``accept_loss``, ``keyring``: see ``Image.open``."""
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "image":
        return Image.open(path, accept_loss=accept_loss, keyring=keyring)
    if kind == "spgz":
        return SpgzImage.open(path)
    raise DataError(f"{path} is not a diskrsync image or SPGZ0001 file")
