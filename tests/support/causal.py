"""Counting round trips without timing them.

``causal_pair`` wraps an in-process channel pair. Every message gets a hop count: one more than
the largest hop count among the messages it *depends on* under the protocol (NeedLeaves(j) on
the PageHashes carrying page j, Leaves(j) on NeedLeaves(j), a Chunk on the Leaves of its page
or else the target's Hello, Done on every Leaves, Committed on Done). A message may only depend
on messages its sender had already received when it sent it, which is checked, so the count is
the length of the longest chain of waits the conversation really contains. Two hops are one
round trip. It also records how many NeedLeaves were unanswered at once, which shows that
comparisons overlap instead of taking turns.
"""

from __future__ import annotations

import threading

from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import channel_pair, delayed_pair


class _Log:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hops: dict[tuple[str, object], int] = {}
        self.received: dict[str, set[tuple[str, object]]] = {"source": set(), "target": set()}
        self.page_batches: list[tuple[int, int, int]] = []  # (start, stop, hops)
        self.fanout = 0
        self.outstanding = 0
        self.max_outstanding = 0
        self.max_hops = 0

    def dep(self, side: str, key: tuple[str, object]) -> int:
        if key not in self.received[side]:
            raise AssertionError(f"{side} sent something depending on {key} before receiving it")
        return self.hops[key]


class _End:
    def __init__(self, inner, side: str, log: _Log) -> None:
        self.inner, self.side, self.log = inner, side, log

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def _deps(self, msg: p.Message) -> tuple[tuple[str, object], int]:
        log, side = self.log, self.side
        if isinstance(msg, p.Hello):
            return ("hello", side), (log.dep(side, ("hello", "source")) if side == "target" else 0)
        if isinstance(msg, p.PageHashes):
            return ("pages", msg.start), log.dep(side, ("hello", "source"))
        if isinstance(msg, p.NeedLeaves):
            for start, stop, _hops in log.page_batches:
                if start <= msg.page < stop:
                    return ("need", msg.page), log.dep(side, ("pages", start))
            raise AssertionError(f"NeedLeaves({msg.page}) for a page never announced")
        if isinstance(msg, p.Leaves):
            return ("leaves", msg.page), log.dep(side, ("need", msg.page))
        if isinstance(msg, p.Chunk):
            page = msg.index // log.fanout
            key = ("leaves", page)
            base = log.dep(side, key) if key in log.received[side] else log.dep(
                side, ("hello", "target"))
            return ("chunk", msg.index), base
        if isinstance(msg, p.Done):
            leaves = [log.hops[k] for k in log.received[side] if k[0] == "leaves"]
            return ("done", 0), max([log.dep(side, ("hello", "target")), *leaves])
        if isinstance(msg, p.Committed):
            return ("committed", 0), log.dep(side, ("done", 0))
        return ("other", id(msg)), max(log.hops.values(), default=0)

    def send(self, msg: p.Message) -> None:
        with self.log.lock:
            key, base = self._deps(msg)
            hops = base + 1
            self.log.hops[key] = hops
            self.log.max_hops = max(self.log.max_hops, hops)
            if isinstance(msg, p.Hello) and self.side == "target":
                self.log.fanout = msg.fanout
            if isinstance(msg, p.PageHashes):
                n = len(msg.hashes) // 32
                self.log.page_batches.append((msg.start, msg.start + n, hops))
            if isinstance(msg, p.NeedLeaves):
                self.log.outstanding += 1
                self.log.max_outstanding = max(self.log.max_outstanding, self.log.outstanding)
        self.inner.send(msg)

    def recv(self):
        msg = self.inner.recv()
        if msg is not None:
            with self.log.lock:
                key, _ = self._key(msg)
                self.log.received[self.side].add(key)
                if isinstance(msg, p.Leaves):
                    self.log.outstanding -= 1
        return msg

    def _key(self, msg: p.Message) -> tuple[tuple[str, object], None]:
        other = "target" if self.side == "source" else "source"
        if isinstance(msg, p.Hello):
            return ("hello", other), None
        if isinstance(msg, p.PageHashes):
            return ("pages", msg.start), None
        if isinstance(msg, p.NeedLeaves):
            return ("need", msg.page), None
        if isinstance(msg, p.Leaves):
            return ("leaves", msg.page), None
        if isinstance(msg, p.Chunk):
            return ("chunk", msg.index), None
        if isinstance(msg, p.Done):
            return ("done", 0), None
        if isinstance(msg, p.Committed):
            return ("committed", 0), None
        return ("other", id(msg)), None

    def close(self) -> None:
        self.inner.close()


def causal_pair(delay: float = 0.0):
    """(source end, target end, log): log.max_hops and log.max_outstanding after the push.
    With ``delay``, every message takes that long one way (a long, pipelined link)."""
    a, b = delayed_pair(delay) if delay else channel_pair()
    log = _Log()
    return _End(a, "source", log), _End(b, "target", log), log
