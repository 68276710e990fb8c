"""A bounded local cache of a repository's blobs (for mounts and restores from object
storage: ``--cache-dir``, ``--cache-size``).

Blobs are immutable and named by their content id, so the cache never needs invalidating:
a blob cached once is that blob forever. It holds blobs as stored (an encrypted
repository's stay ciphertext on local disk), and every blob read from it is decoded and
checked like one from the store: a damaged or torn cache file is dropped and fetched again
(``drop``), never served. One file per blob under ``DIR/XX/ID``, written to a temporary
name and renamed (no fsync: losing cache files in a power cut costs only refetching);
least recently used blobs are removed once the total passes ``max_bytes``. Several
processes may share a directory: each bounds what it knows of, and a file another process
removed is a miss.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict

from diskrsync.base.errors import LocalError, from_oserror


class BlobCache:
    def __init__(self, directory: str, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("negative cache size")  # callers validate the user's value
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # id -> size, oldest first
        self.total = 0
        self.hits = self.misses = 0
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            found = []
            for sub in os.scandir(directory):
                if not (sub.is_dir() and len(sub.name) == 2):
                    continue
                for entry in os.scandir(sub.path):
                    name = entry.name
                    if len(name) == 64 and not name.startswith("."):
                        with contextlib.suppress(OSError, ValueError):
                            st = entry.stat()
                            found.append((st.st_atime, bytes.fromhex(name), st.st_size))
        except OSError as e:
            raise from_oserror(e, f"cache directory {directory}") from None
        for _t, bid, size in sorted(found):
            self._lru[bid] = size
            self.total += size
        self._evict()

    def _path(self, bid: bytes) -> str:
        h = bid.hex()
        return os.path.join(self.directory, h[:2], h)

    def get(self, bid: bytes) -> bytes | None:
        try:
            with open(self._path(bid), "rb") as f:
                data = f.read()
        except OSError:
            with self._lock:
                self.misses += 1
                if bid in self._lru:
                    self.total -= self._lru.pop(bid)
            return None
        with self._lock:
            self.hits += 1
            if bid in self._lru:
                self._lru.move_to_end(bid)
        return data

    def put(self, bid: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(bid)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise LocalError(from_oserror(e, f"writing the cache {self.directory}").message
                             ) from None
        with self._lock:
            if bid in self._lru:
                self.total -= self._lru.pop(bid)
            self._lru[bid] = len(data)
            self.total += len(data)
        self._evict()

    def drop(self, bid: bytes) -> None:
        """Forget a cached blob that failed its check."""
        with self._lock:
            if bid in self._lru:
                self.total -= self._lru.pop(bid)
        with contextlib.suppress(OSError):
            os.unlink(self._path(bid))

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self.total <= self.max_bytes or not self._lru:
                    return
                bid, size = self._lru.popitem(last=False)
                self.total -= size
            with contextlib.suppress(OSError):
                os.unlink(self._path(bid))
