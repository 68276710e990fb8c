#!/usr/bin/env python3
"""Which S3 client library: boto3 against obstore on the local Swift (tests/support/swift.py),
interleaved in one run, medians.

    .venv/bin/python tests/bench/bench_objstore.py [--mib 256] [--runs 3] [--threads 4]
    .venv/bin/python tests/bench/bench_objstore.py --sizes [--mib 256] [--runs 3]

Per library (boto3 as compression/objstore.S3Store uses it): PUT of MIB MiB of random
bytes as 16 MiB objects, GET of the same, and 512
ranged GETs of 128 KiB at random offsets (what a cold mount costs per request); wall time,
the client's CPU time (this process: obstore's Rust threads count too) and the Swift
processes' CPU time. Client and server share the machine's cores.

``--sizes`` (what decides the pack size, with the shipped client): PUT rate of MIB MiB as
objects of 1, 4, 16 and 64 MiB, and the time of one ranged GET of 128 KiB, 1, 4 and 16 MiB
(requests per second and MB/s, 4 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.swift import ACCESS_KEY, REGION, SECRET_KEY, SwiftServer

from diskrsync.compression.objstore import S3Options, S3Store

OBJ = 16 << 20
RANGE = 128 << 10


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _server_cpu(srv: SwiftServer) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in srv.procs.values():
        fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Boto:
    """What the repository ships: compression/objstore.S3Store (boto3, CRC checksums off)."""

    name = "boto3"

    def __init__(self, endpoint: str, bucket: str) -> None:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = (ACCESS_KEY,
                                                                                SECRET_KEY)
        self.s = S3Store(bucket, "", S3Options(endpoint=endpoint, region=REGION))

    def put(self, key: str, data: bytes) -> None:
        self.s.put(key, data)

    def get(self, key: str) -> bytes:
        return self.s.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.s.get_range(key, start, length)


class Obs:
    name = "obstore"

    def __init__(self, endpoint: str, bucket: str) -> None:
        from obstore.store import S3Store

        self.s = S3Store(bucket, endpoint=endpoint, access_key_id=ACCESS_KEY,
                         secret_access_key=SECRET_KEY, region=REGION,
                         virtual_hosted_style_request=False,
                         client_options={"allow_http": True})

    def put(self, key: str, data: bytes) -> None:
        import obstore
        obstore.put(self.s, key, data)

    def get(self, key: str) -> bytes:
        import obstore
        return bytes(obstore.get(self.s, key).bytes())

    def get_range(self, key: str, start: int, length: int) -> bytes:
        import obstore
        return bytes(obstore.get_range(self.s, key, start=start, length=length))


def _timed(srv: SwiftServer, fn: Callable[[], object]) -> dict[str, float]:
    c0, s0, t0 = _cpu(), _server_cpu(srv), time.perf_counter()
    fn()
    return {"wall": time.perf_counter() - t0, "client_cpu": _cpu() - c0,
            "server_cpu": _server_cpu(srv) - s0}


def _one(srv: SwiftServer, pool: ThreadPoolExecutor, c: Boto | Obs, keys: list[str],
         blobs: list[bytes], rng: random.Random) -> dict[str, dict[str, float]]:
    put = _timed(srv, lambda: list(pool.map(
        lambda i: c.put(keys[i], blobs[i % len(blobs)]), range(len(keys)))))
    get = _timed(srv, lambda: list(pool.map(c.get, keys)))
    offs = [(rng.choice(keys), rng.randrange(0, OBJ - RANGE)) for _ in range(512)]
    ranged = _timed(srv, lambda: list(pool.map(lambda o: c.get_range(o[0], o[1], RANGE), offs)))
    return {"put": put, "get": get, "range": ranged}


def sizes(args: argparse.Namespace) -> None:
    data = os.urandom(64 << 20)
    rng = random.Random(2)
    put_rates: dict[int, list[float]] = {}
    get_rates: dict[int, list[tuple[float, float]]] = {}
    with SwiftServer() as srv:
        Boto(srv.endpoint, "x").s._client.create_bucket(Bucket="sizes")
        c = Boto(srv.endpoint, "sizes")
        pool = ThreadPoolExecutor(args.threads)
        for run in range(args.runs):
            for mib in (1, 4, 16, 64):
                size = mib << 20
                n = max(args.mib // mib, 4)
                t = time.perf_counter()
                list(pool.map(lambda i, size=size, mib=mib, run=run: c.put(
                    f"s{mib}/{run}/{i}", data[:size]), range(n)))
                put_rates.setdefault(mib, []).append(n * size / 1e6 / (time.perf_counter() - t))
            for length in (128 << 10, 1 << 20, 4 << 20, 16 << 20):
                n = max(8, min(256, (args.mib << 20) // length))
                offs = [rng.randrange(0, (64 << 20) - length) for _ in range(n)]
                t = time.perf_counter()
                list(pool.map(lambda o, length=length, run=run: c.get_range(
                    f"s64/{run}/0", o, length), offs))
                dt = time.perf_counter() - t
                get_rates.setdefault(length, []).append((n / dt, n * length / 1e6 / dt))
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "cpus": os.cpu_count(),
        "threads": args.threads, "runs": args.runs,
        "put_MBps_by_object_MiB": {m: statistics.median(v) for m, v in put_rates.items()},
        "ranged_get_by_KiB": {n >> 10: {"per_s": statistics.median(r for r, _ in v),
                                        "MBps": statistics.median(b for _, b in v)}
                              for n, v in get_rates.items()}}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", action="store_true")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    if args.sizes:
        sizes(args)
        return
    n = args.mib * (1 << 20) // OBJ
    blobs = [os.urandom(OBJ) for _ in range(min(n, 4))]
    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    with SwiftServer() as srv:
        import boto3
        boto3.client("s3", endpoint_url=srv.endpoint, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY,
                     region_name=REGION).create_bucket(Bucket="bench")
        clients: list[Boto | Obs] = [Boto(srv.endpoint, "bench"), Obs(srv.endpoint, "bench")]
        pool = ThreadPoolExecutor(args.threads)
        rng = random.Random(1)
        for run in range(args.runs):
            for c in clients if run % 2 == 0 else clients[::-1]:
                results.setdefault(c.name, []).append(
                    _one(srv, pool, c, [f"{c.name}/{run}/{i}" for i in range(n)], blobs, rng))
    out: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        med = {f"{op}_{k}": statistics.median(r[op][k] for r in runs)
               for op in ("put", "get", "range") for k in ("wall", "client_cpu", "server_cpu")}
        gib = args.mib / 1024
        out[name] = {
            "put_MBps": args.mib * 1.048576 / med["put_wall"],
            "put_client_cpu_s_per_GiB": med["put_client_cpu"] / gib,
            "put_server_cpu_s_per_GiB": med["put_server_cpu"] / gib,
            "get_MBps": args.mib * 1.048576 / med["get_wall"],
            "get_client_cpu_s_per_GiB": med["get_client_cpu"] / gib,
            "range_per_s": 512 / med["range_wall"],
            "range_client_cpu_ms_per_req": med["range_client_cpu"] / 512 * 1000,
            "range_server_cpu_ms_per_req": med["range_server_cpu"] / 512 * 1000,
        }
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                      "cpus": os.cpu_count(), "mib": args.mib, "threads": args.threads,
                      "runs": args.runs, "results": out}, indent=1))


if __name__ == "__main__":
    main()
