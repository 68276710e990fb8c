"""Where the material beside the repository lives (CI clones elsewhere with shared/ beside it)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_dir(name: str) -> Path:
    """``../shared/NAME`` beside the checkout, or $DISKRSYNC_SHARED/NAME, or /work/shared/NAME."""
    candidates = [
        Path(os.environ["DISKRSYNC_SHARED"]) / name if "DISKRSYNC_SHARED" in os.environ else None,
        REPO.parent / "shared" / name,
        Path("/work/shared") / name,
    ]
    for c in candidates:
        if c is not None and c.is_dir():
            return c
    return REPO.parent / "shared" / name


VECTORS = Path(os.environ["DISKRSYNC_VECTORS"]) if "DISKRSYNC_VECTORS" in os.environ \
    else shared_dir("vectors")
