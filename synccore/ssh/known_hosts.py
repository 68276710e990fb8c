"""known_hosts as OpenSSH reads and writes it: hashed names, wildcards, negation, markers
(``@revoked``), the global file, and an explicit accept-new."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

import paramiko

from diskrsync.base.errors import LocalError
from diskrsync.synccore.ssh.config import Target
from diskrsync.synccore.ssh.errors import HostKeyChangedError, HostKeyError, UnknownHostKeyError

__all__ = ["check_host_key", "fingerprint", "known_keys"]


@dataclass(frozen=True)
class _KnownKey:
    marker: str
    keytype: str
    blob: bytes
    where: str


def _wildcard(pattern: str) -> re.Pattern[str]:
    """OpenSSH patterns know only ``*`` and ``?``; brackets (``[host]:port``) are literal."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts))


def _host_matches(patterns: str, name: str) -> bool:
    """OpenSSH host-pattern matching: hashed names, wildcards, ``!negation``."""
    hit = False
    for pat in patterns.split(","):
        if pat.startswith("|1|"):
            try:
                _, _, salt_b64, hash_b64 = pat.split("|")
                salt = base64.b64decode(salt_b64)
                want = base64.b64decode(hash_b64)
            except ValueError:
                continue
            digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
            if hmac.compare_digest(digest, want):
                hit = True
            continue
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        if _wildcard(pat.lower()).fullmatch(name):
            if negate:
                return False
            hit = True
    return hit


def known_keys(files: list[Path], name: str) -> list[_KnownKey]:
    found = []
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise LocalError(f"cannot read known hosts file {path}: {e.strerror or e}") from None
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = fields.pop(0) if fields[0].startswith("@") else ""
            if len(fields) < 3 or not _host_matches(fields[0], name):
                continue
            try:
                blob = base64.b64decode(fields[2], validate=True)
            except ValueError:
                continue
            found.append(_KnownKey(marker, fields[1], blob, f"{path}:{lineno}"))
    return found


def fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _add_known_host(target: Target, key: paramiko.PKey) -> None:
    """Append the key like OpenSSH's accept-new (hashed if HashKnownHosts says so)."""
    name = target.known_hosts_name
    if target.hash_known_hosts:
        name = paramiko.HostKeys.hash_host(name)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    path = target.known_hosts
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise LocalError(f"cannot add host key to {path}: {e.strerror or e}") from None


def check_host_key(target: Target, key: paramiko.PKey, accept_new: bool) -> bool:
    """Verify the server key; returns True when it was newly added to known_hosts."""
    name = target.known_hosts_name
    known = known_keys([target.known_hosts, *target.extra_known_hosts], name)
    blob = key.asbytes()
    kind, fp = key.get_name(), fingerprint(blob)
    for k in known:
        if k.marker == "@revoked" and k.blob == blob:
            raise HostKeyError(f"host key {kind} {fp} of {name} is marked @revoked at {k.where}")
    plain = [k for k in known if not k.marker]
    if any(k.blob == blob for k in plain):
        return False
    fix = (
        f"if the change is expected, remove the old entry: "
        f"ssh-keygen -R '{name}' -f {target.known_hosts}"
    )
    same_type = [k for k in plain if k.keytype == kind]
    if same_type:
        old = same_type[0]
        raise HostKeyChangedError(
            f"HOST KEY OF {name} HAS CHANGED: it now offers {kind} {fp} but {old.where} has "
            f"{fingerprint(old.blob)}; someone may be intercepting the connection; {fix}"
        )
    if plain:
        old = plain[0]
        raise HostKeyChangedError(
            f"host key of {name} changed type: it offers {kind} {fp} but {old.where} has a "
            f"{old.keytype} key; refusing a possible man in the middle; {fix}"
        )
    if not accept_new:
        raise UnknownHostKeyError(
            f"unknown host key for {name}: {kind} {fp}; if that fingerprint is right "
            f"(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub on the server), rerun with "
            f"--accept-new-host-key to add it to {target.known_hosts}"
        )
    _add_known_host(target, key)
    return True
