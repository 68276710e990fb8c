"""`diskrsync key show|export|import|change-passphrase`: the key of an encrypted image, and
`show` and `export` of an encrypted repository's (its config is written once, so a
repository's envelope is not replaced in place: import and change-passphrase are for
images). Passphrase sources are in ``keys``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from diskrsync.base.errors import UsageError, from_oserror
from diskrsync.cli.keys import (
    NEW_PASSPHRASE_ENV,
    kdf_params,
    keyring,
    passphrase_source,
    read_key_file,
)
from diskrsync.cli.requests import s3_options
from diskrsync.compression.crypto import Envelope, Keyring, SealedCodec
from diskrsync.compression.image import Image
from diskrsync.compression.repolocation import RepoLocation, open_store, parse_repo_location
from diskrsync.compression.repository import Repository


def _open_encrypted(path: str, ring: Keyring | None) -> Image:
    img = Image.open(path, keyring=ring)
    if not img.encrypted:
        img.close()
        raise UsageError(f"{path} is not encrypted")
    return img


def _repo_encryption(loc: RepoLocation, args: argparse.Namespace) -> dict[str, Any]:
    config = Repository.read_config(open_store(loc, s3_options(args)))
    if config.encryption is None:
        raise UsageError(f"{loc.store} is not encrypted")
    return config.encryption


def _image_encryption(args: argparse.Namespace) -> dict[str, Any]:
    img = _open_encrypted(args.image, None)
    try:
        enc = img.table.encryption
        assert enc is not None
        return enc
    finally:
        img.close()


def _prove_repo(loc: RepoLocation, args: argparse.Namespace) -> None:
    """The passphrase opens the repository's key, and the key opens its newest manifest."""
    ring = Keyring(passphrase_source(args.passphrase_file), None)
    repo = Repository.open(open_store(loc, s3_options(args)), ring)
    for disk in repo.disks():
        gens = repo.generations(disk)
        if gens:
            repo.manifest(gens[-1])  # sealed: DataError if another key sealed it
            return


def cmd_key_export(args: argparse.Namespace) -> int:
    """Write the wrapped key (still protected by its passphrase) to FILE, once the
    passphrase has opened it and the key has opened the newest seal (a repository: a
    manifest): an export is kept for the day the image's own copy is lost, too late to find
    that it never opened."""
    loc = parse_repo_location(args.image)
    enc = _repo_encryption(loc, args) if loc is not None else _image_encryption(args)
    if not enc.get("envelope"):
        raise UsageError(f"{args.image} holds no copy of its key (it was kept in a key file)")
    envelope = Envelope.from_json(enc["envelope"])
    if loc is not None:
        _prove_repo(loc, args)
    else:
        img = _open_encrypted(args.image, None)
        try:
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
          f"its passphrase)")
    return 0
def _not_a_repository(path: str, action: str) -> None:
    loc = parse_repo_location(path)
    if loc is not None:
        raise UsageError(f"{loc.store}: a repository's key cannot be {action} (its config is "
                         f"written once; `diskrsync copy --encrypt` copies a disk into a new "
                         f"repository with a new key and passphrase)")


def cmd_key_import(args: argparse.Namespace) -> int:
    """Put an exported key back into the image (after its copy was damaged or removed)."""
    _not_a_repository(args.image, "imported")
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
    _not_a_repository(args.image, "wrapped again")
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
    """The public facts of an image's or a repository's key (no passphrase needed)."""
    loc = parse_repo_location(args.image)
    enc = _repo_encryption(loc, args) if loc is not None else _image_encryption(args)
    env = enc.get("envelope")
    doc = {"key_id": enc["key_id"], "cipher": enc["cipher"],
           "key_in_repository" if loc is not None else "key_in_image": bool(env),
           "kdf": env["kdf"] if env else None}
    print(json.dumps(doc, indent=2))
    return 0
