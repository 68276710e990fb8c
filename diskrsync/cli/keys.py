"""Keys of encrypted images: where passphrases come from, and `diskrsync key ...`.

A passphrase is taken, in this order, from ``--passphrase-file``, from the
``DISKRSYNC_PASSPHRASE`` environment variable, or from a prompt on the terminal; it is asked
for only when an encrypted image is actually opened, and once per command. ``--key-file``
names an exported key to use instead of the copy inside the image.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace

from diskrsync.base.errors import DataError, UsageError, from_oserror
from diskrsync.compression.crypto import Envelope, KdfParams, Keyring, SealedCodec
from diskrsync.compression.image import Image

PASSPHRASE_ENV = "DISKRSYNC_PASSPHRASE"
NEW_PASSPHRASE_ENV = "DISKRSYNC_NEW_PASSPHRASE"
#: testing aid: "MEMORY_KIB,ITERATIONS,LANES" for new keys (the default costs ~0.35 s)
KDF_ENV = "DISKRSYNC_KDF"
MIN_NEW_PASSPHRASE = 8  # characters (bytes) of a passphrase a new key is wrapped with
LOSS_WARNING = ("without the key the backup is unreadable: keep the passphrase, and export "
                "the key now (`diskrsync key export IMAGE FILE`) to a place other than the "
                "backup host")
REPO_LOSS_WARNING = ("without the key the repository is unreadable: its key is kept only in "
                     "the repository, wrapped by the passphrase; keep the passphrase")


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


# -- diskrsync key ... -----------------------------------------------------------------


def _open_encrypted(path: str, ring: Keyring | None) -> Image:
    img = Image.open(path, keyring=ring)
    if not img.encrypted:
        img.close()
        raise UsageError(f"{path} is not encrypted")
    return img


def cmd_key_export(args: argparse.Namespace) -> int:
    """Write the image's wrapped key (still protected by its passphrase) to FILE, once the
    passphrase has opened it and the key has opened the newest seal: an export is kept for
    the day the image's own copy is lost, too late to find that it never opened."""
    img = _open_encrypted(args.image, None)
    try:
        enc = img.table.encryption
        assert enc is not None
        if not enc.get("envelope"):
            raise UsageError(f"{args.image} holds no copy of its key (it was kept in a key file)")
        envelope = Envelope.from_json(enc["envelope"])
        ring = Keyring(passphrase_source(args.passphrase_file), None)
        _prove(img, SealedCodec(ring.unlock(envelope.key_id, envelope, args.image)))
    finally:
        img.close()
    data = envelope.encode()
    if args.file == "-":
        sys.stdout.write(data.decode())
        return 0
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.file} already exists") from None
    except OSError as e:
        raise from_oserror(e, f"cannot create {args.file}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    print(f"exported key {envelope.key_id.hex()} of {args.image} to {args.file} (protected by "
          f"the image's passphrase)")
    return 0


def cmd_key_import(args: argparse.Namespace) -> int:
    """Put an exported key back into the image (after its copy was damaged or removed)."""
    envelope = read_key_file(args.file)
    ring = Keyring(passphrase_source(args.passphrase_file), envelope)
    img = _open_encrypted(args.image, None)
    try:
        if img.key_id != envelope.key_id:
            raise UsageError(f"{args.file} holds key {envelope.key_id.hex()[:12]}…, but "
                             f"{args.image} is encrypted with key "
                             f"{(img.key_id or b'').hex()[:12]}…")
        key = ring.unlock(envelope.key_id, envelope, args.file)
        _prove(img, SealedCodec(key))
        _replace_envelope(img, envelope)
    finally:
        img.close()
    print(f"imported key {envelope.key_id.hex()} into {args.image}")
    return 0


def cmd_key_change_passphrase(args: argparse.Namespace) -> int:
    """Wrap the same key with a new passphrase (the data is not re-encrypted)."""
    ring = keyring(args)
    img = _open_encrypted(args.image, ring)
    try:
        assert img.key is not None
        new = passphrase_source(args.new_passphrase_file, NEW_PASSPHRASE_ENV)(
            "the new passphrase", True)
        _replace_envelope(img, Envelope.wrap(img.key, new, kdf_params()))
    finally:
        img.close()
    print(f"{args.image}: passphrase changed (export the key again: old exports still open "
          f"with the old passphrase)")
    return 0


def _prove(img: Image, codec: SealedCodec) -> None:
    """The key opens the image's newest seal: it is really this image's key."""
    gens = img.table.generations
    if gens:
        codec.open_seal(gens[-1].number, gens[-1].root_hash, gens[-1].seal)


def _replace_envelope(img: Image, envelope: Envelope) -> None:
    tx = img.begin(what="key change")
    try:
        table = tx.table
        assert table.encryption is not None
        tx.publish(replace(table, encryption={**table.encryption,
                                              "envelope": envelope.to_json()}))
    finally:
        tx.close()


def cmd_key_show(args: argparse.Namespace) -> int:
    """The public facts of an image's key (no passphrase needed)."""
    img = _open_encrypted(args.image, None)
    try:
        enc = img.table.encryption
        assert enc is not None
        env = enc.get("envelope")
        doc = {"key_id": enc["key_id"], "cipher": enc["cipher"],
               "key_in_image": bool(env), "kdf": env["kdf"] if env else None}
    finally:
        img.close()
    print(json.dumps(doc, indent=2))
    return 0
