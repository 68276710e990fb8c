"""The tests' S3 service itself (tests/support/swift.py): it starts, answers S3 requests,
keeps its data over a restart, and leaves no process behind; the fault proxy injects what
it is told to."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.swift import ACCESS_KEY, REGION, SECRET_KEY, Fault, FaultProxy, SwiftServer, _state

pytestmark = [pytest.mark.process, pytest.mark.s3]


def _client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION,
                        config=Config(s3={"addressing_style": "path"},
                                      retries={"total_max_attempts": 1}))


def test_start_restart_stop(tmp_path: Path) -> None:
    with SwiftServer(tmp_path / "s") as srv:
        pids = [p.pid for p in srv.procs.values()]
        c = _client(srv.endpoint)
        bucket = srv.new_bucket()
        c.put_object(Bucket=bucket, Key="a/b", Body=b"hello")
        srv.stop()
        assert all(_state(pid) == "gone" for pid in pids)  # reaped: no zombies
        srv.start()
        assert c.get_object(Bucket=bucket, Key="a/b", Range="bytes=1-3")["Body"].read() == b"ell"
        pids = [p.pid for p in srv.procs.values()]
    assert all(_state(pid) == "gone" for pid in pids)
    assert (tmp_path / "s").exists()  # a directory it was given is the caller's


def test_fault_proxy_forwards_and_injects(swift: SwiftServer) -> None:
    port = int(swift.endpoint.rsplit(":", 1)[1])
    bucket = swift.new_bucket()
    rule: dict[str, Fault | None] = {"fault": None}
    with FaultProxy(("127.0.0.1", port), lambda m, p: rule["fault"]) as proxy:
        c = _client(proxy.endpoint)  # signed for the proxy's address: still verifies
        c.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
        assert c.head_object(Bucket=bucket, Key="k")["ContentLength"] == 1000
        rule["fault"] = Fault(status=503)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{proxy.endpoint}/{bucket}/k", timeout=10)
        assert e.value.code == 503
        assert proxy.requests[-1] == ("GET", f"/{bucket}/k") and proxy.faults == 1
