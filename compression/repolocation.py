"""Where a repository and a disk in it are named on the command line (docs/repository.md,
"Naming a repository"): ``s3://BUCKET[/PREFIX][#DISK]`` or ``repo:DIR[#DISK]``.

A local repository needs the ``repo:`` prefix: a plain ``DIR#DISK`` would read as an image
path that happens to contain ``#``, and every command already gives plain paths that meaning.
Both forms are URL-like, so ``synccore.location`` keeps them local (this machine talks to the
store) instead of taking ``repo`` for an SSH host.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from diskrsync.base.errors import UsageError
from diskrsync.compression.crypto import Envelope, KdfParams, Keyring, MasterKey
from diskrsync.compression.objstore import DirStore, ObjectStore, S3Options, S3Store
from diskrsync.compression.repository import Repository, check_disk_name

S3_PREFIX = "s3://"
DIR_PREFIX = "repo:"


@dataclass(frozen=True)
class RepoLocation:
    """A repository (``store``: ``s3://bucket/prefix`` or a directory) and maybe a disk."""

    store: str
    disk: str | None
    text: str  # as the user wrote it, for messages

    @property
    def is_s3(self) -> bool:
        return self.store.startswith(S3_PREFIX)

    def need_disk(self, what: str) -> str:
        if self.disk is None:
            raise UsageError(f"{what} needs a disk in the repository: {self.text}#DISK")
        return self.disk


def is_repo_location(text: str) -> bool:
    return text.startswith((S3_PREFIX, DIR_PREFIX))


def parse_repo_location(text: str) -> RepoLocation | None:
    """``text`` as a repository location, or None when it names something else (an image,
    a device, a remote path)."""
    if not is_repo_location(text):
        return None
    if text.startswith(S3_PREFIX):
        base, sep, disk = text.partition("#")
        bucket = base[len(S3_PREFIX):].split("/", 1)[0]
        if not bucket:
            raise UsageError(f"{text}: no bucket (s3://BUCKET[/PREFIX][#DISK])")
    else:
        base, sep, disk = text[len(DIR_PREFIX):].rpartition("#") if "#" in text \
            else (text[len(DIR_PREFIX):], "", "")
        if not base:
            raise UsageError(f"{text}: no directory (repo:DIR[#DISK])")
    if sep and not disk:
        raise UsageError(f"{text}: empty disk name after '#'")
    return RepoLocation(base, check_disk_name(disk) if disk else None, text)


def open_store(loc: RepoLocation, s3: S3Options | None = None, *,
               create: bool = False) -> ObjectStore:
    """The object store of ``loc``; with ``create`` a missing repository directory is made
    (its parent must exist: a typo should not build a tree)."""
    if loc.is_s3:
        bucket, _, prefix = loc.store[len(S3_PREFIX):].partition("/")
        return S3Store(bucket, prefix, s3)
    if create:
        try:
            os.mkdir(loc.store)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise UsageError(f"{loc.store}: its parent directory does not exist") from None
            raise UsageError(f"cannot create the repository directory {loc.store}: "
                             f"{e.strerror}") from None
    return DirStore(loc.store)


def open_repository(loc: RepoLocation, *, keyring: Keyring | None = None,
                    s3: S3Options | None = None, create: bool = False,
                    encrypt: bool = False, kdf: KdfParams | None = None) -> Repository:
    """The repository at ``loc``. With ``create`` (a push or copy into it), an empty store
    becomes a new repository: plain, or with ``encrypt`` encrypted with a new key wrapped
    by the keyring's passphrase (asked for as a new one)."""
    store = open_store(loc, s3, create=create)
    if create:
        store.check()
        if store.head("config") is None:
            if any(True for _ in store.list("")):
                raise UsageError(f"{loc.store} is not empty and holds no repository (no "
                                 f"config): refusing to create one among other files")
            if not encrypt:
                return Repository.init(store)
            if keyring is None:
                raise UsageError("--encrypt needs a passphrase source")
            key = MasterKey.generate()
            envelope = Envelope.wrap(key, keyring.passphrase("a new encryption key", new=True),
                                     kdf)
            keyring.add(key)
            return Repository.init(store, key=key, envelope=envelope)
    repo = Repository.open(store, keyring)
    if encrypt and repo.config.encryption is None:
        raise UsageError(f"{loc.store} is a plain repository: --encrypt makes a new one "
                         f"encrypted (copy into a new repository to encrypt this one)")
    return repo
