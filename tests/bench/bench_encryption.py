#!/usr/bin/env python3
"""What encryption costs: the same pushes and mount reads plain and encrypted, interleaved in
one run (the machine is shared and noisy: medians and same-run ratios count).

    .venv/bin/python tests/bench/bench_encryption.py [--data DIR] [--repeat 5]

DIR holds synth.img (../shared/bench/gen_synth.py; tests/bench/run.py makes it). Cases, each in
a fresh process: the first push of the 2 GiB synthetic image into a new image, plain / AES-256-
GCM / ChaCha20-Poly1305; a no-change push into an image holding it; sequential reads of
disk.raw through a mount (dd bs=1M, image warm). Pushes are timed with the key already at
hand (cheapest Argon2id): the passphrase's Argon2id, a fixed cost per command by design, is
measured on its own. Also one core's AEAD throughput on 128 KiB chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diskrsync.compression import crypto
from diskrsync.compression.crypto import Envelope, MasterKey
from diskrsync.compression.image import Image
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions

REPO = Path(__file__).resolve().parents[2]
FAST = "1024,1,1"
PASS = "bench passphrase"


def _setup_env(data: Path) -> None:
    os.environ["DISKRSYNC_STATE_DIR"] = str(data / "bench-state")


def _push(data: Path, dst: str, cipher: str | None, *, fresh: bool) -> dict:
    if cipher:
        crypto.default_cipher = lambda: cipher
    target = data / dst
    if fresh:
        target.unlink(missing_ok=True)
    ring = crypto.Keyring(lambda why, new: PASS.encode())
    if cipher and not fresh:  # the key unlocked before the clock starts (see the docstring)
        Image.open(str(target), keyring=ring).close()
    src = data / "synth.img"
    with open(src, "rb") as f:
        while f.read(1 << 24):
            pass
    opts = SourceOptions(keyring=ring if cipher else None, encrypt=bool(cipher) and fresh,
                         kdf=crypto.KdfParams(1024, 1, 1))
    t = time.perf_counter()
    stats = local_push(str(src), str(target), PushRequest(source=opts))
    return {"seconds": time.perf_counter() - t, "bytes_sent": stats.bytes_sent,
            "file_size": target.stat().st_size}


def case(name: str, data: Path) -> dict:
    _setup_env(data)
    kind, _, cipher = name.partition(":")
    c = cipher or None
    if kind == "first":
        return _push(data, f"enc-first-{cipher or 'plain'}.spgz", c, fresh=True)
    if kind == "same":
        return _push(data, f"enc-base-{cipher or 'plain'}.spgz", c, fresh=False)
    if kind == "kdf":
        env = Envelope.wrap(MasterKey.generate(), PASS.encode())
        t = time.perf_counter()
        env.unwrap(PASS.encode())
        return {"seconds": time.perf_counter() - t}
    if kind == "aead":
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        blob = os.urandom(128 * 1024)
        aead = (AESGCM if cipher == "aes-256-gcm" else ChaCha20Poly1305)(os.urandom(32))
        n = 4000
        t = time.perf_counter()
        for i in range(n):
            aead.encrypt(i.to_bytes(12, "little"), blob, b"ad")
        return {"seconds": time.perf_counter() - t, "mb_s": n * len(blob) / 1e6 /
                (time.perf_counter() - t)}
    raise SystemExit(f"unknown case {name}")


def run(name: str, data: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--case", name, "--data", str(data)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONSAFEPATH="1"))
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr}")
    out: dict = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def mount_read(image: Path, work: Path, env: dict[str, str]) -> float:
    """Seconds for dd bs=1M of disk.raw through a fresh mount (image warm)."""
    mp = work / "mnt"
    mp.mkdir(exist_ok=True)
    cli = [sys.executable, "-m", "diskrsync.cli"]
    subprocess.run([*cli, "mount", str(image), str(mp)], check=True, env=env)
    try:
        t = time.perf_counter()
        subprocess.run(["dd", f"if={mp / 'disk.raw'}", "of=/dev/null", "bs=1M", "status=none"],
                       check=True)
        return time.perf_counter() - t
    finally:
        subprocess.run([*cli, "umount", str(mp)], check=False, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "bench-data")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--case")
    ap.add_argument("--no-mount", action="store_true")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.data)))
        return
    data = args.data
    if not (data / "synth.img").exists():
        raise SystemExit(f"{data}/synth.img is missing: run tests/bench/run.py once")
    _setup_env(data)
    shutil.rmtree(data / "bench-state", ignore_errors=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, "
          f"median of {args.repeat}, interleaved", flush=True)
    ciphers = ["", "aes-256-gcm", "chacha20-poly1305"]
    for c in ciphers:  # the images the no-change pushes go into
        run(f"first:{c}", data)
        shutil.copyfile(data / f"enc-first-{c or 'plain'}.spgz",
                        data / f"enc-base-{c or 'plain'}.spgz")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for kind in ("first", "same"):
            for c in ciphers:
                os.sync()
                time.sleep(0.5)
                results.setdefault(f"{kind}:{c}", []).append(run(f"{kind}:{c}", data))
    for c in ciphers[1:]:
        results[f"aead:{c}"] = [run(f"aead:{c}", data) for _ in range(3)]
    results["kdf:"] = [run("kdf:", data) for _ in range(3)]
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    for k, v in results.items():
        extra = f"  {statistics.median(r['mb_s'] for r in v):,.0f} MB/s" if "mb_s" in v[0] else ""
        print(f"  {k:28} {med[k]:7.3f} s  runs {[round(r['seconds'], 3) for r in v]}{extra}")
    for kind in ("first", "same"):
        for c in ciphers[1:]:
            print(f"  {kind} {c}: {med[f'{kind}:{c}'] / med[f'{kind}:']:.3f}x plain")
    if args.no_mount:
        return
    env = dict(os.environ, PYTHONSAFEPATH="1", DISKRSYNC_PASSPHRASE=PASS)
    with tempfile.TemporaryDirectory(dir=data) as tmp:
        times: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for c in ciphers:
                image = data / f"enc-base-{c or 'plain'}.spgz"
                with open(image, "rb") as f:
                    while f.read(1 << 24):
                        pass
                times.setdefault(c or "plain", []).append(mount_read(image, Path(tmp), env))
    size = (data / "synth.img").stat().st_size
    for k, secs in times.items():
        m = statistics.median(secs)
        print(f"  mount read {k:20} {m:7.3f} s  {size / m / 1e6:7.0f} MB/s  "
              f"runs {[round(x, 3) for x in secs]}  "
              f"{m / statistics.median(times['plain']):.3f}x")


if __name__ == "__main__":
    main()
