"""Child process that pins one generation of an image and reads it when told to.

    python pinreader.py IMAGE GENERATION

Prints ``pinned`` once the snapshot is open, waits for SIGUSR1, then reads the whole snapshot
and prints ``sha256 <hex> <size>``.
"""

from __future__ import annotations

import hashlib
import signal
import sys

from diskrsync.compression.image import Image


def main() -> None:
    path, number = sys.argv[1], int(sys.argv[2])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    img = Image.open(path)
    snap = img.snapshot(number)
    img.close()
    print("pinned", flush=True)
    signal.sigwait({signal.SIGUSR1})
    h = hashlib.sha256()
    for off in range(0, snap.size, 1 << 20):
        h.update(snap.read(off, 1 << 20))
    print(f"sha256 {h.hexdigest()} {snap.size}", flush=True)
    snap.close()


if __name__ == "__main__":
    main()
