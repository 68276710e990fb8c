"""I/O around the Go protocol's machines: leaf hashing on the worker threads, the progress
lines a Go client reads, and the byte pump that drives a machine over a pipe.

A single thread drives a machine (:func:`run_machine`) because BSNC0002 is lock-step (the
target sends a digest and waits for its answer; only the source's tail is a one-way stream).
The Go tree's leaf digests are computed from data on the worker threads (``ordered_map``):
reading, decompressing and BLAKE2b all release the GIL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from diskrsync.base.errors import ConnectionClosed, LocalError, from_oserror
from diskrsync.base.parallel import ordered_map
from diskrsync.synccore.legacy import (
    HeaderExchanged,
    LeafHashProvider,
    LegacySource,
    LegacyTarget,
    ProgressLineWriter,
    RangeSynced,
    SyncFinished,
    TreeShape,
    leaf_hash,
)

__all__ = ["GoProgressLines", "ProgressLineParser", "fd_recv", "fd_send",
           "parallel_leaf_hashes", "run_machine"]

_LEAF_BATCH_BYTES = 4 << 20  # bytes per hashing task: amortises the thread hand-off
_RECV_SIZE = 1 << 20


def _leaf_batches(shape: TreeShape, batch_bytes: int) -> Iterator[list[tuple[int, int]]]:
    """Consecutive leaves grouped into runs of about ``batch_bytes`` (one read per run)."""
    batch: list[tuple[int, int]] = []
    size = 0
    for leaf in shape.iter_leaf_ranges():
        batch.append(leaf)
        size += leaf[1]
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def parallel_leaf_hashes(
    read: Callable[[int, int], bytes],
    *,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_done: Callable[[], None] | None = None,
    batch_bytes: int = _LEAF_BATCH_BYTES,
) -> LeafHashProvider:
    """A ``leaf_hashes`` provider that reads and hashes runs of leaves on the worker threads.

    ``read(offset, length)`` must be thread-safe (pread, image snapshots and transactions
    are). The callbacks report the "calc" phase: its size, the bytes hashed so far (in
    order, from the calling thread), and its end.
    """

    def work(batch: list[tuple[int, int]]) -> tuple[int, list[bytes]]:
        start = batch[0][0]
        end = batch[-1][0] + batch[-1][1]
        data = read(start, end - start)
        if len(data) != end - start:
            raise LocalError(
                f"short read while hashing: expected {end - start} bytes at offset {start}, "
                f"got {len(data)}"
            )
        view = memoryview(data)
        return end, [leaf_hash(view[off - start : off - start + n]) for off, n in batch]

    def provider(shape: TreeShape) -> Sequence[bytes]:
        if on_start:
            on_start(shape.size)
        out: list[bytes] = []
        for end, digests in ordered_map(work, _leaf_batches(shape, batch_bytes)):
            out.extend(digests)
            if on_progress:
                on_progress(end)
        if on_done:
            on_done()
        return out

    return provider


class GoProgressLines:
    """The stderr lines a Go client parses with ``--calc-progress`` / ``--sync-progress``.

    The Go client reads "[Start calc]", "Size: N", then "Update: P" lines until P reaches N;
    then, with ``--sync-progress``, the same for "sync". Each phase ends with
    ``Update: <size>``, and sync lines are written only when asked for (the Go client would
    echo them otherwise). As the Go tool, nothing is written for a calc phase with nothing to
    hash (a new or empty target): a Go client with ``--verbose`` that reads "Size: 0" for
    calc draws a bar of total 0 that never completes, and waits for it forever.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        calc: bool,
        sync: bool,
        sync_total: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._calc = ProgressLineWriter("calc") if calc else None
        self._sync = ProgressLineWriter("sync") if sync else None
        self._sync_total = sync_total
        self._clock = clock
        self.sync_started = False
        self._sync_size = 0

    def calc_start(self, size: int) -> None:
        """The calc phase starts hashing ``size`` bytes."""
        if self._calc:
            self._write(self._calc.start(size, self._clock()))

    def calc_update(self, position: int) -> None:
        """``position`` bytes hashed."""
        if self._calc:
            self._write(self._calc.update(position, self._clock()))

    def calc_done(self) -> None:
        """Hashing is over (or there was nothing to hash): the sync phase starts."""
        if not self.sync_started:
            self.sync_started = True
            self._sync_size = self._sync_total()
            if self._sync:
                self._write(self._sync.start(self._sync_size, self._clock()))

    def sync_update(self, position: int) -> None:
        """``position`` bytes of the result settled."""
        if not self.sync_started:
            self.calc_done()
        if self._sync:
            self._write(self._sync.update(min(position, self._sync_size), self._clock()))

    def events(self, machine: LegacySource | LegacyTarget, events: list[Any]) -> None:
        """Turn a machine's events into lines."""
        for ev in events:
            if isinstance(ev, HeaderExchanged):
                if ev.shape is None:
                    self.calc_done()
            elif isinstance(ev, (RangeSynced, SyncFinished)):
                self.sync_update(machine.position)


@dataclass
class ProgressLineParser:
    """Client side: sorts a Go remote's stderr lines into progress and everything else.

    ``feed(line)`` returns ("start", phase, size), ("update", phase, position) or
    ("text", line, 0) — the last to be shown to the user.
    """

    phase: str = ""

    def feed(self, line: str) -> tuple[str, str, int]:
        """Classify one line (without its newline)."""
        if line.startswith("[Start ") and line.endswith("]"):
            self.phase = line[len("[Start ") : -1]
            return ("start", self.phase, -1)
        for prefix, kind in (("Size: ", "start"), ("Update: ", "update")):
            if line.startswith(prefix) and line[len(prefix) :].isdigit():
                return (kind, self.phase, int(line[len(prefix) :]))
        return ("text", line, 0)


def run_machine(
    machine: LegacySource | LegacyTarget,
    *,
    recv: Callable[[int], bytes],
    send: Callable[[bytes], None],
    on_events: Callable[[list[Any]], None] | None = None,
) -> tuple[int, int]:
    """Drive ``machine`` over a byte pipe until it is done; returns (bytes sent, received).

    One thread is enough: BSNC0002 is lock-step, and the only long one-way stream (the
    source's tail) is produced on demand by ``data_to_send``. The caller closes its send side
    afterwards (a Go target finds the end of the tail by EOF).
    """
    sent = received = 0
    while True:
        out = machine.data_to_send()
        if on_events is not None:
            on_events(machine.next_events())
        if out:
            send(out)
            sent += len(out)
            continue
        if machine.done:
            return sent, received
        data = recv(_RECV_SIZE)
        received += len(data)
        machine.receive_data(data)


def fd_send(fd: int, what: str) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except (BrokenPipeError, ConnectionResetError):
                raise ConnectionClosed(f"{what} closed the connection") from None
            except OSError as e:
                raise from_oserror(e, f"writing to {what}") from None
            view = view[n:]

    return send


def fd_recv(fd: int, what: str) -> Callable[[int], bytes]:
    def recv(n: int) -> bytes:
        try:
            return os.read(fd, n)
        except ConnectionResetError:
            return b""
        except OSError as e:
            raise from_oserror(e, f"reading from {what}") from None

    return recv
