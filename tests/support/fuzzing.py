"""Seeded mutation fuzzing of recorded conversations (run in a child under a memory limit).

A real push is recorded byte for byte in each direction (the native protocol over pipes; the
Go protocol from the transcripts two Go processes made, ``shared/vectors``). Each run mutates
one direction's bytes and feeds them to the other end in random pieces. Allowed outcomes:
success, or a ``DiskrsyncError``; never another exception, never more than ``STEP_SECONDS``.
A target image must verify and be at its old generations, or (native protocol) at a new
generation holding exactly the source's bytes; a failed push adds no generation and at most
what a checkpoint keeps.

``python -c 'from support.fuzzing import main; main()' KIND SEED RUNS WORKDIR`` prints one
JSON line: ``{"kind", "seed", "runs", "outcomes": {...}, "bad": [...]}``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diskrsync.base.errors import DiskrsyncError
from diskrsync.compression.convert import convert_snapshot
from diskrsync.compression.go_target import ImageTargetStore, open_legacy_target
from diskrsync.compression.image import Image
from diskrsync.compression.sources import RawSource
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import FdStream, FramedChannel
from diskrsync.synccore.legacy import LegacySource, LegacyTarget
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions, SourceSession
from diskrsync.synccore.target import TargetOptions, open_store, serve_target
from support.hostile import ImageState, image_state
from support.legacy_vectors import CASES, have_vectors, transcript, vector_input

CS = 16384
MAX_SIZE = 1 << 30  # the fuzzed target's --max-size (an admin sets it to the disks expected)
STEP_SECONDS = 20  # one fed stream; a hang, not slowness
EVIL_NUMBERS = [0, 1, -1, 2**31, 2**32 - 1, 2**40, 2**50, 2**63 - 1, 2**63, 2**64 - 1, 2**64]
EVIL_VALUES: list[Any] = [*EVIL_NUMBERS, 1e300, 0.5, "x", "a\0b", None, True, [], {}, [[[]]]]


class _Hung(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _Hung()


# -- feeding bytes -------------------------------------------------------------------------


class FeedStream:
    """A Stream whose peer says ``data`` in random pieces, then EOF; what we send is dropped."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data, self.pos, self.rng = data, 0, rng

    def send(self, data: bytes) -> None:
        pass

    def recv(self, max_bytes: int) -> bytes:
        n = min(max_bytes, self.rng.choice([1, 7, 64, 4096, 70_000, 1 << 20]))
        piece = self.data[self.pos : self.pos + n]
        self.pos += len(piece)
        return piece

    def close_send(self) -> None:
        pass


class _Recorder:
    """A Stream that keeps a copy of everything it receives."""

    def __init__(self, inner: FdStream) -> None:
        self.inner = inner
        self.received = bytearray()

    def send(self, data: bytes) -> None:
        self.inner.send(data)

    def recv(self, max_bytes: int) -> bytes:
        data = self.inner.recv(max_bytes)
        self.received += data
        return data

    def close_send(self) -> None:
        self.inner.close_send()


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 3, 64, 4096, 70_000, 1 << 20])
        out.append(data[pos : pos + n])
        pos += n
    return out


# -- mutations -----------------------------------------------------------------------------


def split_frames(stream: bytes) -> tuple[bytes, list[bytes]]:
    """(preamble, frames) of a recorded native stream."""
    head, pos, frames = stream[: p.PREAMBLE_SIZE], p.PREAMBLE_SIZE, []
    while pos < len(stream):
        (length,) = struct.unpack_from("<I", stream, pos)
        frames.append(stream[pos : pos + 4 + length])
        pos += 4 + length
    return head, frames


def _evil_json(frame: bytes, rng: random.Random) -> bytes:
    body = json.loads(frame[5:])
    target = body
    if isinstance(body.get("info"), dict) and rng.random() < 0.4:
        target = body["info"]
    keys = list(target)
    target[rng.choice([*keys, "caps", "hash", "name"])] = rng.choice(EVIL_VALUES)
    payload = json.dumps(body).encode()
    return struct.pack("<IB", len(payload) + 1, frame[4]) + payload


def mutate_native(stream: bytes, other: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One to three mutations of a recorded native stream; returns (bytes, what was done)."""
    head, frames = split_frames(stream)
    _, donors = split_frames(other)
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.choice(["flip", "truncate", "splice", "length", "duplicate", "drop", "swap",
                         "json", "number", "garbage"])
        done.append(op)
        k = rng.randrange(len(frames)) if frames else 0
        if op == "splice" and frames:
            frames.insert(k, rng.choice(donors + frames))
        elif op == "length" and frames:
            f = frames[k]
            n = rng.choice([0, 1, len(f) - 5, len(f) - 3, p.MAX_FRAME, p.MAX_FRAME + 1,
                            2**32 - 1, rng.randrange(2**32)])
            frames[k] = struct.pack("<I", n) + f[4:]
        elif op == "duplicate" and frames:
            frames.insert(k, frames[k])
        elif op == "drop" and frames:
            del frames[k]
        elif op == "swap" and len(frames) > 1:
            j = rng.randrange(len(frames))
            frames[k], frames[j] = frames[j], frames[k]
        elif op == "json" and frames:
            js = [i for i, f in enumerate(frames) if f[4] in (1, 6, 7, 8)]
            if js:
                i = rng.choice(js)
                frames[i] = _evil_json(frames[i], rng)
        elif op == "number" and frames:
            bins = [i for i, f in enumerate(frames) if f[4] in (2, 3, 4, 5) and len(f) >= 13]
            if bins:
                i = rng.choice(bins)
                n = rng.choice([n for n in EVIL_NUMBERS if 0 <= n < 2**64])
                frames[i] = frames[i][:5] + struct.pack("<Q", n) + frames[i][13:]
        else:
            data = bytearray(head + b"".join(frames))
            if op == "flip":
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == "truncate":
                del data[rng.randrange(len(data)) :]
            else:  # garbage
                at = rng.randrange(len(data) + 1)
                data[at:at] = rng.randbytes(rng.randint(1, 64))
            return bytes(data), "+".join(done)  # byte-level: frame boundaries are gone
    return head + b"".join(frames), "+".join(done)


def mutate_go(stream: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One to three mutations of a BSNC0002 byte stream (it has no framing to aim at)."""
    data = bytearray(stream)
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.choice(["flip", "truncate", "garbage", "duplicate", "delete", "size",
                         "int64", "command", "run"])
        done.append(op)
        n = len(data)
        if op == "flip" and n:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == "truncate" and n:
            del data[rng.randrange(n) :]
        elif op == "garbage":
            at = rng.randrange(n + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == "duplicate" and n:
            a = rng.randrange(n)
            b = min(n, a + rng.randint(1, 70_000))
            data[b:b] = data[a:b]
        elif op == "delete" and n:
            a = rng.randrange(n)
            del data[a : a + rng.randint(1, 70_000)]
        elif op == "size" and n >= 16:
            v = rng.choice([v for v in EVIL_NUMBERS if 0 <= v < 2**64])
            data[8:16] = struct.pack("<Q", v)
        elif op == "int64" and n >= 8:
            at = rng.randrange(n - 7)
            data[at : at + 8] = struct.pack("<Q", rng.choice(
                [v % 2**64 for v in EVIL_NUMBERS]))
        elif op == "command" and n > 16:
            data[rng.randrange(16, n)] = rng.randrange(6)
        elif op == "run" and n >= 16:
            # a bigger size, completed by one zero run past the recorded end (the red team's
            # 25-byte stream is this on an empty target)
            (old,) = struct.unpack_from("<Q", data, 8)
            bigger = [v for v in EVIL_NUMBERS if old < v < 2**63]
            if bigger:
                v = rng.choice(bigger)
                data[8:16] = struct.pack("<Q", v)
                data += b"\0" + struct.pack("<q", v - old)
    return bytes(data), "+".join(done)


# -- the native protocol -------------------------------------------------------------------


def _content(path: Path) -> bytes:
    img = Image.open(str(path))
    try:
        with img.snapshot() as s:
            return s.read(0, s.size)
    finally:
        img.close()


def _opener(path: Path) -> Callable[[p.Hello], Any]:
    opts = TargetOptions(max_size=MAX_SIZE)
    return lambda hello: open_store(str(path), hello, opts, raw=False)


class Native:
    """A recorded push of ``new`` onto an image of ``old``: 200 chunks, two pages, some
    chunks changed, grown past the old end."""

    def __init__(self, work: Path) -> None:
        rng = random.Random(20261130)
        old = bytearray(rng.randbytes(CS * 100) + bytes(CS * 40) + b"t" * (CS * 20))
        new = bytearray(old)
        for c in rng.sample(range(160), 12):
            new[c * CS : c * CS + 100] = rng.randbytes(100)
        new += rng.randbytes(CS * 30) + bytes(CS * 10 - 999)
        self.work, self.new = work, bytes(new)
        (work / "old").write_bytes(bytes(old))
        self.src = work / "src"
        self.src.write_bytes(self.new)
        self.base = work / "base.spgz"
        local_push(str(work / "old"), str(self.base),
                   PushRequest(source=SourceOptions(chunk_size=CS)))
        self.before = image_state(self.base)
        self.s2t, self.t2s = self._record()

    def _record(self) -> tuple[bytes, bytes]:
        image = self.work / "rec.spgz"
        shutil.copyfile(self.base, image)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        to_target = _Recorder(FdStream(r1, w2))
        to_source = _Recorder(FdStream(r2, w1))
        thread = threading.Thread(target=serve_target, args=(FramedChannel(to_target),
                                                             _opener(image)))
        thread.start()
        reader = RawSource(str(self.src))
        try:
            SourceSession(FramedChannel(to_source), reader, SourceOptions(chunk_size=CS)).run()
        finally:
            reader.close()
            thread.join()
            os.close(r1)
            os.close(r2)
        assert _content(image) == self.new
        return bytes(to_target.received), bytes(to_source.received)

    def feed_target(self, stream: bytes, rng: random.Random) -> tuple[str, str | None]:
        image = self.work / "t.spgz"
        if image.exists():
            image.unlink()  # a fresh inode: nothing of the last run (a lock) carries over
        shutil.copyfile(self.base, image)
        try:
            serve_target(FramedChannel(FeedStream(stream, rng)), _opener(image),
                         max_size=MAX_SIZE)
            outcome = "committed"
        except DiskrsyncError as e:
            outcome = type(e).__name__
        return outcome, self._judge(image, outcome == "committed")

    def _judge(self, image: Path, committed: bool) -> str | None:
        after: ImageState = image_state(image)
        if not after.verify_ok:
            return "the image does not verify"
        if after.file_size > self.before.file_size + 4 * len(self.new):
            return f"the image grew from {self.before.file_size} to {after.file_size}"
        if not committed:
            if after.generations != self.before.generations:
                return "a failed push changed the generations"
            return None
        if after.generations[:-1] != self.before.generations[-1:] \
                or after.generations[-1][0] != self.before.generations[-1][0] + 1:
            return f"unexpected generations after a commit: {after.generations}"
        if _content(image) != self.new:
            return "a committed generation differs from the source"
        return None

    def feed_source(self, stream: bytes, rng: random.Random) -> tuple[str, str | None]:
        reader = RawSource(str(self.src))
        try:
            SourceSession(FramedChannel(FeedStream(stream, rng)), reader,
                          SourceOptions(chunk_size=CS)).run()
            return "committed", None
        except DiskrsyncError as e:
            return type(e).__name__, None
        finally:
            reader.close()


# -- the Go protocol -----------------------------------------------------------------------


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


class Go:
    """The recorded Go transcripts with their inputs; the targets as images."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.cases = []
        for case in CASES:
            s2d, d2s = transcript(case.name)
            base = None
            if case.target_before is not None:
                base = work / f"{case.name}.spgz"
                convert_snapshot(_Bytes(vector_input(case.target_before)), str(base),
                                 chunk_size=128 * 1024, source="test")
            self.cases.append((case, s2d, d2s, base, image_state(base) if base else None))

    def feed_target(self, case_no: int, stream: bytes,
                    rng: random.Random) -> tuple[str, str | None]:
        _case, _s2d, _d2s, base, before = self.cases[case_no]
        path = self.work / "t.spgz"
        if path.exists():
            path.unlink()
        if base is not None:
            shutil.copyfile(base, path)
        end = open_legacy_target(str(path), raw=False)
        committed = False
        try:
            target = LegacyTarget(end.store, max_size=MAX_SIZE)
            if isinstance(end.store, ImageTargetStore):
                end.store.final_size = lambda: target.peer_size
            target.data_to_send()
            for piece in [*pieces(stream, rng), b""]:
                target.receive_data(piece)
                target.data_to_send()
            if target.done:
                end.commit("fuzz")
                committed = True
            outcome = "committed" if committed else "unfinished"
        except DiskrsyncError as e:
            outcome = type(e).__name__
        finally:
            end.close()
        if outcome == "unfinished":
            return outcome, "the target neither finished nor failed at EOF"
        leftovers = [n for n in os.listdir(self.work) if ".diskrsync-" in n]
        if leftovers:
            return outcome, f"temporary files left: {leftovers}"
        if before is None:
            if not committed:
                return outcome, "a new target appeared" if path.exists() else None
            after = image_state(path)
            ok = after.verify_ok and [g[0] for g in after.generations] == [1]
            return outcome, None if ok else f"bad new image: {after}"
        after = image_state(path)
        if not after.verify_ok:
            return outcome, "the image does not verify"
        if not committed and after.generations != before.generations:
            return outcome, "a failed sync changed the generations"
        if committed and after.generations[-1][0] != before.generations[-1][0] + 1:
            return outcome, f"unexpected generations after a commit: {after.generations}"
        return outcome, None

    def feed_source(self, case_no: int, stream: bytes,
                    rng: random.Random) -> tuple[str, str | None]:
        case = self.cases[case_no][0]
        source = LegacySource(_Bytes(vector_input(case.source_input)))
        try:
            while source.data_to_send():
                pass
            for piece in [*pieces(stream, rng), b""]:
                source.receive_data(piece)
                while source.data_to_send():
                    pass
            if not source.done:
                return "unfinished", "the source neither finished nor failed at EOF"
            return "done", None
        except DiskrsyncError as e:
            return type(e).__name__, None


# -- the driver ----------------------------------------------------------------------------


def run(kind: str, seed: int, runs: int, work: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    bad: list[str] = []
    signal.signal(signal.SIGALRM, _alarm)
    if kind == "native":
        native = Native(work)

        def one(i: int) -> tuple[str, Callable[[], tuple[str, str | None]]]:
            if i % 5 < 3:  # the target is the end that writes: it gets more runs
                data, what = mutate_native(native.s2t, native.t2s, rng)
                return "target " + what, lambda: native.feed_target(data, rng)
            data, what = mutate_native(native.t2s, native.s2t, rng)
            return "source " + what, lambda: native.feed_source(data, rng)
    else:
        if not have_vectors():
            return {"kind": kind, "seed": seed, "runs": 0, "skipped": "no Go vectors"}
        go = Go(work)

        def one(i: int) -> tuple[str, Callable[[], tuple[str, str | None]]]:
            n = rng.randrange(len(go.cases))
            case, s2d, d2s = go.cases[n][:3]
            if i % 5 < 4:
                data, what = mutate_go(s2d, rng)
                return f"target {case.name} {what}", lambda: go.feed_target(n, data, rng)
            data, what = mutate_go(d2s, rng)
            return f"source {case.name} {what}", lambda: go.feed_source(n, data, rng)

    for i in range(runs):
        what, feed = one(i)
        signal.setitimer(signal.ITIMER_REAL, STEP_SECONDS)
        try:
            outcome, problem = feed()
        except _Hung:
            outcome, problem = "hung", f"more than {STEP_SECONDS} s"
        except BaseException as e:  # what the fuzzer hunts
            outcome = type(e).__name__
            problem = "".join(traceback.format_exception_only(type(e), e)).strip()
            problem += " | " + traceback.format_tb(e.__traceback__)[-1].strip()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        outcomes[outcome] += 1
        if problem is not None:
            bad.append(f"run {i} ({what}): {outcome}: {problem}")
    return {"kind": kind, "seed": seed, "runs": runs, "outcomes": dict(outcomes), "bad": bad}


def main() -> None:
    kind, seed, runs, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(run(kind, seed, runs, work)), flush=True)
