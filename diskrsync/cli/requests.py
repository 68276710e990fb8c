"""From parsed arguments to the typed requests the engines take (they never see argparse)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from diskrsync.base.errors import UsageError
from diskrsync.base.retention import Retention
from diskrsync.cli.keys import kdf_params, keyring
from diskrsync.compression.format import DEFAULT_CHUNK
from diskrsync.compression.image import DEFAULT_KEEP
from diskrsync.compression.objstore import S3Options
from diskrsync.synccore.protocol import DEFAULT_MAX_SIZE
from diskrsync.synccore.push import PushRequest
from diskrsync.synccore.source import SourceOptions
from diskrsync.synccore.ssh.config import (
    DEFAULT_SSH_CONFIG,
    SYSTEM_SSH_CONFIG,
    RemoteOptions,
    SshOptions,
)
from diskrsync.synccore.target import TargetOptions

#: Testing aid: "INTERVAL,COUNT" overrides the keepalive watchdog (default 15 s x 4), so a
#: test can show a silent link is detected without waiting a minute.
KEEPALIVE_ENV = "DISKRSYNC_SSH_KEEPALIVE"
#: The longest --label (a generation's source description).
MAX_LABEL = 256


#: The --keep-* options: Retention field -> argparse dest.
RETENTION_DESTS = {"last": "keep", "hourly": "keep_hourly", "daily": "keep_daily",
                   "weekly": "keep_weekly", "monthly": "keep_monthly",
                   "yearly": "keep_yearly", "within": "keep_within"}


def retention(args: argparse.Namespace) -> Retention | None:
    """The --keep-* options as a policy; None when none is given."""
    given = {f: getattr(args, d, None) for f, d in RETENTION_DESTS.items()}
    if all(v is None for v in given.values()):
        return None
    if given["last"] is not None and given["last"] < 1:
        raise UsageError("--keep must be at least 1")
    for f, v in given.items():
        if v is not None and v < 0:
            raise UsageError(f"--keep-{f} must not be negative")
    return Retention(**{f: v for f, v in given.items() if v is not None})


def set_retention(args: argparse.Namespace, policy: Retention) -> None:
    """Write ``policy`` back as the --keep-* options (what ``retention`` reads)."""
    for f, d in RETENTION_DESTS.items():
        setattr(args, d, getattr(policy, f) or None)


def push_request(args: argparse.Namespace) -> PushRequest:
    """The push/serve options as a PushRequest."""

    limit = DEFAULT_MAX_SIZE if args.max_size is None else args.max_size
    label = getattr(args, "label", None)
    if label is not None and (not label.strip() or len(label) > MAX_LABEL
                              or not label.isprintable()):
        raise UsageError(f"--label must be 1-{MAX_LABEL} printable characters")
    target = TargetOptions(keep=retention(args) or Retention(last=DEFAULT_KEEP),
                           dry_run=args.dry_run, max_size=limit,
                           always_new_generation=getattr(args, "always_new_generation", False))
    if getattr(args, "checkpoint_interval", None):
        target = replace(target, checkpoint_bytes=args.checkpoint_interval)
    return PushRequest(
        source=SourceOptions(chunk_size=args.chunk_size or DEFAULT_CHUNK,
                             dry_run=args.dry_run,
                             ignore_read_errors=getattr(args, "ignore_read_errors", False),
                             keyring=keyring(args) if hasattr(args, "passphrase_file") else None,
                             encrypt=getattr(args, "encrypt", False), kdf=kdf_params(),
                             label=label or "",
                             skip_free_blocks=getattr(args, "skip_free_blocks", False)),
        target=target,
        raw_target=args.no_compress,
        generation=getattr(args, "generation", None),
        dirty_bitmap=getattr(args, "dirty_bitmap", None),
        qmp=getattr(args, "qmp", None),
        bwlimit=getattr(args, "bwlimit", 0.0) or 0.0,
        s3=s3_options(args),
    )


def s3_options(args: argparse.Namespace) -> S3Options:
    """--s3-endpoint and --s3-profile; what is not given, boto3 takes from the environment
    (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID...) as every AWS tool does."""
    return S3Options(endpoint=getattr(args, "s3_endpoint", None),
                     profile=getattr(args, "s3_profile", None))


# -- SSH options -------------------------------------------------------------------------------


def _keepalive() -> tuple[float, int] | None:
    text = os.environ.get(KEEPALIVE_ENV)
    if not text:
        return None
    try:
        interval_text, count_text = text.split(",")
        interval, count = float(interval_text), int(count_text)
    except ValueError:
        raise UsageError(f"{KEEPALIVE_ENV} must be INTERVAL,COUNT (e.g. 15,4), not {text!r}") \
            from None
    if interval <= 0 or count < 1:
        raise UsageError(f"{KEEPALIVE_ENV}: interval must be > 0 and count >= 1")
    return interval, count


def ssh_options(args: argparse.Namespace) -> tuple[SshOptions, list[str]]:
    """SshOptions from the CLI flags, plus the extra words of a multi-word ``--remote-cmd``
    (``sudo -n diskrsync``): the first word is the program, the rest lead its argv."""
    try:
        words = shlex.split(getattr(args, "remote_cmd", None) or "diskrsync")
    except ValueError as e:
        raise UsageError(f"bad --remote-cmd: {e}") from None
    if not words:
        raise UsageError("--remote-cmd is empty")
    config = getattr(args, "ssh_config", None)
    # as ssh: -F FILE replaces both the user's and the system's config; -F none reads none
    opts = SshOptions(
        identity_files=tuple(Path(i) for i in (getattr(args, "identity", None) or [])),
        ssh_config=(None if config == "none" else Path(config)) if config
        else DEFAULT_SSH_CONFIG,
        system_ssh_config=None if config else SYSTEM_SSH_CONFIG,
        accept_new_host_key=bool(getattr(args, "accept_new_host_key", False)),
        remote_cmd=words[0],
    )
    ka = _keepalive()
    if ka is not None:
        opts = replace(opts, keepalive_interval=ka[0], keepalive_count=ka[1])
    return opts, words[1:]


def remote_options(args: argparse.Namespace) -> RemoteOptions:
    """How to reach the far end and what to show, from push's flags. A Go remote is asked
    for progress lines only when a bar is shown: very old Go releases do not know
    ``--calc-progress``."""
    opts, extra = ssh_options(args)
    shown = not (getattr(args, "quiet", False) or getattr(args, "json", False))
    rsh_text = getattr(args, "rsh", None)
    try:
        rsh = shlex.split(rsh_text) if rsh_text is not None else []
    except ValueError as e:
        raise UsageError(f"bad --rsh: {e}") from None
    if rsh_text is not None and not rsh:
        raise UsageError("--rsh is empty")
    return RemoteOptions(ssh=opts, extra=tuple(extra), progress=shown,
                         remote_progress=shown and sys.stderr.isatty(),
                         timeout=getattr(args, "timeout", None), rsh=tuple(rsh))
