"""Converting the Go tool's ``SPGZ0001`` files into diskrsync images.

A conversion writes a new image whose first generation is the old file's content, under a
temporary name beside the new path, and links it into place only once complete: an
interrupted conversion leaves no half image, and an existing file is never replaced.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from diskrsync.base.errors import UsageError, from_oserror
from diskrsync.compression.api import GenerationInfo
from diskrsync.compression.container import sniff
from diskrsync.compression.image import fsync_dir, remove_stale_temps, temp_name
from diskrsync.compression.importer import write_new_image
from diskrsync.compression.spgz import SpgzImage

__all__ = ["CONVERT_SOURCE", "convert", "convert_file", "convert_snapshot"]

#: ``source`` recorded in the generation a conversion creates.
CONVERT_SOURCE = "converted from SPGZ0001"


def convert_snapshot(
    snap: Any,
    path: str,
    *,
    chunk_size: int,
    source: str = CONVERT_SOURCE,
    meta: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> GenerationInfo:
    """Write ``snap``'s content (anything with ``size`` and thread-safe ``read``) into a new
    image at ``path`` as its first generation; ``path`` must not exist. The caller removes
    ``path`` if this fails."""

    return write_new_image(snap.read, snap.size, path, chunk_size=chunk_size, source=source,
                           meta=meta, progress=progress)


def convert_file(old: str, new: str, *, chunk_size: int,
                 progress: Callable[[int], None] | None = None) -> GenerationInfo:
    """Convert the SPGZ0001 file ``old`` into a new image ``new`` (which must not exist)."""

    spgz = SpgzImage.open(old)
    try:
        snap = spgz.snapshot()
        try:
            meta = {"converted_from": os.path.abspath(old), "format": "SPGZ0001",
                    "spgz_block_size": snap.chunk_size}
            return convert_snapshot(snap, new, chunk_size=chunk_size, meta=meta,
                                    progress=progress)
        finally:
            snap.close()
    finally:
        spgz.close()


def convert(old: str, new: str, *, chunk_size: int,
            progress: Callable[[int], None] | None = None,
            log: Callable[[str], None] = lambda _m: None) -> GenerationInfo:
    """``diskrsync convert OLD NEW``: an SPGZ0001 file into a new diskrsync image, built
    under a temporary name and linked to NEW when complete (never over an existing NEW)."""

    if os.path.isdir(old):
        raise UsageError(f"{old} is a directory, not an SPGZ0001 file")
    kind = sniff(old)
    if kind == "image":
        raise UsageError(f"{old} is already a diskrsync image: nothing to convert")
    if kind != "spgz":
        raise UsageError(f"{old} is not an SPGZ0001 file (no SPGZ0001 magic)")
    if os.path.lexists(new):
        raise UsageError(f"{new} already exists; refusing to overwrite it")
    folder = os.path.dirname(os.path.abspath(new))
    if not os.path.isdir(folder):
        raise UsageError(f"directory {folder} does not exist")
    remove_stale_temps(new, log)
    temp = temp_name(new, "convert")
    try:
        gen = convert_file(old, temp, chunk_size=chunk_size, progress=progress)
        try:
            os.link(temp, new)  # fails if NEW appeared meanwhile: never clobbered
            fsync_dir(new)
        except FileExistsError:
            raise UsageError(f"{new} already exists; refusing to overwrite it") from None
        except OSError as e:
            raise from_oserror(e, f"creating {new}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return gen
