"""The code paths the power-loss test records, and the check of one crash state.

Each :class:`Path` sets up a directory (not recorded: it starts durable), runs one operation
under a :class:`~support.powerloss.Recorder` and marks what the operation reported: a mark's
label is what the target must be from then on, ``("image", (retained generation numbers))``
or ``("file", bytes)``. :func:`check` puts a crash state in a directory and holds it to:

* an image target is absent (only before its first reported commit), or opens, ``verify``
  passes, its retained generations are those of the last reported step or of the step in
  flight (never older), and each reads back byte for byte; a redundancy warning (exit 12)
  is accepted only while a commit is in flight (a torn or lost write of superblock slot 0
  or 1: the other slot holds the commit in use, and the next commit rewrites both);
* a raw file or a restored file (updated in place, not atomic) is exactly the reported
  content once the step reported it; before that any content is accepted;
* the next operation (a push, a Go-client sync, a restore) completes and reads back right.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diskrsync.base.errors import DataError, DiskrsyncError
from diskrsync.compression.container import open_image
from diskrsync.compression.convert import convert
from diskrsync.compression.go_target import ImageTargetStore, open_legacy_target
from diskrsync.compression.image import Image
from diskrsync.compression.maintenance import restore, verify
from diskrsync.compression.spgz import SpgzImage
from diskrsync.synccore.go_remote import GO_CLIENT_SOURCE
from diskrsync.synccore.legacy import LegacySource, LegacyTarget
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions
from diskrsync.synccore.target import TargetOptions
from support.legacy_vectors import loopback
from support.paths import VECTORS
from support.powerloss import CrashState, Recorder, Run, clear, materialize

CS = 16 * 1024
SPGZ_VECTOR = VECTORS / "a_small_256k.diskrsync.spgz"
DEAD_PID = "4000000"  # above any pid_max of a default kernel: "the process is gone"


def disk(rng: random.Random, size: int) -> bytes:
    """Incompressible, compressible and zero chunks (and a short last one)."""
    out = bytearray()
    while len(out) < size:
        k = rng.random()
        if k < 0.4:
            out += rng.randbytes(CS)
        elif k < 0.8:
            word = f"chunk {len(out) // CS} {rng.random():.6f} ".encode()
            out += (word * (CS // len(word) + 1))[:CS]
        else:
            out += bytes(CS)
    return bytes(out[:size])


def mutate(rng: random.Random, data: bytes, size: int, changes: int) -> bytes:
    new = bytearray(data[:size].ljust(size, b"\0"))
    fresh = disk(rng, size)
    n = -(-size // CS)
    for c in rng.sample(range(n), min(changes, n)):
        new[c * CS : (c + 1) * CS] = fresh[c * CS : (c + 1) * CS]
    return bytes(new)


def push(src_dir: str, dst: str, data: bytes, *, keep: int = 2, raw: bool = False,
         checkpoint_bytes: int | None = None) -> None:
    src = os.path.join(src_dir, "source.raw")
    with open(src, "wb") as f:
        f.write(data)
    topts = TargetOptions(keep=keep) if checkpoint_bytes is None else \
        TargetOptions(keep=keep, checkpoint_bytes=checkpoint_bytes)
    local_push(src, dst, PushRequest(source=SourceOptions(chunk_size=CS), target=topts,
                                     raw_target=raw))


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


def go_sync(path: str, data: bytes, *, raw: bool = False) -> None:
    """What a Go client's ``diskrsync --target PATH`` session does, in process."""
    end = open_legacy_target(path, raw=raw, keep=2, chunk_size=CS)
    try:
        target = LegacyTarget(end.store)
        if isinstance(end.store, ImageTargetStore):
            end.store.final_size = lambda: target.peer_size
        loopback(LegacySource(_Bytes(data)), target, random.Random(0))
        end.commit(GO_CLIENT_SOURCE, {"protocol": "BSNC0002"})
    finally:
        end.close()


def summarize(path: str) -> tuple[Any, ...]:
    if not os.path.lexists(path):
        return ("absent",)
    try:
        img = Image.open(path)
    except DataError:
        with open(path, "rb") as f:
            return ("file", f.read())
    with img:
        return ("image", tuple(g.number for g in img.generations()))


@dataclass
class Path:
    """One recorded code path; ``record`` returns the run, ``again`` is the next operation
    after a crash (it must complete) and returns the label it must leave."""

    name: str
    target: str  # the file name in the recorded directory that is checked
    setup: Callable[[str, str, random.Random, dict[int, bytes]], None]
    run: Callable[[str, str, random.Random, dict[int, bytes], Recorder], None]
    again: Callable[[str, str, bytes, dict[int, bytes]], tuple[Any, ...]]
    atomic: bool = True  # False: before its report, any content of the target is allowed

    def record(self, base: str, seed: int) -> tuple[Run, dict[int, bytes]]:
        root, src = os.path.join(base, "rec"), os.path.join(base, "src")
        for d in (root, src):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        rng = random.Random(f"{self.name}:{seed}")
        contents: dict[int, bytes] = {}
        self.setup(root, src, rng, contents)
        initial = summarize(os.path.join(root, self.target))
        with Recorder(root) as rec:
            names = dict(rec.names)
            self.run(root, src, rng, contents, rec)
        return Run.of(rec, names, initial=initial), contents


def _image_again(root: str, src: str, data: bytes, contents: dict[int, bytes],
                 target: str, go: bool = False) -> tuple[Any, ...]:
    path = os.path.join(root, target)
    (go_sync(path, data) if go else push(src, path, data))
    with Image.open(path) as img:
        gens = img.generations()
        contents[gens[-1].number] = data
    return ("image", tuple(g.number for g in gens))


def _set_new(root: str, src: str, rng: random.Random, contents: dict[int, bytes]) -> None:
    contents[1] = disk(rng, 9 * CS + 700)


def _run_push(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
              rec: Recorder, *, checkpoint_bytes: int | None = None) -> None:
    n = max(contents)
    if os.path.exists(os.path.join(root, "t.img")):
        n += 1
        prev = contents[n - 1]
        contents[n] = mutate(rng, prev, rng.choice([len(prev), len(prev) + 3 * CS + 5,
                                                    len(prev) - 2 * CS]), 6)
    push(src, os.path.join(root, "t.img"), contents[n], checkpoint_bytes=checkpoint_bytes)
    with Image.open(os.path.join(root, "t.img")) as img:
        rec.mark(("image", tuple(g.number for g in img.generations())))


def _run_push_twice(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
                    rec: Recorder) -> None:
    for _ in range(2):
        _run_push(root, src, rng, contents, rec)


def _set_existing(count: int, keep: int = 2) -> Callable[..., None]:
    def setup(root: str, src: str, rng: random.Random, contents: dict[int, bytes]) -> None:
        contents[1] = disk(rng, 12 * CS + 300)
        for n in range(2, count + 1):
            contents[n] = mutate(rng, contents[n - 1], len(contents[n - 1]), 4)
        for n in range(1, count + 1):
            push(src, os.path.join(root, "t.img"), contents[n], keep=keep)
    return setup


def _run_prune(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
               rec: Recorder) -> None:
    """Prune to one generation, then push: the push frees the pruned generations' space
    (zombies nobody pins) and writes into it while the durable table still lists them."""
    path = os.path.join(root, "t.img")
    n = max(contents)
    with Image.open(path) as img:
        img.prune(1)
    rec.mark(("image", (n,)))
    contents[n + 1] = mutate(rng, contents[n], len(contents[n]) - CS, 8)
    push(src, path, contents[n + 1])
    rec.mark(("image", (n, n + 1)))


def _run_abort(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
               rec: Recorder) -> None:
    """A transaction that checkpoints, writes more and ends without a commit (a failed
    push): it gives back what it wrote since the checkpoint (punch, free tail cut off);
    then a push resumes from the checkpoint and commits."""
    path = os.path.join(root, "t.img")
    new = mutate(rng, contents[1], len(contents[1]) + 2 * CS + 3, 9)
    cs = CS
    with Image.open(path) as img:
        tx = img.begin()
        try:
            tx.resize(len(new))
            chunks = rng.sample(range(tx.shape.chunks), 8)
            for i, c in enumerate(chunks):
                tx.write_chunk(c, new[c * cs : (c + 1) * cs])
                if i == 3:
                    tx.checkpoint()
        finally:
            tx.abort()
    rec.mark(("image", (1,)))
    contents[2] = new
    push(src, path, new)
    rec.mark(("image", (1, 2)))


def _run_push_unchanged(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
                        rec: Recorder) -> None:
    """A push of the content the image holds commits no generation but a metadata-only
    commit (the newest record gains ``last_checked``); before it, a killed push of that
    same content left a checkpoint, which that commit drops (and what it wrote is given
    back). Then a changed push commits the next number."""
    path = os.path.join(root, "t.img")
    n = max(contents)
    same = contents[n]
    with Image.open(path) as img:
        tx = img.begin()
        try:
            tx.resize(len(same))
            for c in rng.sample(range(tx.shape.chunks), 4):
                tx.write_chunk(c, same[c * CS : (c + 1) * CS])
            tx.checkpoint()
        finally:
            tx.abort()
    rec.mark(("image", (n - 1, n)))
    push(src, path, same)
    with Image.open(path) as img:
        assert img.generations()[-1].meta.get("checks") == 1 and img.table.checkpoint is None
    rec.mark(("image", (n - 1, n)))
    contents[n + 1] = mutate(rng, same, len(same), 5)
    push(src, path, contents[n + 1])
    rec.mark(("image", (n, n + 1)))


def _set_spgz(name: str) -> Callable[..., None]:
    def setup(root: str, src: str, rng: random.Random, contents: dict[int, bytes]) -> None:
        shutil.copyfile(SPGZ_VECTOR, os.path.join(root, name))
        spgz = SpgzImage.open(os.path.join(root, name))
        with spgz.snapshot() as snap:
            contents[1] = snap.read(0, snap.size)
        spgz.close()
    return setup


def _run_convert(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
                 rec: Recorder) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # its "converted ..." line
        convert(os.path.join(root, "old.spgz"), os.path.join(root, "new.img"), chunk_size=CS)
    rec.mark(("image", (1,)))


def _set_restore(root: str, src: str, rng: random.Random, contents: dict[int, bytes]) -> None:
    contents[1] = disk(rng, 10 * CS + 1234)
    contents[2] = mutate(rng, contents[1], 8 * CS + 5, 4)
    for n in (1, 2):
        push(src, os.path.join(src, "i.img"), contents[n])


def _restore(src: str, dest: str, number: int, *, force: bool) -> None:
    with open_image(os.path.join(src, "i.img")) as img, img.snapshot(number) as snap:
        restore(snap, dest, force=force)


def _run_restore(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
                 rec: Recorder) -> None:
    """Restore into a new file, then another generation over it (--force, in place)."""
    for n, force in ((1, False), (2, True)):
        _restore(src, os.path.join(root, "out.raw"), n, force=force)
        rec.mark(("file", contents[n]))


def _restore_again(root: str, src: str, data: bytes,
                   contents: dict[int, bytes]) -> tuple[Any, ...]:
    _restore(src, os.path.join(root, "out.raw"), 1, force=True)
    return ("file", contents[1])


def _run_raw(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
             rec: Recorder, *, go: bool = False) -> None:
    path = os.path.join(root, "t.raw")
    for n in (1, 2):
        contents[n] = contents[1] if n == 1 else mutate(rng, contents[1], 11 * CS + 9, 5)
        (go_sync(path, contents[n], raw=True) if go else push(src, path, contents[n], raw=True))
        rec.mark(("file", contents[n]))


def _raw_again(go: bool) -> Callable[..., tuple[Any, ...]]:
    def again(root: str, src: str, data: bytes, contents: dict[int, bytes]) -> tuple[Any, ...]:
        path = os.path.join(root, "t.raw")
        (go_sync(path, data, raw=True) if go else push(src, path, data, raw=True))
        return ("file", data)
    return again


def _run_go(root: str, src: str, rng: random.Random, contents: dict[int, bytes],
            rec: Recorder) -> None:
    n = max(contents) + 1
    path = os.path.join(root, "t.img")
    prev = contents[n - 1]
    contents[n] = mutate(rng, prev, len(prev) + CS + 77, 5) if prev else disk(rng, 9 * CS + 7)
    go_sync(path, contents[n])
    with Image.open(path) as img:
        rec.mark(("image", tuple(g.number for g in img.generations())))


def _set_go_new(root: str, src: str, rng: random.Random, contents: dict[int, bytes]) -> None:
    contents[0] = b""


PATHS: dict[str, Path] = {p.name: p for p in [
    Path("push-new", "t.img", _set_new, _run_push,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img")),
    Path("push-existing", "t.img", _set_existing(2),
         _run_push_twice,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img")),
    Path("checkpoint", "t.img", _set_existing(1),
         lambda r, s, g, c, rec: _run_push(r, s, g, c, rec, checkpoint_bytes=CS // 4),
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img")),
    Path("prune", "t.img", _set_existing(3, keep=3), _run_prune,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img")),
    Path("push-unchanged", "t.img", _set_existing(2), _run_push_unchanged,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img")),
    Path("abort", "t.img", _set_existing(1), _run_abort,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img")),
    Path("convert", "new.img", _set_spgz("old.spgz"), _run_convert,
         lambda r, s, d, c: _image_again(r, s, d, c, "new.img")),
    Path("restore", "out.raw", _set_restore, _run_restore, _restore_again, atomic=False),
    Path("raw-target", "t.raw", _set_new, _run_raw, _raw_again(False), atomic=False),
    Path("go-new", "t.img", _set_go_new, _run_go,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img", go=True)),
    Path("go-existing", "t.img", _set_existing(1), _run_go,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img", go=True)),
    Path("go-convert", "t.img", _set_spgz("t.img"), _run_go,
         lambda r, s, d, c: _image_again(r, s, d, c, "t.img", go=True)),
    Path("go-raw", "t.raw", _set_new, lambda r, s, g, c, rec: _run_raw(r, s, g, c, rec, go=True),
         _raw_again(True), atomic=False),
]}


@dataclass
class Outcome:
    summary: tuple[Any, ...]
    warned: bool


def check(path: Path, run: Run, contents: dict[int, bytes], st: CrashState, base: str,
          rng: random.Random, *, again: bool) -> Outcome:
    """Hold one crash state to the rules in the module docstring; AssertionError names the
    state (cut, what was kept) when it fails."""
    root, src = os.path.join(base, "check"), os.path.join(base, "src")
    os.makedirs(root, exist_ok=True)
    clear(root)
    materialize(st, root, lambda n: n.replace(f".{os.getpid()}.", f".{DEAD_PID}."))
    where = f"{path.name}: cut before op {st.cut}/{len(run.ops)} ({st.how})"
    before = run.marks_before(st.cut)
    last = before[-1] if before else run.info["initial"]
    nxt = run.next_mark(st.cut)
    allowed = [last] + ([nxt] if nxt is not None else [])
    if last == ("absent",) and path.atomic:
        allowed.append(("image", ()))  # a new image that holds no generation yet
    target = os.path.join(root, path.target)
    try:
        summary = summarize(target)
    except DiskrsyncError as e:
        raise AssertionError(f"{where}: the target does not open: {e}") from None
    warned = False
    if summary[0] == "image":
        with Image.open(target) as img:
            report = verify(img)
            assert report.ok, f"{where}: verify fails: {report.problems}"
            warned = bool(img.redundancy_warnings)
            assert not warned or nxt is not None, \
                f"{where}: redundancy lost after the report: {img.redundancy_warnings}"
            for g in img.generations():
                with img.snapshot(g.number) as snap:
                    assert snap.read(0, snap.size) == contents[g.number], \
                        f"{where}: generation {g.number} reads back wrong"
    if summary not in allowed and (path.atomic or nxt is None):
        shown = summary if summary[0] != "file" else ("file", f"{len(summary[1])} bytes")
        want = [a if a[0] != "file" else ("file", f"{len(a[1])} bytes") for a in allowed]
        raise AssertionError(f"{where}: target is {shown}, expected one of {want}")
    if again:
        contents = dict(contents)
        data = mutate(rng, contents[max(contents)] or disk(rng, 5 * CS), 7 * CS + 11, 3)
        try:
            label = path.again(root, src, data, contents)
        except DiskrsyncError as e:
            raise AssertionError(f"{where}: the next operation fails: {e}") from None
        left = [n for n in os.listdir(root) if n.endswith(".tmp")]
        assert not left, f"{where}: temporary files left after the next operation: {left}"
        got = summarize(target)
        assert got == label, f"{where}: after the next operation the target is {got[:1]}"
        if got[0] == "image":
            with Image.open(target) as img, img.snapshot() as snap:
                assert snap.read(0, snap.size) == contents[got[1][-1]], \
                    f"{where}: the next push reads back wrong"
    return Outcome(summary, warned)
