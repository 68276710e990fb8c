"""A push between a source reader and an image path in this process: both ends of the sync
protocol on threads, over an in-memory channel or (``framed``) the wire encoding over pipes,
the way ``diskrsync serve`` sees a remote source."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from diskrsync.compression.sources import SourceReader
from diskrsync.synccore.channel import FdStream, FramedChannel, channel_pair
from diskrsync.synccore.push import open_store, serve_target
from diskrsync.synccore.source import PushStats, SourceOptions, SourceSession
from diskrsync.synccore.target import TargetOptions


@contextlib.contextmanager
def framed_pair() -> Iterator[tuple[FramedChannel, FramedChannel]]:
    """Both ends of the wire protocol over pipes; the pipes are closed at the end."""
    to_target, to_source = os.pipe(), os.pipe()
    try:
        yield (FramedChannel(FdStream(to_source[0], to_target[1])),
               FramedChannel(FdStream(to_target[0], to_source[1])))
    finally:
        for fd in (*to_target, *to_source):
            with contextlib.suppress(OSError):
                os.close(fd)


def threaded_push(reader: SourceReader, dst: str, *, chunk_size: int, framed: bool = False,
                  raw: bool = False) -> PushStats:
    """Push ``reader`` into the image (``raw``: the raw file) ``dst``; closes the reader. The
    target's errors reach the source as the protocol relays them."""
    err: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        a, b = stack.enter_context(framed_pair()) if framed else channel_pair()

        def target() -> None:
            try:
                serve_target(b, lambda h: open_store(dst, h, TargetOptions(), raw=raw),
                             verify=framed)
            except BaseException as e:
                err.append(e)

        t = threading.Thread(target=target)
        t.start()
        try:
            return SourceSession(a, reader, SourceOptions(chunk_size=chunk_size)).run()
        finally:
            t.join(60)
            reader.close()
            if err and not isinstance(err[0], Exception):
                raise err[0]
