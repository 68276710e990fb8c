"""A real S3 service for tests: a single-node OpenStack Swift with its s3api middleware.

Tests of the object-store backends must meet a real S3 implementation (its error bodies,
its missing features, its latency), not a mock that shares our assumptions. Each
``SwiftServer`` lives in its own directory: rings with one replica and one device (built in
one Python call, 0.4 s), account, container, object and proxy servers with ``workers = 0``
(one process each) and a memcached, all on free ports of 127.0.0.1. Debian's Swift
(``scripts/setup.sh`` installs it) runs under the system ``/usr/bin/python3``, not the
project's virtual environment. Start to ready takes 2-6 s; data survives ``stop`` and
``start`` (the "store restarted mid-push" fault). Access key ``test:tester``, secret
``testing``, region ``us-east-1``, path-style addressing.

``FaultProxy`` sits between a client and the proxy server and injects faults per request:
an error status instead of forwarding, a delay before answering, or a dropped connection.

Facts and pitfalls: ../shared/FACTS.md ("A real S3 service on this machine").
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from diskrsync.compression.objstore import DirStore, ObjectStore, Retry, S3Options, S3Store

SYSTEM_PYTHON = "/usr/bin/python3"
ACCESS_KEY = "test:tester"
SECRET_KEY = "testing"
REGION = "us-east-1"
SERVERS = ("account", "container", "object")


def free_port() -> int:
    """A loopback port nobody listens on right now (small race: ``start`` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def swift_installed() -> bool:
    """The packages scripts/setup.sh installs, including /etc/swift/swift.conf: Swift 2.30
    reads its hash prefix and storage policies from that fixed path, whatever swift_dir
    says (the package ships it; nothing here writes to /etc)."""
    return (shutil.which("swift-proxy-server") is not None
            and shutil.which("memcached") is not None and os.path.exists(SYSTEM_PYTHON)
            and os.path.exists("/etc/swift/swift.conf"))


# Rings for one device per server, one replica, part power 6: RingBuilder in one process
# (nine swift-ring-builder calls take ~9x as long).
_RINGS = """
import sys
from swift.common.ring import RingBuilder
etc, ports = sys.argv[1], dict(zip(("account", "container", "object"), map(int, sys.argv[2:])))
for name, port in ports.items():
    b = RingBuilder(6, 1, 1)
    b.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": port,
               "device": "d0", "weight": 100})
    b.rebalance()
    b.save(f"{etc}/{name}.builder")
    b.get_ring().save(f"{etc}/{name}.ring.gz")
"""

_PIPELINE = ("catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk "
             "tempurl ratelimit s3api tempauth copy container-quotas account-quotas slo dlo "
             "versioned_writes symlink proxy-logging proxy-server")


def _state(pid: int) -> str:
    """A process's state letter from /proc (Z: a zombie, which ``kill -0`` calls alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2]


class SwiftServer:
    """Start a private Swift + s3api; use as a context manager.

    ``endpoint`` is the S3 endpoint URL (``http://127.0.0.1:PORT``); ``stop()`` and ``start()``
    keep the data; ``close()`` also removes the directory when the server made it.
    """

    def __init__(self, base: Path | None = None) -> None:
        self._own_dir = base is None
        self.dir = Path(tempfile.mkdtemp(prefix="swift-")) if base is None else base
        self.etc = self.dir / "etc"
        self.devices = self.dir / "node"
        self.logs = self.dir / "log"
        for d in (self.etc, self.devices / "d0", self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def _configure(self) -> None:
        """Pick ports, write the configuration and the rings for them."""
        self.ports = {name: free_port() for name in (*SERVERS, "proxy", "memcached")}
        common = (f"[DEFAULT]\nbind_ip = 127.0.0.1\nworkers = 0\nmount_check = false\n"
                  f"devices = {self.devices}\nswift_dir = {self.etc}\nuser = root\n"
                  f"log_level = WARNING\n")
        for name in SERVERS:
            (self.etc / f"{name}-server.conf").write_text(
                f"{common}bind_port = {self.ports[name]}\n\n[pipeline:main]\n"
                f"pipeline = {name}-server\n\n[app:{name}-server]\nuse = egg:swift#{name}\n")
        (self.etc / "proxy-server.conf").write_text(
            f"{common}bind_port = {self.ports['proxy']}\n\n"
            f"[pipeline:main]\npipeline = {_PIPELINE}\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
            "[filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\n\n"
            "[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = testing .admin\n\n"
            f"[filter:cache]\nuse = egg:swift#memcache\n"
            f"memcache_servers = 127.0.0.1:{self.ports['memcached']}\n\n"
            + "".join(f"[filter:{f}]\nuse = egg:swift#{f.replace('-', '_')}\n\n" for f in (
                "catch_errors", "gatekeeper", "healthcheck", "proxy-logging",
                "listing_formats", "bulk", "tempurl", "ratelimit", "copy",
                "container-quotas", "account-quotas", "slo", "dlo", "versioned_writes",
                "symlink")))
        subprocess.run([SYSTEM_PYTHON, "-c", _RINGS, str(self.etc),
                        *(str(self.ports[n]) for n in SERVERS)], check=True,
                       capture_output=True, timeout=60)

    def start(self, timeout: float = 30.0) -> SwiftServer:
        """Start every server (on the ports of the last start, if any) and wait until the
        S3 endpoint answers; a port someone else took makes a retry on new ports."""
        last = ""
        for _ in range(3):
            if not self.ports:
                self._configure()
            self._spawn()
            if self._wait_ready(timeout):
                return self
            last = self.log_tail()
            self.stop()
            self.ports = {}
        raise RuntimeError(f"Swift did not start; log tail:\n{last}")

    def _spawn(self) -> None:
        def run(name: str, argv: list[str]) -> None:
            with (self.logs / f"{name}.log").open("ab") as log:
                self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                    stdout=log, stderr=log)

        run("memcached", ["memcached", "-l", "127.0.0.1", "-p", str(self.ports["memcached"]),
                          "-U", "0", "-u", "root", "-m", "32"])
        for name in (*SERVERS, "proxy"):
            run(name, [f"swift-{name}-server", str(self.etc / f"{name}-server.conf"), "-v"])

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pending = {n: p for n, p in self.ports.items() if n != "proxy"}
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs.values()):
                return False
            for name, port in list(pending.items()):
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=0.5):
                    del pending[name]
            if not pending:
                with contextlib.suppress(OSError), urllib.request.urlopen(
                        f"{self.endpoint}/healthcheck", timeout=2) as r:
                    if r.status == 200:
                        return True
            time.sleep(0.05)
        return False

    def log_tail(self, size: int = 2000) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-size:]}\n"
                       for p in sorted(self.logs.glob("*.log")))

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop every process (``sig``, then SIGKILL after 5 s) and reap it, so that no
        zombie is left for a later ``kill -0`` to mistake for a live server."""
        procs, self.procs = self.procs, {}
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
        for p in procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            assert _state(p.pid) in ("gone", "Z") or p.returncode is not None

    def kill(self) -> None:
        """SIGKILL every process (a crashed store); ``start`` brings it back on its data."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> SwiftServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)


    def new_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its name."""
        import boto3

        name = name or f"t{next(_buckets)}-{os.getpid()}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY,
                     region_name=REGION).create_bucket(Bucket=name)
        return name

    def options(self, endpoint: str | None = None, **kw: Any) -> Any:
        """S3Options reaching this server (or ``endpoint``: a FaultProxy in front of it),
        with quick retries; set the credentials with ``credentials()``."""
        kw.setdefault("retry", Retry(attempts=4, first=0.01, longest=0.05))
        return S3Options(endpoint=endpoint or self.endpoint, region=REGION, **kw)


_buckets = itertools.count(1)


def credentials(monkeypatch: pytest.MonkeyPatch, key: str = ACCESS_KEY,
                secret: str = SECRET_KEY) -> None:
    """Point boto3 at the test credentials only: no profile or file of this machine's."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/diskrsync-tests")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/diskrsync-tests")


@contextlib.contextmanager
def running_swift(base: Path | None = None) -> Iterator[SwiftServer]:
    with SwiftServer(base) as srv:
        yield srv


@pytest.fixture(scope="session")
def swift() -> Iterator[SwiftServer]:
    """One Swift for the whole session (tests use their own buckets); tests that stop or
    kill the store start their own ``SwiftServer``."""
    if not swift_installed():  # fail, not skip: CI must never pass without the S3 tests
        pytest.fail("OpenStack Swift is not installed (make setup installs it)")
    with SwiftServer() as srv:
        yield srv


# -- a fault-injecting HTTP proxy --------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What to do with one request: answer ``status`` without forwarding it (0: forward),
    wait ``delay`` seconds first, or close the connection without an answer (``drop``)."""

    status: int = 0
    delay: float = 0.0
    drop: bool = False


#: decides per request (method, path with query): None passes it through untouched
FaultRule = Callable[[str, str], Fault | None]


class FaultProxy:
    """An HTTP/1.1 proxy on a free loopback port in front of ``upstream`` (host, port).

    Requests are forwarded as they are (the Host header too, so SigV4 signatures made for
    the proxy's address still verify upstream); ``rule`` injects faults; ``requests`` counts
    what arrived, ``faults`` what was injected. Use as a context manager.
    """

    def __init__(self, upstream: tuple[str, int], rule: FaultRule | None = None) -> None:
        self.upstream = upstream
        self.rule: FaultRule = rule or (lambda method, path: None)
        self.requests: list[tuple[str, str]] = []
        self.faults = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                fault = proxy.rule(self.command, self.path)
                if fault is not None:
                    with proxy._lock:
                        proxy.faults += 1
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.drop:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if fault.status:
                        msg = f"<Error><Code>Injected</Code><Message>{fault.status}</Message>" \
                              f"</Error>".encode()
                        self.send_response(fault.status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("connection", "keep-alive")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                         "content-length"):
                        self.send_header(k, v)
                # a HEAD answer's length is the object's, not its (empty) body's
                self.send_header("Content-Length", resp.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


#: the two object-store backends a repository test runs on: a directory (in-process) and the
#: real Swift (a process; its session fixture ``swift`` starts it once)
BACKENDS = [pytest.param("dir", marks=pytest.mark.inproc),
            pytest.param("s3", marks=[pytest.mark.process, pytest.mark.s3])]


def backend_store(request: pytest.FixtureRequest, directory: Path,
                  monkeypatch: pytest.MonkeyPatch, prefix: str = "repo") -> ObjectStore:
    """The store of a ``BACKENDS``-parametrised test: ``directory`` (made if missing), or a
    new bucket of the test Swift with objects under ``prefix``."""
    if request.param == "dir":
        directory.mkdir(parents=True, exist_ok=True)
        return DirStore(str(directory))
    srv: SwiftServer = request.getfixturevalue("swift")
    credentials(monkeypatch)
    return S3Store(srv.new_bucket(), prefix, srv.options())
