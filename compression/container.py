"""Open whatever disk container a path holds: a diskrsync image or a Go ``SPGZ0001`` file."""

from __future__ import annotations

import os

from diskrsync.base.errors import DataError, UsageError, from_oserror
from diskrsync.compression.format import MAGIC
from diskrsync.compression.image import Image
from diskrsync.compression.spgz import MAGIC as SPGZ_MAGIC
from diskrsync.compression.spgz import SpgzImage


def sniff(path: str) -> str | None:
    """"image", "spgz", or None for anything else (raw files, devices, empty files)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            if head != MAGIC:  # the first superblock may be damaged: try the second slot
                f.seek(4096)
                if f.read(len(MAGIC)) == MAGIC:
                    return "image"
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not an image") from None
    except OSError as e:
        raise from_oserror(e, f"cannot open {path}") from None
    if head == MAGIC:
        return "image"
    if head == SPGZ_MAGIC:
        return "spgz"
    return None


def open_image(path: str, *, accept_loss: bool = False) -> Image | SpgzImage:
    """The container at ``path``; a clear error for anything that is not one.
    ``accept_loss``: see ``Image.open``."""
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "image":
        return Image.open(path, accept_loss=accept_loss)
    if kind == "spgz":
        return SpgzImage.open(path)
    raise DataError(f"{path} is not a diskrsync image or SPGZ0001 file")
