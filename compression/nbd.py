"""A small NBD client: enough of the protocol to read a QEMU disk and its dirty bitmap.

Why not libnbd: ``python3-libnbd`` exists only for Debian's system Python, not in the
project's virtual environment, and PyPI has no NBD client. The subset spoken here is small and
documented (the NBD protocol's "fixed newstyle" negotiation and its block status extension):

- negotiation: ``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation``
  and ``qemu:dirty-bitmap:NAME``), ``NBD_OPT_GO`` (asking for the block size constraints);
- transmission: ``NBD_CMD_READ`` (structured replies: data, holes, errors),
  ``NBD_CMD_BLOCK_STATUS``, and ``NBD_CMD_WRITE`` / ``FLUSH`` for tests and tools.

One request is in flight at a time per connection (a lock serialises callers); a reader that
wants parallel reads opens several connections.

The server is not trusted: every size, length, offset and count it sends is checked before
anything is allocated or read for it, a reply that does not advance a block status walk is an
error, and the number of extents one walk accepts is bounded, so a hostile server can make a
push fail but not allocate without bound or loop forever.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from diskrsync.base.errors import LocalError, ReadError, UsageError

# -- constants of the protocol -------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_UNKNOWN = REP_ERR_BIT | 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15

STATE_HOLE = 1  # base:allocation: the range is not allocated
STATE_ZERO = 2  # base:allocation: the range reads as zeros
STATE_DIRTY = 1  # qemu:dirty-bitmap:NAME: the range was written since the bitmap was cleared

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

DEFAULT_PORT = 10809
#: the largest read or write we send in one request (the protocol's customary ceiling)
MAX_REQUEST = 32 << 20
#: block status is asked for at most this many bytes at a time (a 32-bit length, aligned)
MAX_STATUS_REQUEST = 1 << 30
#: bounds on what the server may make us read during negotiation and in one reply
MAX_OPTION_REPLY = 64 << 10
MAX_STATUS_REPLY = 4 + 8 * (1 << 17)  # QEMU sends at most 2^17 extents per reply
MAX_ERROR_MESSAGE = 4096
#: the most replies one option, or reply chunks one command, may take (a read: plus its length)
MAX_REPLIES = 1024
#: how many extents one walk of a map accepts (about 128 MiB of replies): beyond this a server
#: is taken to be hostile (QEMU merges runs, so even a badly fragmented disk sends far fewer)
MAX_WALK_EXTENTS = 1 << 24
#: the largest export size accepted (2^63 - 1 is what the protocol can say; offsets are signed)
MAX_EXPORT_SIZE = (1 << 63) - 1

_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL, 28: errno.ENOSPC,
          75: errno.EOVERFLOW, 95: errno.EOPNOTSUPP, 108: errno.ESHUTDOWN}


class NbdError(LocalError):
    """The NBD server refused something, broke the protocol, or went away: the source of the
    push cannot be read (exit 3, like any other unreadable source)."""


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD export is: a unix socket or a TCP host and port, and the export's name."""

    export: str
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        name = urllib.parse.quote(self.export, safe="")
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


def is_nbd_url(text: str) -> bool:
    """True when ``text`` is spelled as an NBD URI (then it is never a local path)."""
    return text.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://"))


def parse_nbd_url(text: str) -> NbdAddress:
    """``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH`` (the NBD URI
    standard's spellings; TLS ``nbds`` is not supported)."""
    if text.startswith(("nbds://", "nbds+unix://")):
        raise UsageError(f"{text}: NBD over TLS (nbds) is not supported; use a unix socket or "
                         f"a trusted network")
    u = urllib.parse.urlsplit(text)
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if "\0" in export or len(export.encode()) > 4096:
        raise UsageError(f"bad NBD export name in {text!r}")
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if u.scheme == "nbd+unix":
        if u.netloc:
            raise UsageError(f"{text}: a unix socket URI has no host (nbd+unix:///export?"
                             f"socket=PATH)")
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise UsageError(f"{text}: name the socket: nbd+unix:///export?socket=PATH")
        return NbdAddress(export=export, socket_path=sockets[0])
    if u.scheme in ("nbd", "nbd+tcp"):
        try:
            host, port = u.hostname, u.port
        except ValueError:
            raise UsageError(f"bad port in {text!r}") from None
        if not host:
            raise UsageError(f"{text}: no host (nbd://host[:port]/export)")
        return NbdAddress(export=export, host=host, port=port or DEFAULT_PORT)
    raise UsageError(f"{text!r} is not an NBD URI (nbd://host[:port]/export or "
                     f"nbd+unix:///export?socket=PATH)")


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_REQUEST

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)


class NbdClient:
    """One connection to one export. ``contexts`` are the meta contexts to negotiate; those
    the server grants are in ``self.contexts`` (name -> id)."""

    def __init__(self, address: NbdAddress, contexts: tuple[str, ...] = (),
                 timeout: float | None = 60.0) -> None:
        self.address = address
        self.where = str(address)
        self.contexts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._cookie = 0
        self._sock = self._connect(timeout)
        try:
            self.info = self._negotiate(contexts)
        except BaseException:
            self._sock.close()
            raise

    # -- connection and negotiation -----------------------------------------------------

    def _connect(self, timeout: float | None) -> socket.socket:
        a = self.address
        try:
            if a.socket_path is not None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(timeout)
                try:
                    s.connect(a.socket_path)
                except BaseException:
                    s.close()
                    raise
                return s
            s = socket.create_connection((a.host, a.port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError as e:
            raise NbdError(f"cannot connect to {self.where}: "
                           f"{os.strerror(e.errno) if e.errno else e}") from None

    def _recv(self, n: int) -> bytes:
        """Exactly ``n`` bytes; callers bound ``n`` before asking."""
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                k = self._sock.recv_into(view[got:])
            except OSError as e:
                raise NbdError(f"{self.where}: connection failed: {e}") from None
            if not k:
                raise NbdError(f"{self.where}: the server closed the connection")
            got += k

    def _send(self, data: bytes | memoryview) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise NbdError(f"{self.where}: connection failed: {e}") from None

    def _bad(self, what: str) -> NbdError:
        return NbdError(f"{self.where}: the NBD server broke the protocol: {what}")

    def _negotiate(self, contexts: tuple[str, ...]) -> ExportInfo:
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC:
            raise NbdError(f"{self.where} is not an NBD server")
        if opt_magic != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"{self.where}: the server does not speak fixed newstyle NBD")
        self._send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        name = self.address.export.encode()
        # structured replies carry block status and sparse reads
        self._option(OPT_STRUCTURED_REPLY, b"")
        rtype, data = self._option_reply(OPT_STRUCTURED_REPLY)
        if rtype != REP_ACK:
            raise NbdError(f"{self.where}: the server has no structured replies (needed for "
                           f"block status): {self._rep_error(rtype, data)}")
        if contexts:
            body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            for c in contexts:
                cb = c.encode()
                body += struct.pack(">I", len(cb)) + cb
            self._option(OPT_SET_META_CONTEXT, body)
            for _ in self._replies("meta contexts"):
                rtype, data = self._option_reply(OPT_SET_META_CONTEXT)
                if rtype == REP_ACK:
                    break
                if rtype != REP_META_CONTEXT:
                    raise NbdError(f"{self.where}: meta contexts {', '.join(contexts)} refused: "
                                   f"{self._rep_error(rtype, data)}")
                if len(data) < 5:
                    raise self._bad("short meta context reply")
                (cid,) = struct.unpack(">I", data[:4])
                cname = data[4:].decode("utf-8", "replace")
                if cname not in contexts or cname in self.contexts:
                    raise self._bad(f"meta context {cname!r} was not asked for")
                self.contexts[cname] = cid
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1,
                                                                               INFO_BLOCK_SIZE))
        size = flags = -1
        sizes = (1, 4096, MAX_REQUEST)
        for _ in self._replies("export information"):
            rtype, data = self._option_reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype == REP_ERR_UNKNOWN:
                raise NbdError(f"{self.where}: no export named {self.address.export!r}")
            if rtype != REP_INFO:
                raise NbdError(f"{self.where}: the server refused the export: "
                               f"{self._rep_error(rtype, data)}")
            if len(data) < 2:
                raise self._bad("short info reply")
            (itype,) = struct.unpack(">H", data[:2])
            if itype == INFO_EXPORT:
                if len(data) != 12:
                    raise self._bad("export info of the wrong length")
                size, flags = struct.unpack(">QH", data[2:])
            elif itype == INFO_BLOCK_SIZE:
                if len(data) != 14:
                    raise self._bad("block size info of the wrong length")
                sizes = struct.unpack(">III", data[2:])
        if size < 0:
            raise self._bad("no export size before the end of negotiation")
        if size > MAX_EXPORT_SIZE:
            raise self._bad(f"export size {size} is beyond what the protocol allows")
        lo, pref, hi = sizes
        if not (1 <= lo <= 65536 and lo & (lo - 1) == 0 and pref >= lo and hi >= lo):
            raise self._bad(f"impossible block size constraints {sizes}")
        biggest = min(hi, MAX_REQUEST)
        return ExportInfo(size=size, flags=flags, min_block=lo, preferred_block=pref,
                          max_block=biggest - biggest % lo)

    def _replies(self, what: str, limit: int = MAX_REPLIES) -> Iterator[int]:
        """Counts the replies (or reply chunks) one request may take: a server that never
        says it is done is an error, not an endless loop."""
        yield from range(limit)
        raise self._bad(f"more than {limit} replies with {what}")

    def _option(self, opt: int, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != REPLY_MAGIC or ropt != opt:
            raise self._bad("bad option reply header")
        if length > MAX_OPTION_REPLY:
            raise self._bad(f"option reply of {length} bytes")
        return rtype, self._recv(length)

    @staticmethod
    def _rep_error(rtype: int, data: bytes) -> str:
        text = data[:200].decode("utf-8", "replace").strip()
        if rtype == REP_ERR_UNSUP:
            return text or "not supported"
        return text or f"reply type {rtype:#x}"

    # -- transmission -----------------------------------------------------------------

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                 payload: bytes | memoryview = b"") -> int:
        self._cookie += 1
        self._send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._cookie, offset,
                               length))
        if payload:
            self._send(payload)
        return self._cookie

    def _reply_header(self, cookie: int) -> tuple[bool, int, int, int]:
        """(structured, flags or error, type, length) of the next reply, which must be for
        ``cookie`` (one request in flight)."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", self._recv(12))
            if handle != cookie:
                raise self._bad("reply to a request never sent")
            return False, err, 0, 0
        if magic != STRUCTURED_REPLY_MAGIC:
            raise self._bad(f"bad reply magic {magic:#x}")
        flags, rtype, handle, length = struct.unpack(">HHQI", self._recv(16))
        if handle != cookie:
            raise self._bad("reply to a request never sent")
        return True, flags, rtype, length

    def _chunk_error(self, rtype: int, length: int) -> int:
        """Read an error chunk's payload; its errno."""
        if length < 6 or length > 6 + MAX_ERROR_MESSAGE + 8:
            raise self._bad(f"error chunk of {length} bytes")
        data = self._recv(length)
        err, mlen = struct.unpack(">IH", data[:6])
        if 6 + mlen > length:
            raise self._bad("error message longer than its chunk")
        return _ERRNO.get(err, errno.EIO)

    def _simple_error(self, what: str, err: int) -> NbdError:
        code = _ERRNO.get(err, errno.EIO)
        return NbdError(f"{self.where}: {what} failed: {os.strerror(code)}")

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (split into requests the server accepts).
        A server error on the data is a ReadError (the push can map it like a bad sector)."""
        self._check_range(offset, length)
        out = bytearray(length)
        view = memoryview(out)
        step = self.info.max_block
        with self._lock:
            done = 0
            while done < length:
                n = min(step, length - done)
                self._read_into(offset + done, view[done:done + n])
                done += n
        return bytes(out)

    def _read_into(self, offset: int, view: memoryview) -> None:
        length = len(view)
        cookie = self._request(CMD_READ, offset, length)
        covered: list[tuple[int, int]] = []
        failed = 0
        # data and hole chunks are never empty: at most one per byte, plus a few others
        for _ in self._replies("a read", length + MAX_REPLIES):
            structured, flags, rtype, clen = self._reply_header(cookie)
            if not structured:
                if flags:
                    raise ReadError(self.where, offset, _ERRNO.get(flags, errno.EIO))
                self._recv_into(view)
                return
            if rtype == REPLY_TYPE_OFFSET_DATA:
                if clen <= 8 or clen - 8 > length:
                    raise self._bad(f"read reply chunk of {clen} bytes for {length}")
                (coff,) = struct.unpack(">Q", self._recv(8))
                n = clen - 8
                rel = coff - offset
                if rel < 0 or rel + n > length:
                    raise self._bad("read reply data outside the range asked for")
                self._recv_into(view[rel:rel + n])
                covered.append((rel, n))
            elif rtype == REPLY_TYPE_OFFSET_HOLE:
                if clen != 12:
                    raise self._bad(f"hole chunk of {clen} bytes")
                coff, n = struct.unpack(">QI", self._recv(12))
                rel = coff - offset
                if n == 0 or rel < 0 or rel + n > length:
                    raise self._bad("read reply hole outside the range asked for")
                view[rel:rel + n] = bytes(n)
                covered.append((rel, n))
            elif rtype & REPLY_TYPE_ERROR_BIT:
                err = self._chunk_error(rtype, clen)  # read even after the first
                failed = failed or err
            elif rtype == REPLY_TYPE_NONE:
                if clen != 0 or not flags & REPLY_FLAG_DONE:
                    raise self._bad("bad empty reply chunk")
            else:
                raise self._bad(f"unexpected reply type {rtype} to a read")
            if flags & REPLY_FLAG_DONE:
                break
        if failed:
            raise ReadError(self.where, offset, failed)
        covered.sort()
        pos = 0
        for rel, n in covered:
            if rel != pos:
                raise self._bad("read reply chunks overlap or leave a gap")
            pos += n
        if pos != length:
            raise self._bad("read reply chunks leave a gap")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_range(offset, len(data))
        if self.info.read_only:
            raise NbdError(f"{self.where} is read-only")
        view = memoryview(data)
        with self._lock:
            done = 0
            while done < len(view):
                n = min(self.info.max_block, len(view) - done)
                cookie = self._request(CMD_WRITE, offset + done, n, payload=view[done:done + n])
                self._expect_ack(cookie, "write")
                done += n

    def flush(self) -> None:
        if not self.info.flags & TFLAG_SEND_FLUSH:
            return
        with self._lock:
            self._expect_ack(self._request(CMD_FLUSH, 0, 0), "flush")

    def _expect_ack(self, cookie: int, what: str) -> None:
        failed = 0
        for _ in self._replies(f"a {what}"):
            structured, flags, rtype, clen = self._reply_header(cookie)
            if not structured:
                if flags:
                    raise self._simple_error(what, flags)
                return
            if rtype & REPLY_TYPE_ERROR_BIT:
                err = self._chunk_error(rtype, clen)  # read even after the first
                failed = failed or err
            elif rtype != REPLY_TYPE_NONE or clen:
                raise self._bad(f"unexpected reply type {rtype} to a {what}")
            if flags & REPLY_FLAG_DONE:
                break
        if failed:
            raise NbdError(f"{self.where}: {what} failed: {os.strerror(failed)}")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.info.size:
            raise ValueError(f"range {offset}+{length} outside the export "
                             f"({self.info.size} bytes)")

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) descriptors of ``context`` from ``offset``: together at least one
        byte, at most ``length`` (a longer last one is cut to the range asked for)."""
        cid = self.contexts.get(context)
        if cid is None:
            raise NbdError(f"{self.where}: the server did not grant meta context {context}")
        self._check_range(offset, length)
        if not 0 < length <= 0xFFFFFFFF:
            raise ValueError(f"block status length {length}")
        out: list[tuple[int, int]] = []
        failed = 0
        with self._lock:
            cookie = self._request(CMD_BLOCK_STATUS, offset, length)
            for _ in self._replies("block status"):
                structured, flags, rtype, clen = self._reply_header(cookie)
                if not structured:
                    raise (self._simple_error("block status", flags) if flags
                           else self._bad("simple reply to block status"))
                if rtype == REPLY_TYPE_BLOCK_STATUS:
                    if clen < 12 or (clen - 4) % 8 or clen > MAX_STATUS_REPLY:
                        raise self._bad(f"block status reply of {clen} bytes")
                    data = self._recv(clen)
                    (rid,) = struct.unpack(">I", data[:4])
                    if rid == cid:
                        if out:
                            raise self._bad("two block status replies for one context")
                        out = self._descriptors(data, length)
                    elif rid not in self.contexts.values():
                        raise self._bad(f"block status for unknown context id {rid}")
                elif rtype & REPLY_TYPE_ERROR_BIT:
                    err = self._chunk_error(rtype, clen)  # read even after the first
                    failed = failed or err
                elif rtype == REPLY_TYPE_NONE and clen == 0:
                    pass
                else:
                    raise self._bad(f"unexpected reply type {rtype} to block status")
                if flags & REPLY_FLAG_DONE:
                    break
        if failed:
            raise NbdError(f"{self.where}: block status of {context} at {offset} failed: "
                           f"{os.strerror(failed)}")
        if not out:
            raise self._bad(f"no block status for {context}")
        return out

    def _descriptors(self, data: bytes, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        total = 0
        for n, flags in struct.iter_unpack(">II", data[4:]):
            if n == 0:
                raise self._bad("block status extent of length 0")
            if total >= length:
                raise self._bad("block status extents beyond the range asked for")
            n = min(n, length - total)  # the last one may run past the range: cut it
            out.append((n, flags))
            total += n
        return out

    def walk(self, context: str, offset: int = 0, end: int | None = None,
             ) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) extents of ``context`` covering [offset, end): asks as often
        as needed, each reply must advance, and a walk accepts at most MAX_WALK_EXTENTS."""
        end = self.info.size if end is None else end
        seen = 0
        pos = offset
        while pos < end:
            ask = min(end - pos, MAX_STATUS_REQUEST)
            for n, flags in self.block_status(context, pos, ask):
                seen += 1
                if seen > MAX_WALK_EXTENTS:
                    raise self._bad(f"more than {MAX_WALK_EXTENTS} extents for {context}")
                yield pos, n, flags
                pos += n

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:
            with self._lock:
                self._request(CMD_DISC, 0, 0)
        except NbdError:
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_ranges(ranges: Iterator[tuple[int, int]], grain: int, size: int,
                 ) -> list[tuple[int, int]]:
    """(offset, length) ranges rounded out to ``grain`` and merged where they touch: the list
    of a hostile or badly fragmented map stays at most ``size / grain / 2 + 1`` long."""
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        start = off - off % grain
        stop = min(size, -(-(off + n) // grain) * grain)
        if start >= stop:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            if stop > last_off + last_n:
                out[-1] = (last_off, stop - last_off)
        else:
            out.append((start, stop - start))
    return out
