"""Keys of encrypted images: where passphrases come from, and `diskrsync key ...`.

A passphrase is taken, in this order, from ``--passphrase-file``, from the
``DISKRSYNC_PASSPHRASE`` environment variable, or from a prompt on the terminal; it is asked
for only when an encrypted image is actually opened, and once per command. ``--key-file``
names an exported key to use instead of the copy inside the image. The `diskrsync key`
commands are in ``keycmds``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable

from diskrsync.base.errors import DataError, UsageError, from_oserror
from diskrsync.compression.crypto import Envelope, KdfParams, Keyring

PASSPHRASE_ENV = "DISKRSYNC_PASSPHRASE"
NEW_PASSPHRASE_ENV = "DISKRSYNC_NEW_PASSPHRASE"
#: testing aid: "MEMORY_KIB,ITERATIONS,LANES" for new keys (the default costs ~0.35 s)
KDF_ENV = "DISKRSYNC_KDF"
MIN_NEW_PASSPHRASE = 8  # characters (bytes) of a passphrase a new key is wrapped with
LOSS_WARNING = ("without the key the backup is unreadable: keep the passphrase, and export "
                "the key now (`diskrsync key export IMAGE FILE`) to a place other than the "
                "backup host")
REPO_LOSS_WARNING = ("without the key the repository is unreadable: keep the passphrase, and "
                     "export the key now (`diskrsync key export REPOSITORY FILE`) to a place "
                     "other than the repository's store")


def _read_first_line(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            line = f.read(65536).split(b"\n", 1)[0]
    except OSError as e:
        raise from_oserror(e, f"cannot read the passphrase file {path}") from None
    line = line.removesuffix(b"\r")  # a file saved with Windows line ends
    if not line:
        raise UsageError(f"the passphrase file {path} is empty")
    return line


def _prompt(why: str, new: bool) -> bytes:
    try:
        tty = open("/dev/tty")  # noqa: SIM115 - only to test that there is one
        tty.close()
    except OSError:
        raise UsageError(f"{why}: give its passphrase with --passphrase-file or "
                         f"${PASSPHRASE_ENV} (there is no terminal to ask on)") from None
    first = getpass.getpass(f"{why}; passphrase: ").encode()
    if new:
        _check_new(first)
        if getpass.getpass("the same passphrase again: ").encode() != first:
            raise UsageError("the two passphrases differ")
        print(f"diskrsync: {LOSS_WARNING}", file=sys.stderr)
    return first


def _check_new(passphrase: bytes) -> None:
    if len(passphrase) < MIN_NEW_PASSPHRASE:
        raise UsageError(f"the passphrase must have at least {MIN_NEW_PASSPHRASE} characters")


def passphrase_source(file: str | None,
                      env: str = PASSPHRASE_ENV) -> Callable[[str, bool], bytes]:
    """A ``passphrase(why, new)`` function over the three sources, asking at most once."""
    cache: list[bytes] = []

    def get(why: str, new: bool) -> bytes:
        if not cache:
            if file:
                cache.append(_read_first_line(file))
            elif os.environ.get(env):
                cache.append(os.environ[env].encode())
            else:
                cache.append(_prompt(why, new))
            if new:  # a new key's passphrase, from wherever it comes
                _check_new(cache[0])
        return cache[0]

    return get


def read_key_file(path: str) -> Envelope:
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024)
    except OSError as e:
        raise from_oserror(e, f"cannot read the key file {path}") from None
    return Envelope.decode(raw)


def _have_terminal() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        return False
    return True


def keyring(args: argparse.Namespace) -> Keyring:
    """The keyring of a command's ``--passphrase-file``/``--key-file`` options."""
    key_file = getattr(args, "key_file", None)
    return Keyring(passphrase_source(getattr(args, "passphrase_file", None)),
                   read_key_file(key_file) if key_file else None)


def optional_keyring(args: argparse.Namespace) -> Keyring | None:
    """For info and verify: None when no passphrase can be had at all (no file, no
    environment variable, no terminal), so an encrypted image is opened without its key and
    shown or checked as far as that allows."""
    if getattr(args, "key_file", None) or getattr(args, "passphrase_file", None) \
            or os.environ.get(PASSPHRASE_ENV) or _have_terminal():
        return keyring(args)
    return None


def kdf_params() -> KdfParams | None:
    text = os.environ.get(KDF_ENV)
    if not text:
        return None
    try:
        m, t, p = (int(x) for x in text.split(","))
        params = KdfParams(m, t, p)
        params.check()
    except (ValueError, DataError):
        raise UsageError(f"{KDF_ENV} must be MEMORY_KIB,ITERATIONS,LANES, not {text!r}") \
            from None
    return params
