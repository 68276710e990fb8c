"""Object stores: where a repository's immutable objects live (docs/repository.md).

A repository needs only what every S3 service has: put a whole object, get it whole or by
byte range, ask whether it exists, list keys under a prefix (page by page), delete one key.
No conditional writes (OpenStack Swift 2.30 answers 501 to ``If-None-Match``, and where it is
accepted it was measured not to be atomic under concurrent writers), no ``DeleteObjects``
(Swift 2.30 rejects the requests botocore >= 1.36 sends), no multipart (objects are packs
of a few MiB), no tagging or lifecycle. Two backends implement :class:`ObjectStore`:

* :class:`DirStore`: a directory with the same layout, one file per object (dedup on one
  server, and fast tests). A put writes a temporary file, fsyncs it and renames it, so a
  reader never sees half an object, then fsyncs the directory.
* :class:`S3Store` (``s3://bucket/prefix``) over boto3: endpoint and credentials the way the
  AWS tools take them (``AWS_ENDPOINT_URL``/``--s3-endpoint``, ``AWS_ACCESS_KEY_ID``/
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ``~/.aws/config``), path-style addressing
  for every endpoint that is not AWS's own. Chosen over obstore by measurement against the
  local Swift (docs/benchmarks.md, "Object storage"): faster on every operation there,
  half the server CPU per request, and AWS's own credential chain.

Errors come out in the project's classes: a missing object is :class:`ObjectMissing`
(DataError, exit 6) where the caller needs it; bad credentials (403) and a missing bucket are
the user's to fix (UsageError, exit 2); 5xx, 429 and broken connections are retried with
exponential backoff and then become PeerError (exit 5: the store misbehaved); a local
directory's I/O errors are LocalError (exit 3).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from diskrsync.base.errors import (
    DataError,
    DiskrsyncError,
    LocalError,
    ObjectMissing,
    PeerError,
    UsageError,
    from_oserror,
)
from diskrsync.compression.image import sync_folder

T = TypeVar("T")

#: the largest object a repository reads whole (a manifest, an index, a pack): a store that
#: claims more is damaged or hostile, and nothing is allocated for it
MAX_OBJECT = 1 << 30


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(Protocol):
    """Immutable objects by key (``/``-separated, relative to the store's root or prefix).

    Every method is thread-safe and idempotent, so a retried request cannot do harm."""

    #: where the store is, for messages (``s3://bucket/prefix`` or a path)
    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (replacing what is there: callers never rely on
        that, and never write one key with two contents)."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object; :class:`ObjectMissing` when there is none."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``start``; ObjectMissing when there is no object,
        DataError when it is shorter than that (truncated behind our back)."""
        ...

    def head(self, key: str) -> int | None:
        """The object's size, or None when there is none."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in ascending key order."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; no error when it is already gone."""
        ...

    def check(self) -> None:
        """Fail clearly now (missing bucket or directory, bad credentials) rather than on
        the first real request."""
        ...


def check_key(key: str) -> str:
    """Keys are made by the repository code; this guards against one that would leave the
    store's root (an absolute path, ``..``) or name a directory."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise ValueError(f"bad object key {key!r}")
    return key


def _check_length(url: str, length: int) -> None:
    if not 0 <= length <= MAX_OBJECT:
        raise DataError(f"{url}: object of {length} bytes, at most {MAX_OBJECT} expected")


# -- a local directory ------------------------------------------------------------------------


class DirStore:
    """Objects as files under ``root`` (which must exist)."""

    TEMP = ".tmp-"  # temporary files while a put is under way; never listed

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise UsageError(f"{self.root}: no such directory")

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f"{self.TEMP}{os.getpid()}-{threading.get_ident()}-"
                                   f"{os.path.basename(path)}")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            sync_folder(folder)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise from_oserror(e, f"writing {path}") from None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                _check_length(path, os.fstat(f.fileno()).st_size)
                return f.read()
        except FileNotFoundError:
            raise ObjectMissing(path) from None
        except OSError as e:
            raise _local(e, f"reading {path}") from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        _check_length(path, length)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectMissing(path) from None
        except OSError as e:
            raise _local(e, f"reading {path}") from None
        try:
            data = os.pread(fd, length, start)
        except OSError as e:
            raise _local(e, f"reading {path}") from None
        finally:
            os.close(fd)
        if len(data) != length:
            raise DataError(f"{path}: object too short for bytes {start}+{length} (truncated?)")
        return data

    def head(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _local(e, f"reading {self._path(key)}") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # the prefix may end inside a name ("packs/ab"): walk from its last full folder
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        found: list[ObjectInfo] = []
        base = os.path.join(self.root, *folder.split("/")) if folder else self.root
        try:
            for dirpath, dirnames, filenames in os.walk(base):
                rel = os.path.relpath(dirpath, self.root)
                rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                dirnames[:] = [d for d in dirnames if (rel + d + "/").startswith(prefix)
                               or prefix.startswith(rel + d + "/")]
                for name in filenames:
                    key = rel + name
                    if key.startswith(prefix) and not name.startswith(self.TEMP):
                        with contextlib.suppress(FileNotFoundError):
                            found.append(ObjectInfo(key, os.stat(os.path.join(
                                dirpath, name)).st_size))
        except OSError as e:
            raise _local(e, f"listing {base}") from None
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _local(e, f"deleting {path}") from None


def _local(e: OSError, what: str) -> DiskrsyncError:
    """An I/O error of the local store is ours (exit 3), a missing folder included: the
    store was opened, so whatever vanished vanished behind our back."""
    err = from_oserror(e, what)
    return LocalError(err.message) if isinstance(err, UsageError) else err


# -- S3 ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a failed request is retried: ``attempts`` in all, waits
    doubling from ``first`` up to ``longest`` seconds, each drawn from [w/2, w] (jitter, so
    that many clients hitting one overloaded server do not come back in step)."""

    attempts: int = 6
    first: float = 0.25
    longest: float = 8.0

    def waits(self) -> Iterator[float]:
        w = self.first
        for _ in range(self.attempts - 1):
            yield random.uniform(w / 2, w)
            w = min(2 * w, self.longest)


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3 service beyond what boto3 finds in the environment and profiles
    (``--s3-endpoint``, ``--s3-profile``); None: the environment decides."""

    endpoint: str | None = None
    profile: str | None = None
    region: str | None = None
    retry: Retry = Retry()
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_connections: int = 16


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, a broken connection); ``message`` says which."""


class S3Store:
    """Objects in ``s3://bucket/prefix`` through boto3 (imported only when one is made: a
    local push never pays for it)."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        import boto3
        import botocore.config
        import botocore.exceptions

        self.options = options = options or S3Options()
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._exc = botocore.exceptions
        try:
            session = boto3.session.Session(profile_name=options.profile)
        except self._exc.ProfileNotFound as e:
            raise UsageError(f"{e}") from None
        region = options.region or session.region_name or "us-east-1"

        def client(style: str) -> Any:
            cfg = botocore.config.Config(
                s3={"addressing_style": style},
                retries={"total_max_attempts": 1},  # we retry ourselves (Retry)
                connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
                max_pool_connections=options.max_connections,
                # our objects carry their own hashes; the CRC checksums botocore >= 1.36
                # adds cost client CPU, and some S3 services refuse them
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required")
            return session.client("s3", endpoint_url=options.endpoint, region_name=region,
                                  config=cfg)

        try:
            self._client = client("auto")
            host = urlparse(self._client.meta.endpoint_url).hostname or ""
            if not host.endswith("amazonaws.com"):  # on-premises servers: path style
                self._client = client("path")
        except (self._exc.BotoCoreError, ValueError) as e:
            raise UsageError(f"{self.url}: cannot configure the S3 client: {e}") from None
        self.endpoint = self._client.meta.endpoint_url

    # -- requests ------------------------------------------------------------------------------

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one request, retrying transient failures; map errors to the project's."""
        where = f"{self.url}/{key}" if key is not None else self.url
        waits = self.options.retry.waits()
        while True:
            try:
                try:
                    return fn()
                except self._exc.ClientError as e:
                    raise self._client_error(e, what, where) from None
                except (self._exc.EndpointConnectionError, self._exc.ConnectionClosedError,
                        self._exc.ReadTimeoutError, self._exc.ConnectTimeoutError,
                        self._exc.ResponseStreamingError) as e:
                    raise _Transient(f"{e}") from None
                except self._exc.NoCredentialsError:
                    raise UsageError(
                        f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                        f"AWS_SECRET_ACCESS_KEY, or a profile with AWS_PROFILE)") from None
                except self._exc.BotoCoreError as e:
                    raise PeerError(f"{what} {where}: {e}") from None
            except _Transient as e:
                wait = next(waits, None)
                if wait is None:
                    raise PeerError(f"{what} {where} failed "
                                    f"{self.options.retry.attempts} times, last: {e} "
                                    f"(endpoint {self.endpoint})") from None
                time.sleep(wait)

    def _client_error(self, e: Any, what: str, where: str) -> Exception:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"{code or status}: {err.get('Message') or 'no message'}"
        if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout",
                                                      "InternalError", "ServiceUnavailable"):
            return _Transient(f"HTTP {status} {detail}")
        if code == "NoSuchBucket" or (status == 404 and code in ("404", "NotFound")
                                      and what == "opening"):
            return UsageError(f"{self.url}: bucket {self.bucket!r} does not exist at "
                              f"{self.endpoint}")
        if code == "NoSuchKey" or status == 404:
            return ObjectMissing(where)
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return UsageError(f"{what} {where}: access denied ({detail}); check the "
                              f"credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                              f"AWS_PROFILE) and the endpoint {self.endpoint}")
        if code == "InvalidRange" or status == 416:
            return DataError(f"{where}: object too short for the range read (truncated?)")
        return PeerError(f"{what} {where}: HTTP {status} {detail}")

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def check(self) -> None:
        self._call("opening", None, lambda: self._client.head_bucket(Bucket=self.bucket))

    def put(self, key: str, data: bytes) -> None:
        k = self._key(key)
        self._call("writing", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=k, Body=data))

    def _read(self, key: str, what: str, length: int | None, **kw: Any) -> bytes:
        k = self._key(key)

        def fetch() -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=k, **kw)
            size = int(resp.get("ContentLength", -1))
            if length is not None and size != length:  # a 200 for a ranged GET, or short
                resp["Body"].close()
                raise DataError(f"{self.url}/{key}: {size} bytes for a range of {length} "
                                f"(object truncated?)")
            _check_length(f"{self.url}/{key}", size)
            data = resp["Body"].read()
            if len(data) != size:  # the connection broke mid-body
                raise _Transient(f"{len(data)} of {size} bytes arrived")
            return bytes(data)

        return self._call(what, key, fetch)

    def get(self, key: str) -> bytes:
        return self._read(key, "reading", None)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        _check_length(f"{self.url}/{key}", length)
        if length == 0:
            return b""
        return self._read(key, "reading", length, Range=f"bytes={start}-{start + length - 1}")

    def head(self, key: str) -> int | None:
        k = self._key(key)

        def fetch() -> int | None:
            try:
                resp = self._client.head_object(Bucket=self.bucket, Key=k)
            except self._exc.ClientError as e:
                # HEAD has no body to name the error: a 404 is "no such object" (a missing
                # bucket shows on check() and on the first put or list)
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise
            return int(resp["ContentLength"])

        return self._call("checking", key, fetch)

    def list(self, prefix: str, page_size: int = 1000) -> Iterator[ObjectInfo]:
        start = self.prefix + prefix
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": start, "MaxKeys": page_size}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("listing", prefix or None,
                              lambda kw=kw: self._client.list_objects_v2(**kw))  # type: ignore[misc]
            for obj in page.get("Contents", []):
                yield ObjectInfo(str(obj["Key"])[len(self.prefix):], int(obj["Size"]))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def delete(self, key: str) -> None:
        k = self._key(key)
        with contextlib.suppress(ObjectMissing):
            self._call("deleting", key, lambda: self._client.delete_object(
                Bucket=self.bucket, Key=k))


def open_store(url: str, options: S3Options | None = None) -> ObjectStore:
    """The store a repository URL names: ``s3://bucket[/prefix]`` or a local directory
    (a path, or ``file://PATH``)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise UsageError(f"{url}: no bucket (s3://BUCKET[/PREFIX])")
        return S3Store(parsed.netloc, parsed.path, options)
    if parsed.scheme == "file":
        return DirStore(parsed.path)
    if parsed.scheme and "://" in url:
        raise UsageError(f"{url}: unknown store scheme {parsed.scheme!r} (s3:// or a path)")
    return DirStore(url)
