"""The object-store layer (compression/objstore.py) on both backends: a local directory and
a real S3 service (OpenStack Swift with s3api, tests/support/swift.py), and its faults:
5xx and slow answers through a fault-injecting proxy, wrong credentials, a missing bucket,
the store stopped and restarted."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.swift import (
    ACCESS_KEY,
    BACKENDS,
    Fault,
    FaultProxy,
    SwiftServer,
    backend_store,
    credentials,
)

from diskrsync.base.errors import DataError, ObjectMissing, PeerError, UsageError
from diskrsync.compression.objstore import (
    DirStore,
    ObjectStore,
    S3Store,
    check_key,
    open_store,
)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    return backend_store(request, tmp_path, monkeypatch, "some/prefix")


def test_put_get_range_head_delete(store: ObjectStore) -> None:
    store.check()
    data = bytes(range(256)) * 1000
    store.put("packs/ab/abcdef", data)
    assert store.get("packs/ab/abcdef") == data
    assert store.get_range("packs/ab/abcdef", 1000, 5000) == data[1000:6000]
    assert store.get_range("packs/ab/abcdef", 0, 0) == b""
    assert store.head("packs/ab/abcdef") == len(data)
    assert store.head("packs/ab/nothing") is None
    store.put("empty", b"")
    assert store.get("empty") == b"" and store.head("empty") == 0
    store.delete("packs/ab/abcdef")
    store.delete("packs/ab/abcdef")  # already gone: no error
    assert store.head("packs/ab/abcdef") is None
    with pytest.raises(ObjectMissing):
        store.get("packs/ab/abcdef")
    with pytest.raises(ObjectMissing):
        store.get_range("packs/ab/abcdef", 0, 10)


def test_a_range_past_the_end_is_data_damage(store: ObjectStore) -> None:
    store.put("p", b"x" * 100)
    with pytest.raises(DataError, match="truncated"):
        store.get_range("p", 50, 100)  # partly past the end: fewer bytes than asked
    with pytest.raises(DataError, match="truncated"):
        store.get_range("p", 200, 10)  # wholly past the end


def test_list_by_prefix_in_key_order(store: ObjectStore) -> None:
    keys = ["a/1", "a/2", "a/b/3", "ab/4", "b/5", "locks/x"]
    for k in reversed(keys):
        store.put(k, k.encode())
    assert [o.key for o in store.list("")] == keys
    assert [o.key for o in store.list("a/")] == ["a/1", "a/2", "a/b/3"]
    assert [o.key for o in store.list("a")] == ["a/1", "a/2", "a/b/3", "ab/4"]
    assert [(o.key, o.size) for o in store.list("b")] == [("b/5", 3)]
    assert list(store.list("zzz")) == []


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../x", "a/../b", "a/.", "a/"])
@pytest.mark.pure
def test_keys_cannot_leave_the_root(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


@pytest.mark.inproc
def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    assert isinstance(open_store(str(tmp_path)), DirStore)
    assert open_store(f"file://{tmp_path}").url == str(tmp_path)
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and s3.url == "s3://bucket/some/prefix"
    assert s3.endpoint.endswith("amazonaws.com")  # AWS itself without an endpoint
    with pytest.raises(UsageError, match="no bucket"):
        open_store("s3:///x")
    with pytest.raises(UsageError, match="unknown store scheme"):
        open_store("ftp://host/x")
    with pytest.raises(UsageError, match="no such directory"):
        DirStore(str(tmp_path / "absent")).check()


@pytest.mark.inproc
def test_endpoint_from_the_environment_uses_path_style(monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = open_store("s3://bucket")
    assert isinstance(s3, S3Store)
    assert s3.endpoint == "http://127.0.0.1:9"
    assert s3._client.meta.config.s3["addressing_style"] == "path"


@pytest.mark.inproc
def test_a_profile_supplies_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = tmp_path / "config"
    config.write_text("[profile backup]\naws_access_key_id = AK\naws_secret_access_key = SK\n"
                      "region = eu-west-3\nendpoint_url = http://127.0.0.1:9\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "backup")
    s3 = open_store("s3://bucket")
    assert isinstance(s3, S3Store)
    assert s3._client._request_signer._credentials.access_key == "AK"
    assert s3.endpoint == "http://127.0.0.1:9"
    assert s3._client.meta.region_name == "eu-west-3"
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(UsageError, match="nope"):
        open_store("s3://bucket")


@pytest.mark.process
def test_importing_the_store_layer_does_not_load_boto3() -> None:
    """boto3 costs a few hundred ms to import: only an S3 repository pays for it."""
    code = "import sys, diskrsync.compression.objstore; print('boto3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "False"


# -- faults against the real S3 service -------------------------------------------------------


@pytest.mark.process
@pytest.mark.s3
def test_wrong_credentials_are_a_clear_usage_error(swift: SwiftServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = swift.new_bucket()
    credentials(monkeypatch, secret="wrong")
    s3 = S3Store(bucket, "", swift.options())
    for op in (s3.check, lambda: s3.put("k", b"x"), lambda: s3.get("k"),
               lambda: list(s3.list(""))):
        with pytest.raises(UsageError, match=r"access denied.*AWS_ACCESS_KEY_ID"):
            op()
    credentials(monkeypatch, key="nobody:nobody")
    with pytest.raises(UsageError, match="access denied"):
        S3Store(bucket, "", swift.options()).put("k", b"x")
    assert ACCESS_KEY  # the right key works (every other test)


@pytest.mark.process
@pytest.mark.s3
def test_a_missing_bucket_is_a_clear_usage_error(swift: SwiftServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    s3 = S3Store("no-such-bucket", "", swift.options())
    for op in (s3.check, lambda: s3.put("k", b"x"), lambda: s3.get("k"),
               lambda: list(s3.list(""))):
        with pytest.raises(UsageError, match="bucket 'no-such-bucket' does not exist"):
            op()


@pytest.mark.process
@pytest.mark.s3
def test_5xx_and_dropped_connections_are_retried(swift: SwiftServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    bucket = swift.new_bucket()
    port = int(swift.endpoint.rsplit(":", 1)[1])
    failures = {"n": 0}
    lock = threading.Lock()

    def flaky(method: str, path: str) -> Fault | None:
        with lock:
            failures["n"] += 1
            n = failures["n"]
        # each request fails twice (503, then a dropped connection), the third passes
        return {1: Fault(status=503), 2: Fault(drop=True)}.get(n % 3)

    with FaultProxy(("127.0.0.1", port), flaky) as proxy:
        s3 = S3Store(bucket, "p", swift.options(proxy.endpoint))
        s3.put("k", b"hello")
        assert s3.get("k") == b"hello"
        assert s3.get_range("k", 1, 3) == b"ell"
        assert [o.key for o in s3.list("")] == ["k"]
        s3.delete("k")
        assert proxy.faults >= 10

    with FaultProxy(("127.0.0.1", port), lambda m, p: Fault(status=500)) as proxy:
        s3 = S3Store(bucket, "p", swift.options(proxy.endpoint))
        with pytest.raises(PeerError, match=r"failed 4 times.*HTTP 500"):
            s3.put("k", b"x")
        assert len(proxy.requests) == 4


@pytest.mark.process
@pytest.mark.s3
def test_a_slow_answer_times_out_and_is_retried(swift: SwiftServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    bucket = swift.new_bucket()
    port = int(swift.endpoint.rsplit(":", 1)[1])
    seen = {"n": 0}

    def slow_once(method: str, path: str) -> Fault | None:
        seen["n"] += 1
        return Fault(delay=3.0) if seen["n"] == 1 else None

    with FaultProxy(("127.0.0.1", port), slow_once) as proxy:
        s3 = S3Store(bucket, "", swift.options(proxy.endpoint, read_timeout=0.5))
        s3.put("k", b"slow")  # the first try times out, the second passes
        assert s3.get("k") == b"slow"
        assert proxy.faults == 1


@pytest.mark.process
@pytest.mark.s3
@pytest.mark.slow
def test_the_store_stopped_and_restarted(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    with SwiftServer(tmp_path / "swift") as srv:
        s3 = S3Store(srv.new_bucket(), "", srv.options())
        s3.put("before", b"kept")
        srv.kill()
        with pytest.raises(PeerError, match="failed 4 times"):
            s3.put("during", b"x")
        srv.start()
        assert s3.get("before") == b"kept"
        s3.put("after", b"y")
        assert [o.key for o in s3.list("")] == ["after", "before"]


@pytest.mark.process
@pytest.mark.s3
def test_listing_follows_pages(swift: SwiftServer, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials(monkeypatch)
    s3 = S3Store(swift.new_bucket(), "pre", swift.options())
    keys = [f"k/{i:03d}" for i in range(7)]
    for k in keys:
        s3.put(k, b"")
    assert [o.key for o in s3.list("k/", page_size=2)] == keys
