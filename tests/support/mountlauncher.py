"""Mount an image in this process, for tests and benchmarks that need a real FUSE mount.

    python mountlauncher.py OPENER ARG MOUNTPOINT [OPTIONS_JSON]

OPENER is ``module:callable`` (e.g. ``support.fakeimage:DirectoryImage``, or later the real
image's opener); it is called as ``callable(ARG)`` to open the image, after the fork when
mounting in the background. OPTIONS_JSON holds ``mount_main`` keyword options, e.g.
``{"foreground": true, "ready_fd": 5, "generation": 2}``. Like the CLI, prints
``diskrsync: MESSAGE`` and exits with the error's code when ``mount_main`` raises.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `support` importable

from diskrsync.base.errors import DiskrsyncError
from diskrsync.compression.api import DiskImage
from diskrsync.fsmount.mount import mount_main


def opener(spec: str, arg: str) -> Callable[[], DiskImage]:
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return lambda: factory(arg)


def main(argv: list[str]) -> int:
    spec, arg, mountpoint = argv[:3]
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    try:
        mount_main(opener(spec, arg), mountpoint, **options)
    except DiskrsyncError as exc:
        print(f"diskrsync: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
