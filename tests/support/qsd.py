"""A real qemu-storage-daemon for tests: a qcow2 with a persistent dirty bitmap, exported over
NBD on a unix socket, with QMP on another socket, stopped on exit even when the test fails.

Tests of dirty bitmaps must meet QEMU itself (its block status replies, what it refuses on a
busy bitmap, transactions), not a stand-in that shares our reading of the protocol. Writes
between pushes go through NBD (``write``), as a guest's would go through QEMU: never behind
the daemon's back into the qcow2 file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from diskrsync.compression.nbd import NbdAddress, NbdClient
from diskrsync.compression.qmp import Qmp

QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
NODE = "disk0"  # the qcow2 node, and the name of the NBD export of it
START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, even killed (no teardown then)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def available() -> bool:
    return os.path.exists(QSD) and os.path.exists(QEMU_IMG)


class StorageDaemon:
    """``qemu-storage-daemon`` on ``dir/disk.qcow2`` (created with ``size`` bytes and, when
    ``bitmap`` is given, that persistent dirty bitmap); ``export_bitmap``: also offer the
    bitmap on the writable export (then it is busy: QMP cannot clear it)."""

    def __init__(self, dir: Path, size: int, bitmap: str | None = "b0",
                 export_bitmap: bool = False, cluster_size: int = 65536) -> None:
        self.dir = Path(dir)
        self.image = self.dir / "disk.qcow2"
        self.nbd_socket = self.dir / "nbd.sock"
        self.qmp_socket = self.dir / "qmp.sock"
        self.size = size
        self.bitmap = bitmap
        self.export_bitmap = export_bitmap
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: NbdClient | None = None
        if not self.image.exists():
            subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
                            f"cluster_size={cluster_size}", str(self.image), str(size)],
                           check=True)
            if bitmap:
                subprocess.run([QEMU_IMG, "bitmap", "--add", str(self.image), bitmap],
                               check=True)

    @property
    def url(self) -> str:
        return f"nbd+unix:///{NODE}?socket={self.nbd_socket}"

    def start(self) -> StorageDaemon:
        for s in (self.nbd_socket, self.qmp_socket):
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
        export = f"type=nbd,id={NODE},node-name={NODE},name={NODE},writable=on"
        if self.export_bitmap and self.bitmap:
            export += f",bitmaps.0={self.bitmap}"
        argv = [
            QSD,
            "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
            "--blockdev", f"driver=qcow2,node-name={NODE},file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}",
            "--export", export,
            "--chardev", f"socket,id=qmp0,path={self.qmp_socket},server=on,wait=off",
            "--monitor", "chardev=qmp0",
        ]
        log = open(self.dir / "qsd.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited: {self.log()}")
            try:
                Qmp(str(self.qmp_socket)).close()
                self._client = NbdClient(NbdAddress(NODE, socket_path=str(self.nbd_socket)))
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "qsd.log").read_text(errors="replace")
        return ""

    # -- what tests do with it ---------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """Write through NBD, as a guest writes through QEMU (the bitmap records it)."""
        assert self._client is not None
        self._client.write(offset, data)
        self._client.flush()

    def read(self, offset: int, length: int) -> bytes:
        assert self._client is not None
        return self._client.read(offset, length)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command on a connection of its own: QEMU's monitor serves one client at a
        time, and a push under test needs it too."""
        q = Qmp(str(self.qmp_socket))
        try:
            return q.execute(command, **arguments)
        finally:
            q.close()

    def bitmaps(self) -> dict[str, dict[str, Any]]:
        """The disk node's dirty bitmaps by name: QEMU's ``count`` is the dirty bytes."""
        for n in self.qmp("query-named-block-nodes", flat=True):
            if n.get("node-name") == NODE:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
        return {}

    def contents(self) -> bytes:
        return self.read(0, self.size)

    # -- stopping -------------------------------------------------------------------------

    def stop(self) -> None:
        """Quit through QMP (bitmaps are stored cleanly), kill if that does not work."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            q = Qmp(str(self.qmp_socket), timeout=5)
            with contextlib.suppress(Exception):
                q.execute("quit")
            q.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> StorageDaemon:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
