"""Public-key authentication in OpenSSH's spirit: explicit identity files, the agent, then
the default key files; a failure says what was tried and what the server allows."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import paramiko

from diskrsync.synccore.ssh.config import SshOptions, Target
from diskrsync.synccore.ssh.errors import AuthError, ConnectError

__all__ = ["authenticate"]

DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


def _agent_keys(use_agent: bool) -> tuple[list[paramiko.PKey], Any]:
    if not use_agent or not os.environ.get("SSH_AUTH_SOCK"):
        return [], None
    try:
        agent = paramiko.Agent()
        return list(agent.get_keys()), agent
    except Exception:  # a stale SSH_AUTH_SOCK must not stop key-file auth
        return [], None


def _load_key(path: Path, notes: list[str]) -> paramiko.PKey | None:
    try:
        return paramiko.PKey.from_path(path.expanduser())
    except FileNotFoundError:
        notes.append(f"{path} missing")
    except paramiko.PasswordRequiredException:
        notes.append(f"{path} needs a passphrase (add it to ssh-agent)")
    except TypeError:
        # cryptography raises TypeError when an encrypted key is given no password.
        notes.append(f"{path} needs a passphrase (add it to ssh-agent)")
    except (OSError, ValueError, paramiko.SSHException) as e:
        notes.append(f"{path} unreadable ({e})")
    return None


def authenticate(t: paramiko.Transport, target: Target, opts: SshOptions) -> None:
    """Offer keys in OpenSSH's spirit: explicit files, agent, then default key files."""
    notes: list[str] = []
    candidates: list[tuple[str, paramiko.PKey]] = []
    for path in target.identity_files:
        key = _load_key(path, notes)
        if key is not None:
            candidates.append((str(path), key))
    agent_keys, agent = _agent_keys(opts.use_agent and not target.identities_only)
    candidates += [(f"agent key {k.fingerprint}", k) for k in agent_keys]
    if not target.identity_files:
        for name in DEFAULT_IDENTITIES:
            p = Path(name).expanduser()
            if p.exists():
                key = _load_key(p, notes)
                if key is not None:
                    candidates.append((str(p), key))
    tried: list[str] = []
    seen: set[bytes] = set()
    allowed: list[str] | None = None
    try:
        for label, key in candidates:
            if key.asbytes() in seen:
                continue
            seen.add(key.asbytes())
            try:
                t.auth_publickey(target.user, key)
            except paramiko.BadAuthenticationType as e:
                allowed = list(e.allowed_types)
                break
            except paramiko.AuthenticationException:
                tried.append(label)
                continue
            if t.is_authenticated():
                return
            tried.append(label + " (partial)")
        if not candidates and allowed is None:
            with contextlib.suppress(paramiko.BadAuthenticationType):
                t.auth_none(target.user)
                if t.is_authenticated():
                    return
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise ConnectError(
            f"connection to {target.hostname} broke during authentication: {e or 'closed'}"
        ) from None
    finally:
        if agent is not None:
            agent.close()
    what = ", ".join(tried) if tried else "no keys (no -i, IdentityFile, agent or ~/.ssh/id_*)"
    extra = f"; {'; '.join(notes)}" if notes else ""
    methods = f"; server allows: {','.join(allowed)}" if allowed else ""
    raise AuthError(
        f"authentication as {target.user}@{target.hostname} failed: tried publickey with "
        f"{what}{extra}{methods}; pass -i KEY or load the key into ssh-agent"
    )
