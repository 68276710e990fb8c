"""Power-loss simulation: record every write and barrier a run makes, then build the on-disk
states a power cut at any moment could leave.

A killed process loses nothing it wrote (the page cache keeps it); a power cut loses every
write that no barrier has made durable, in any order, and may tear a write at a sector
boundary. :class:`Recorder` patches the ``os`` functions the code does its I/O with
(``open``, ``close``, ``pwrite``, ``write``, ``ftruncate``, ``fsync``, ``fdatasync``,
``rename``, ``replace``, ``link``, ``unlink``, ``remove``, ``fdopen``) and the ``punch_hole``
helper, and logs, in order, every operation on a file of one directory (``root``).

The durability model (deliberately weaker than ext4's ``data=ordered``):

* ``fsync``/``fdatasync`` of a file makes every earlier write, truncate and punch of that file
  durable (its content and size), nothing else: not its name, not another file.
* ``fsync`` of the directory makes every earlier name operation (create, link, rename,
  unlink) in it durable.
* Anything not made durable by a completed barrier may be lost or kept, each operation
  independently of the others (a later write may survive an earlier lost one); a kept write
  may be torn: only some of its 512-byte sectors (aligned to the file) reach the disk. Kept
  name operations are applied in their order, each atomically (rename is atomic).

A power cut "at" a barrier means the barrier did not complete; cutting just before each
barrier and choosing subsets of the volatile operations covers every cut point in between
(a cut at an earlier point is the subset that keeps a prefix).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from diskrsync.compression import image as image_mod
from diskrsync.compression import targets as target_mod

SECTOR = 512
DIR = -1  # the fd of the root directory


@dataclass(frozen=True)
class Op:
    """One logged operation. ``kind``: write, trunc, punch, fsync (of ``ino``), dirsync,
    create / link (``name`` -> ``ino``), rename (``name`` -> ``name2``), unlink, mark."""

    kind: str
    ino: int = -1
    off: int = 0
    data: bytes = b""
    name: str = ""
    name2: str = ""
    label: Any = None


DATA_OPS = ("write", "trunc", "punch")
NAME_OPS = ("create", "link", "rename", "unlink")


class _RecordingFile:
    """What ``os.fdopen`` returns for a recorded fd: logs writes and truncates at the
    file position, delegates the rest."""

    def __init__(self, rec: Recorder, f: Any) -> None:
        self._rec = rec
        self._f = f

    def write(self, data: Any) -> int | None:
        pos = self._f.tell()
        n = self._f.write(data)
        if n:
            self._rec._data(self._f.fileno(), "write", pos, bytes(memoryview(data)[:n]))
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self._f.tell() if size is None else size
        out = self._f.truncate(size)
        self._rec._data(self._f.fileno(), "trunc", size, b"")
        return int(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _RecordingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._rec._closed(self._f.fileno())
        self._f.__exit__(*exc)


class Recorder:
    """Patches ``os`` (process-wide) while active; logs what touches files in ``root``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.ops: list[Op] = []
        self.names: dict[str, int] = {}
        self.initial: dict[int, bytes] = {}
        self._fds: dict[int, int] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []
        for name in sorted(os.listdir(self.root)):
            p = os.path.join(self.root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                ino = self._new_ino()
                self.names[name] = ino
                with open(p, "rb") as f:
                    self.initial[ino] = f.read()

    def _new_ino(self) -> int:
        self._next += 1
        return self._next

    def _name(self, path: Any) -> str | None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None
        p = os.path.abspath(os.fsdecode(path))
        return os.path.basename(p) if os.path.dirname(p) == self.root else None

    def _log(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def _data(self, fd: int, kind: str, off: int, data: bytes) -> None:
        ino = self._fds.get(fd)
        if ino is not None and ino != DIR:
            self._log(Op(kind, ino, off, data))

    def _closed(self, fd: int) -> None:
        self._fds.pop(fd, None)

    def mark(self, label: Any) -> None:
        """A point the run reached (e.g. "generation 3 reported committed")."""
        self._log(Op("mark", label=label))

    # -- the patched functions -------------------------------------------------------------

    def _install(self) -> None:
        real = {n: getattr(os, n) for n in (
            "open", "close", "pwrite", "write", "ftruncate", "fsync", "fdatasync", "rename",
            "replace", "link", "unlink", "remove", "fdopen")}
        real_punch = image_mod.punch_hole

        def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            fd = real["open"](path, flags, mode, dir_fd=dir_fd)
            if dir_fd is not None:
                return fd
            p = os.path.abspath(os.fsdecode(path))
            if p == self.root:
                self._fds[fd] = DIR
                return fd
            name = self._name(path)
            if name is None:
                return fd
            if name not in self.names:
                ino = self.names[name] = self._new_ino()
                self._log(Op("create", ino, name=name))
            self._fds[fd] = self.names[name]
            return fd

        def close(fd: int) -> None:
            self._fds.pop(fd, None)
            real["close"](fd)

        def pwrite(fd: int, data: Any, off: int) -> int:
            n = int(real["pwrite"](fd, data, off))
            self._data(fd, "write", off, bytes(memoryview(data)[:n]))
            return n

        def write(fd: int, data: Any) -> int:
            if fd not in self._fds:
                return int(real["write"](fd, data))
            off = os.lseek(fd, 0, os.SEEK_CUR)
            n = int(real["write"](fd, data))
            self._data(fd, "write", off, bytes(memoryview(data)[:n]))
            return n

        def ftruncate(fd: int, size: int) -> None:
            real["ftruncate"](fd, size)
            self._data(fd, "trunc", size, b"")

        def sync(which: str) -> Callable[[int], None]:
            def fsync(fd: Any) -> None:
                fd = fd if isinstance(fd, int) else fd.fileno()
                ino = self._fds.get(fd)
                # logged before the call: a write logged after it was not covered
                if ino == DIR:
                    self._log(Op("dirsync"))
                elif ino is not None:
                    self._log(Op("fsync", ino))
                real[which](fd)
            return fsync

        def rename(which: str) -> Callable[..., None]:
            def rename_(a: Any, b: Any, **kw: Any) -> None:
                real[which](a, b, **kw)
                na, nb = self._name(a), self._name(b)
                if na is not None and nb is not None and not kw and na in self.names:
                    self.names[nb] = self.names.pop(na)
                    self._log(Op("rename", name=na, name2=nb))
            return rename_

        def link(a: Any, b: Any, **kw: Any) -> None:
            real["link"](a, b, **kw)
            na, nb = self._name(a), self._name(b)
            if na is not None and nb is not None and na in self.names:
                ino = self.names[nb] = self.names[na]
                self._log(Op("link", ino, name=nb))

        def unlink(which: str) -> Callable[..., None]:
            def unlink_(a: Any, **kw: Any) -> None:
                real[which](a, **kw)
                na = self._name(a)
                if na is not None and not kw and self.names.pop(na, None) is not None:
                    self._log(Op("unlink", name=na))
            return unlink_

        def fdopen(fd: int, *args: Any, **kw: Any) -> Any:
            f = real["fdopen"](fd, *args, **kw)
            return _RecordingFile(self, f) if fd in self._fds else f

        def punch(fd: int, offset: int, length: int) -> bool:
            done = bool(real_punch(fd, offset, length))
            if done:
                start = -(-offset // 4096) * 4096
                end = (offset + length) // 4096 * 4096
                if end > start:
                    self._data(fd, "punch", start, (end - start).to_bytes(8, "little"))
            return done

        patches: dict[tuple[Any, str], Any] = {
            (os, "open"): open_, (os, "close"): close, (os, "pwrite"): pwrite,
            (os, "write"): write, (os, "ftruncate"): ftruncate,
            (os, "fsync"): sync("fsync"), (os, "fdatasync"): sync("fdatasync"),
            (os, "rename"): rename("rename"), (os, "replace"): rename("replace"),
            (os, "link"): link, (os, "unlink"): unlink("unlink"),
            (os, "remove"): unlink("remove"), (os, "fdopen"): fdopen,
            (image_mod, "punch_hole"): punch, (target_mod, "punch_hole"): punch,
        }
        for (mod, attr), fn in patches.items():
            self._saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, fn)

    def __enter__(self) -> Recorder:
        self._install()
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, attr, fn in reversed(self._saved):
            setattr(mod, attr, fn)
        self._saved.clear()


# -- building crash states ------------------------------------------------------------------


@dataclass
class Run:
    """A recorded run: the log, the files before it, and what ``check`` needs to know."""

    ops: list[Op]
    names: dict[str, int]  # before the run
    initial: dict[int, bytes]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, rec: Recorder, names: dict[str, int], **info: Any) -> Run:
        return cls(list(rec.ops), names, dict(rec.initial), info)

    def cuts(self) -> list[int]:
        """Cut points: just before each barrier, and the end of the run."""
        out = [i for i, op in enumerate(self.ops) if op.kind in ("fsync", "dirsync")]
        return sorted({*out, len(self.ops)})

    def marks_before(self, cut: int) -> list[Any]:
        return [op.label for op in self.ops[:cut] if op.kind == "mark"]

    def next_mark(self, cut: int) -> Any:
        for op in self.ops[cut:]:
            if op.kind == "mark":
                return op.label
        return None

    def volatile(self, cut: int) -> tuple[set[int], list[int]]:
        """(durable op indices, volatile op indices) for a cut before ``ops[cut]``."""
        last_fsync: dict[int, int] = {}
        last_dirsync = -1
        for i, op in enumerate(self.ops[:cut]):
            if op.kind == "fsync":
                last_fsync[op.ino] = i
            elif op.kind == "dirsync":
                last_dirsync = i
        durable: set[int] = set()
        volatile: list[int] = []
        for i, op in enumerate(self.ops[:cut]):
            if op.kind in DATA_OPS:
                (durable.add(i) if last_fsync.get(op.ino, -1) > i else volatile.append(i))
            elif op.kind in NAME_OPS:
                (durable.add(i) if last_dirsync > i else volatile.append(i))
        return durable, volatile

    def state(self, cut: int, keep: set[int], torn: dict[int, set[int]]) -> dict[str, bytes]:
        """Files (name -> bytes) after a cut before ``ops[cut]`` keeping the ops in ``keep``
        (durable ones included by the caller); ``torn[i]``: the sectors of write i kept."""
        names = dict(self.names)
        content: dict[int, bytearray] = {ino: bytearray(b) for ino, b in self.initial.items()}
        for i, op in enumerate(self.ops[:cut]):
            if i not in keep:
                continue
            k = op.kind
            if k == "create" or k == "link":
                names.setdefault(op.name, op.ino)
            elif k == "rename":
                if op.name in names:
                    names[op.name2] = names.pop(op.name)
            elif k == "unlink":
                names.pop(op.name, None)
            elif k in DATA_OPS:
                buf = content.setdefault(op.ino, bytearray())
                if k == "trunc":
                    del buf[op.off :]
                    buf.extend(bytes(op.off - len(buf)))
                elif k == "punch":
                    n = int.from_bytes(op.data, "little")
                    end = min(op.off + n, len(buf))
                    if end > op.off:
                        buf[op.off : end] = bytes(end - op.off)
                else:
                    for lo, hi in _pieces(op.off, len(op.data), torn.get(i)):
                        if len(buf) < lo:
                            buf.extend(bytes(lo - len(buf)))
                        buf[lo:hi] = op.data[lo - op.off : hi - op.off]
        return {name: bytes(content.get(ino, b"")) for name, ino in names.items()}


def _sectors(off: int, length: int) -> list[tuple[int, int]]:
    out = []
    pos = off
    while pos < off + length:
        nxt = min((pos // SECTOR + 1) * SECTOR, off + length)
        out.append((pos, nxt))
        pos = nxt
    return out


def _pieces(off: int, length: int, keep: set[int] | None) -> list[tuple[int, int]]:
    secs = _sectors(off, length)
    if keep is None:
        return [(off, off + length)]
    return [s for j, s in enumerate(secs) if j in keep]


@dataclass(frozen=True)
class CrashState:
    cut: int
    how: str
    files: dict[str, bytes]

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.blake2b(self.files[name]).digest())
        return h.digest()


def crash_states(run: Run, rng: random.Random, per_cut: int) -> Iterator[CrashState]:
    """Up to ``per_cut`` states for each cut point: all volatile ops kept, none, prefixes,
    random subsets, and one multi-sector write torn at a 512-byte boundary (a prefix of its
    sectors, or a random subset). Identical states are yielded once per step (the same bytes
    may be fine before a step reported and wrong after it)."""
    seen: set[bytes] = set()
    for cut in run.cuts():
        durable, vol = run.volatile(cut)
        writes = [i for i in vol if run.ops[i].kind == "write"
                  and len(_sectors(run.ops[i].off, len(run.ops[i].data))) > 1]
        plans: list[tuple[str, set[int], dict[int, set[int]]]] = [
            ("all", set(vol), {}), ("none", set(), {})]
        for n in range(per_cut - 2):
            kind = n % 4
            if kind == 0 and vol:
                m = rng.randrange(len(vol) + 1)
                plans.append((f"prefix {m}", set(vol[:m]), {}))
            elif kind == 1:
                plans.append(("random", {i for i in vol if rng.random() < 0.5}, {}))
            elif writes:
                w = rng.choice(writes)
                secs = len(_sectors(run.ops[w].off, len(run.ops[w].data)))
                if kind == 2:
                    cut_at = rng.randrange(1, secs)
                    kept = set(range(cut_at))
                    how = f"torn op {w} after sector {cut_at}"
                else:
                    kept = {j for j in range(secs) if rng.random() < 0.5}
                    how = f"torn op {w} sectors {sorted(kept)}"
                base = set(vol) if rng.random() < 0.5 else {
                    i for i in vol if rng.random() < 0.5}
                plans.append((how, base | {w}, {w: kept}))
        step = len(run.marks_before(cut))
        for how, keep, torn in plans:
            st = CrashState(cut, how, run.state(cut, durable | keep, torn))
            d = st.digest() + bytes([step])
            if d not in seen:
                seen.add(d)
                yield st


def materialize(st: CrashState, root: str, rename: Callable[[str], str] = lambda n: n) -> None:
    """Write the state's files into the empty directory ``root``."""
    for name, data in st.files.items():
        with open(os.path.join(root, rename(name)), "wb") as f:
            f.write(data)


def clear(root: str) -> None:
    for name in os.listdir(root):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, name))
