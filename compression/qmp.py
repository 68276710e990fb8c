"""QEMU's monitor (QMP) over a unix socket, and the dirty bitmap a push manages through it.

A dirty bitmap exported over NBD is busy: QEMU refuses to clear or remove it while the export
lives. So a managed push never exports the bitmap that records changes; it works on copies:

1. At the start, in one QMP ``transaction`` (atomic with respect to guest writes): add
   ``NAME.next`` (persistent, recording) and ``NAME.scan`` (a frozen copy of ``NAME``), and
   start a ``blockdev-backup`` job with ``sync=none`` into a scratch qcow2 whose backing is
   the disk ("fleecing", as libvirt's and Proxmox's backups do): from this instant on the job
   copies every block the guest overwrites into the scratch file first, so the scratch node
   reads as the disk was at the start. Every write from this instant on is recorded in
   ``NAME`` *and* ``NAME.next``.
2. A read-only NBD export ``diskrsync-NAME`` of the scratch node offers ``NAME.scan`` (QEMU
   finds it on the backing disk); the push reads through it a point-in-time view of the disk,
   and only the ranges ``NAME.scan`` marks dirty. (A disk whose image is not a local file has
   no scratch file: it is exported live, and the user guide says to freeze the guest then.)
3. Only after the push **committed** a generation, one more transaction clears ``NAME``,
   merges ``NAME.next`` into it and removes ``NAME.next``: ``NAME`` then holds exactly the
   writes since the push started, which the next push reads (those made while this one read
   are read again: never too little).
4. Whatever happens (failure, Ctrl-C), the export, the job, the scratch node and file and
   ``NAME.scan`` are removed and ``NAME.next`` with them unless step 3 ran; ``NAME`` was
   never touched, so a failed push loses nothing. Leftovers of a killed push are removed by
   the next one before it starts.

``NAME`` missing (first push, or deleted), not recording or inconsistent (QEMU died with it
open): the push reads everything, and ``NAME`` is (re)created at step 1 so the next one need not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import zlib
from collections.abc import Iterator
from typing import Any

from diskrsync.base.errors import LocalError, UsageError

MAX_LINE = 16 << 20  # the longest QMP message accepted
EXPORT_GONE_TIMEOUT = 30.0  # seconds to wait for an export's clients to go away
JOB_TIMEOUT = 60.0  # seconds to wait for QEMU's jobs (creating the scratch file, cancelling)


class QmpError(LocalError):
    """QEMU's monitor refused a command or could not be reached."""


class Qmp:
    """A QMP client: ``execute`` returns the command's ``return`` value; events are skipped."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise QmpError(f"cannot connect to QEMU's monitor {path}: {e.strerror or e}") \
                from None
        self._file = self._sock.makefile("rb")
        try:
            greeting = self._message()
            if "QMP" not in greeting:
                raise QmpError(f"{path} is not a QMP monitor")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _message(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_LINE + 1)
        except OSError as e:
            raise QmpError(f"QEMU's monitor {self.path}: {e}") from None
        if not line:
            raise QmpError(f"QEMU's monitor {self.path} closed the connection")
        if len(line) > MAX_LINE:
            raise QmpError(f"QEMU's monitor {self.path} sent a message over {MAX_LINE} bytes")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QEMU's monitor {self.path} sent something that is not JSON") \
                from None
        if not isinstance(msg, dict):
            raise QmpError(f"QEMU's monitor {self.path} sent something that is not an object")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QEMU's monitor {self.path}: {e}") from None
        while True:
            msg = self._message()
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QmpError(f"QEMU refused {command}: {desc}")
            if "return" in msg:
                return msg["return"]
            raise QmpError(f"QEMU's monitor {self.path} answered {command} with neither "
                           f"a return nor an error")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def _dicts(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise QmpError(f"QEMU's {what} is not a list of objects")
    return value


class ManagedBitmap:
    """The dirty bitmap ``name`` of the disk behind NBD export ``export``, managed as the
    module docstring says. ``export_name`` is the NBD export to read from; ``scan_bitmap``
    is the frozen copy it offers (None: ``name`` was unusable, read everything)."""

    def __init__(self, qmp_path: str, export: str, name: str) -> None:
        if not name or len(name) > 900 or any(c in name for c in "\0/"):
            raise UsageError(f"bad dirty bitmap name {name!r}")
        self.name = name
        self.next = f"{name}.next"
        self.scan = f"{name}.scan"
        self.export_name = f"diskrsync-{name}"
        # QEMU's node names and job ids are short (31 characters): named by a checksum
        tag = f"drs{zlib.crc32(name.encode()):08x}"
        self.fleece, self.fleece_file = f"{tag}-fleece", f"{tag}-scratch"
        self.job, self.make_job = f"{tag}-backup", f"{tag}-create"
        self.scratch: str | None = None  # the scratch file, as QEMU names it
        self.scan_bitmap: str | None = None
        self.problem = ""  # why ``name`` could not be used, for the user
        self.live = ""  # why there is no scratch file (the disk is then read as it changes)
        self._path = qmp_path
        # QEMU's monitor serves one client at a time: it is held only while commands run
        with self._connected():
            # a killed push's backup job puts a filter node above the disk, where its export
            # then points: it goes first
            self._remove_export()
            self._remove_fleece()
            self.node = self._node_of(export)
            self._remove_copies()
            try:
                self._start()
            except BaseException:
                with contextlib.suppress(QmpError):
                    self._remove_leftovers()  # what _start made; NAME is as it was
                raise

    @contextlib.contextmanager
    def _connected(self) -> Iterator[None]:
        self.qmp = Qmp(self._path)
        try:
            yield
        finally:
            self.qmp.close()

    def _node_of(self, export: str) -> str:
        """The block node NBD export ``export`` serves: the export whose id is that name, else
        a node of that name (QEMU's default export name is its node's), else the one export."""
        exports = [e for e in _dicts(self.qmp.execute("query-block-exports"), "export list")
                   if e.get("type") == "nbd"]
        for e in exports:
            if e.get("id") == export and e.get("node-name"):
                return str(e["node-name"])
        if any(n.get("node-name") == export for n in self._nodes()):
            return export
        ours = [e for e in exports if not str(e.get("id", "")).startswith("diskrsync-")]
        if len(ours) == 1 and ours[0].get("node-name"):
            return str(ours[0]["node-name"])
        raise UsageError(f"cannot tell which of QEMU's block nodes export {export!r} serves: "
                         f"give the export the id or name of its node")

    def _nodes(self) -> list[dict[str, Any]]:
        return _dicts(self.qmp.execute("query-named-block-nodes", flat=True), "node list")

    def _bitmaps(self) -> dict[str, dict[str, Any]]:
        """The node's dirty bitmaps by name (QEMU's description of each)."""
        for n in self._nodes():
            if n.get("node-name") == self.node:
                # a backup job's own bitmap has no name
                return {str(b["name"]): b for b in _dicts(n.get("dirty-bitmaps", []),
                                                          "bitmap list") if "name" in b}
        raise QmpError(f"QEMU's block node {self.node} went away")

    def _remove_leftovers(self) -> None:
        """What a killed push left: its export, job, scratch node and file, the frozen copy,
        ``NAME.next`` (``NAME`` itself was never changed by it: it still holds every write)."""
        self._remove_export()
        self._remove_fleece()
        self._remove_copies()

    def _remove_copies(self) -> None:
        have = self._bitmaps()
        for b in (self.scan, self.next):
            if b in have:
                self.qmp.execute("block-dirty-bitmap-remove", node=self.node, name=b)

    def _remove_export(self) -> None:
        ids = {e.get("id") for e in _dicts(self.qmp.execute("query-block-exports"),
                                           "export list")}
        if self.export_name not in ids:
            return
        self.qmp.execute("block-export-del", id=self.export_name, mode="hard")
        deadline = time.monotonic() + EXPORT_GONE_TIMEOUT
        pause = 0.0005
        while self.export_name in {e.get("id") for e in _dicts(
                self.qmp.execute("query-block-exports"), "export list")}:
            if time.monotonic() > deadline:
                raise QmpError(f"QEMU did not remove export {self.export_name} in "
                               f"{EXPORT_GONE_TIMEOUT:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _jobs(self) -> dict[str, dict[str, Any]]:
        return {str(j.get("id")): j for j in _dicts(self.qmp.execute("query-jobs"), "job list")}

    def _wait_job(self, job: str, what: str) -> None:
        """Until ``job`` has concluded (then dismissed) or is gone; its error as QmpError."""
        deadline = time.monotonic() + JOB_TIMEOUT
        pause = 0.0005
        while True:
            j = self._jobs().get(job)
            if j is None:
                return
            if j.get("status") == "concluded":
                self.qmp.execute("job-dismiss", id=job)
                if j.get("error"):
                    raise QmpError(f"QEMU could not {what}: {j['error']}")
                return
            if time.monotonic() > deadline:
                raise QmpError(f"QEMU did not {what} in {JOB_TIMEOUT:.0f} s")
            time.sleep(pause)  # jobs here take milliseconds: poll fast, then back off
            pause = min(pause * 2, 0.05)

    def _create(self, options: dict[str, Any], what: str) -> None:
        self.qmp.execute("blockdev-create", **{"job-id": self.make_job, "options": options})
        self._wait_job(self.make_job, what)

    def _remove_fleece(self) -> None:
        """Stop the backup job, then remove the scratch nodes and file."""
        jobs = self._jobs()
        if self.job in jobs:
            if jobs[self.job].get("status") != "concluded":
                self.qmp.execute("block-job-cancel", device=self.job, force=True)
            self._wait_job(self.job, "stop the scratch backup job")
        if self.make_job in jobs:
            self._wait_job(self.make_job, "create the scratch file")
        names = {n.get("node-name") for n in self._nodes()}
        for node in (self.fleece, self.fleece_file):
            if node in names:
                self.qmp.execute("blockdev-del", **{"node-name": node})
        if self.scratch is None:
            return
        try:
            os.unlink(self.scratch)
        except OSError as e:
            if e.errno != errno.ENOENT:  # not ours to see (QEMU elsewhere): QEMU empties it
                with contextlib.suppress(QmpError):  # or not: a named leftover, no harm
                    self._create({"driver": "file", "filename": self.scratch, "size": 0},
                                 "empty the scratch file")

    def _start_fleece(self) -> bool:
        """The scratch qcow2 over the disk (not yet filled: see the transaction); False when
        the disk's image is not a local file QEMU can put one next to."""
        node = next((n for n in self._nodes() if n.get("node-name") == self.node), {})
        image = str(node.get("file", ""))
        size = (node.get("image") or {}).get("virtual-size")
        if not image.startswith("/") or not isinstance(size, int) or size < 0:
            self.live = f"the image of QEMU's node {self.node} is not a local file"
            return False
        self.scratch = f"{image}.{self.fleece_file}"
        try:
            self._create({"driver": "file", "filename": self.scratch, "size": 0},
                         "create the scratch file")
            self.qmp.execute("blockdev-add", driver="file", filename=self.scratch,
                             **{"node-name": self.fleece_file})
            self._create({"driver": "qcow2", "file": self.fleece_file, "size": size},
                         "format the scratch file")
            self.qmp.execute("blockdev-add", driver="qcow2", file=self.fleece_file,
                             backing=self.node, **{"node-name": self.fleece})
        except QmpError as e:  # e.g. QEMU may not write next to the image: read it live
            self.live = str(e)
            self._remove_fleece()
            return False
        return True

    def _start(self) -> None:
        have = self._bitmaps()
        b = have.get(self.name)
        usable = False
        if b is None:
            self.problem = f"dirty bitmap {self.name} does not exist on {self.node} yet"
        elif b.get("inconsistent"):
            self.problem = f"dirty bitmap {self.name} is inconsistent (QEMU stopped uncleanly)"
        elif not b.get("recording", False):
            self.problem = f"dirty bitmap {self.name} is not recording writes"
        elif not b.get("persistent", False):
            self.problem = f"dirty bitmap {self.name} is not persistent (lost on a restart)"
        elif b.get("busy"):
            raise QmpError(f"dirty bitmap {self.name} is in use by another operation (an "
                           f"export or a backup job)")
        else:
            usable = True
        actions: list[dict[str, Any]] = []
        if b is not None and not usable:  # start over with a fresh one
            actions.append(_act("block-dirty-bitmap-remove", node=self.node, name=self.name))
        if not usable:
            actions.append(_act("block-dirty-bitmap-add", node=self.node, name=self.name,
                                persistent=True))
        actions.append(_act("block-dirty-bitmap-add", node=self.node, name=self.next,
                            persistent=True))
        if usable:
            actions += [
                _act("block-dirty-bitmap-add", node=self.node, name=self.scan,
                     persistent=False, disabled=True),
                _act("block-dirty-bitmap-merge", node=self.node, target=self.scan,
                     bitmaps=[self.name]),
            ]
        fleeced = self._start_fleece()
        if fleeced:
            actions.append(_act("blockdev-backup", device=self.node, target=self.fleece,
                                sync="none", **{"job-id": self.job}))
        self.qmp.execute("transaction", actions=actions)
        export: dict[str, Any] = {"type": "nbd", "id": self.export_name,
                                  "node-name": self.fleece if fleeced else self.node,
                                  "name": self.export_name, "writable": False}
        if usable:
            export["bitmaps"] = [self.scan]
            self.scan_bitmap = self.scan
        self.qmp.execute("block-export-add", **export)

    def committed(self) -> None:
        """The push committed: ``NAME`` := the writes since it started (one transaction)."""
        with self._connected():
            self.qmp.execute("transaction", actions=[
                _act("block-dirty-bitmap-clear", node=self.node, name=self.name),
                _act("block-dirty-bitmap-merge", node=self.node, target=self.name,
                     bitmaps=[self.next]),
                _act("block-dirty-bitmap-remove", node=self.node, name=self.next),
            ])

    def close(self) -> None:
        """Remove the export and the copies (``NAME.next`` too unless committed)."""
        with self._connected():
            self._remove_leftovers()


def _act(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}
