"""A hostile storage host against encrypted images (docs/format.md "Security"): a ``serve``
end that lies in its answers (the path it names, the generation number it will give, the
generation it says it committed), crafted key material, and the careless user. Each lie is
either refused or harmless; tests/test_encryption.py has the scheme's own tests."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.imagetools import publish_forged

from diskrsync.base.errors import DataError, LocalError, PeerError, ReadError, UsageError
from diskrsync.cli.keys import PASSPHRASE_ENV, passphrase_source
from diskrsync.compression.crypto import Envelope, KdfParams, Keyring, MasterKey, _json_check
from diskrsync.compression.format import GenTable
from diskrsync.compression.image import Image
from diskrsync.compression.sources import open_source
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import channel_pair
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import PushStats, SourceOptions, SourceSession
from diskrsync.synccore.target import TargetOptions, WireStore, open_store, serve_target

FAST = KdfParams(1024, 1, 1)
PASS = b"correct horse battery"
CS = 16 * 1024
SECRET_TEXT = b"top secret payroll line\n"
HOST = "backup@storage.example"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("DISKRSYNC_STATE_DIR", str(d))
    return d


def ring() -> Keyring:
    return Keyring(lambda why, new: PASS)


def disk(path: Path, chunks: int = 8, change: int = 0) -> None:
    """Text chunks (the secret), one of them varied by ``change``."""
    data = bytearray((SECRET_TEXT * (chunks * CS // len(SECRET_TEXT) + 1))[: chunks * CS])
    data[CS + 5] = change
    path.write_bytes(data)


Tamper = Callable[[dict[str, Any]], None]


def remote_push(src: Path, img: Path, *, encrypt: bool = False, hello: Tamper | None = None,
                committed: Callable[[p.Committed], p.Committed] | None = None,
                requested: str | None = None, heard: list[Any] | None = None,
                reader_hook: Callable[[Any], None] | None = None) -> PushStats:
    """A push to ``HOST`` as ``remote._push`` makes it (the client names the host and the
    path it asked for), through a serve end that changes its Hello's info with ``hello``
    and its Committed with ``committed`` before they go out; ``heard`` collects the errors
    the source tells it, ``reader_hook`` may change the source reader."""
    a, b = channel_pair()
    failure: list[BaseException] = []

    class Lying:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def send(self, msg: p.Message) -> None:
            if isinstance(msg, p.Committed) and committed is not None:
                msg = committed(msg)
            self.inner.send(msg)

        def recv(self) -> p.Message | None:
            msg = self.inner.recv()
            if isinstance(msg, p.Error | p.Done | p.Hello) and heard is not None:
                heard.append(msg)
            return msg

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    class Wire:
        """The source's end: what it receives is decoded from bytes, as over SSH (the
        in-process pair passes objects, unchecked)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def recv(self) -> p.Message | None:
            msg = self.inner.recv()
            if msg is None:
                return None
            d = p.Decoder()
            d.feed(p.preamble() + p.encode(msg))
            return d.next()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    def opener(h: p.Hello) -> WireStore:
        ws = open_store(str(img), h, TargetOptions(), raw=False)
        if hello is not None:
            hello(ws.info)
        return ws

    def target() -> None:
        try:
            serve_target(Lying(b), opener, verify=True)
        except BaseException as e:
            failure.append(e)
            with contextlib.suppress(Exception):
                while b.recv() is not None:
                    pass

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    reader = open_source(str(src), None, ring())
    if reader_hook is not None:
        reader_hook(reader)
    opts = SourceOptions(chunk_size=CS, keyring=ring(), encrypt=encrypt, kdf=FAST,
                         info={"name": src.name}, host=HOST,
                         target=requested if requested is not None else str(img))
    try:
        return SourceSession(Wire(a), reader, opts).run()
    finally:
        reader.close()
        thread.join(60)


def gone_plain(img: Path) -> bool:
    return not img.exists() or SECRET_TEXT not in img.read_bytes()


# -- the place a client remembers is its own, not what the host names ----------------------


@pytest.mark.inproc
@pytest.mark.parametrize("lie", ["another path", "no path"])
def test_a_host_naming_another_place_gets_no_plaintext(tmp_path: Path, lie: str) -> None:
    """After an encrypted push, the host removes the image and answers the next push with
    another path (or none): the client's memory of where it pushed encrypted must not hang
    on the host's word. (It did: the place was the path the host named, so the next push
    sent the whole disk in plain.)"""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    img.unlink()

    def rename(info: dict[str, Any]) -> None:
        if lie == "no path":
            del info["path"]
        else:
            info["path"] = "/srv/somewhere-else.spgz"

    with pytest.raises(DataError, match="was an encrypted image"):
        remote_push(src, img, hello=rename)
    assert gone_plain(img)


@pytest.mark.inproc
def test_a_host_naming_another_place_cannot_roll_back(tmp_path: Path) -> None:
    """The host serves an older copy and names another path, so that the client's memory
    of the newest generation does not apply: it still does."""
    src, img, old = tmp_path / "disk.img", tmp_path / "b.spgz", tmp_path / "old.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    old.write_bytes(img.read_bytes())
    disk(src, change=1)
    assert remote_push(src, img).generation == 2
    img.write_bytes(old.read_bytes())
    disk(src, change=2)
    with pytest.raises(DataError, match="rolled back"):
        remote_push(src, img, hello=lambda info: info.update(path="/srv/fresh.spgz"))


@pytest.mark.inproc
def test_pushes_of_two_disks_into_one_directory_keep_apart(tmp_path: Path) -> None:
    """The client's own place includes the source's name (a directory target names the
    image after it): a plain push of another disk into the same directory is not refused."""
    d = tmp_path / "dir"
    d.mkdir()
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    disk(a)
    disk(b)
    remote_push(a, d / "a.spgz", encrypt=True, requested=f"{d}/")
    assert remote_push(b, d / "b.spgz", requested=f"{d}/").generation == 1


# -- the generation number the host promises, and the one it reports ----------------------


def _newest(img: Path) -> int:
    with Image.open(str(img), keyring=ring()) as opened:
        return opened.generations()[-1].number


@pytest.mark.inproc
@pytest.mark.parametrize("delta", [0, -1])
def test_a_host_cannot_have_a_push_sealed_under_a_number_it_holds(tmp_path: Path,
                                                                  delta: int) -> None:
    """``next_generation`` no greater than the newest generation would make the client
    seal a second record for a number the host already holds a seal of: the host could then
    serve either, and drop the push without the client's memory noticing (it keeps the
    first root it saw for a number). Refused before anything is sent."""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    disk(src, change=1)
    remote_push(src, img)
    disk(src, change=2)
    with pytest.raises(PeerError, match="next generation"):
        remote_push(src, img, hello=lambda info: info.update(
            next_generation=info["newest"]["number"] + delta))
    assert _newest(img) == 2


@pytest.mark.inproc
def test_a_host_reporting_another_generation_number_is_refused(tmp_path: Path) -> None:
    """The generation the host says it committed must be the one the client sealed."""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    disk(src, change=1)
    with pytest.raises(PeerError, match="generation"):
        remote_push(src, img, committed=lambda c: p.Committed(c.generation + 1000, c.root,
                                                              c.info))


# -- what the source tells an encrypted target's host when it stops ------------------------


@pytest.mark.inproc
def test_a_failing_source_does_not_tell_the_host_its_path(tmp_path: Path) -> None:
    """The source's path is kept from the host of an encrypted image (it travels sealed);
    an error the source stops with must not carry it there either. (It did: a read error
    of ``/dev/disk/by-id/...`` was relayed word for word.)"""
    src, img = tmp_path / "secret-project-disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)

    def failing(reader: Any) -> None:
        def read(offset: int, length: int) -> bytes:
            raise ReadError(reader.description, offset, errno.EIO)
        reader.read = read

    heard: list[Any] = []
    with pytest.raises(LocalError, match="secret-project"):  # the user is told, of course
        remote_push(src, img, heard=heard, reader_hook=failing)
    errors = [m for m in heard if isinstance(m, p.Error)]
    assert errors and all("secret-project" not in e.message for e in errors), errors


# -- key material a host crafts --------------------------------------------------------------


def _envelope_with_kdf(memory_kib: int, iterations: int, lanes: int) -> dict[str, Any]:
    """A well-formed envelope (valid checksum: it is not keyed) asking for this KDF cost."""
    doc = Envelope.wrap(MasterKey.generate(), PASS, FAST).to_json()
    doc["kdf"] = {"name": "argon2id", "memory_kib": memory_kib, "iterations": iterations,
                  "lanes": lanes}
    del doc["check"]
    doc["check"] = _json_check(doc)
    return doc


@pytest.mark.pure
@pytest.mark.parametrize("cost", [(4 << 20, 64, 64), (2 << 20, 64, 4), (1 << 20, 64, 64)])
def test_a_host_cannot_make_the_client_spend_minutes_and_gigabytes_on_its_kdf(
        cost: tuple[int, int, int]) -> None:
    """The envelope's KDF parameters come from the host (its checksum is public): the
    client refuses a cost far beyond what diskrsync makes (64 MiB, 3 passes, 4 lanes)
    before running Argon2id, instead of allocating up to 4 GiB and making 64 passes over
    it (minutes per open, on every command) only to report a wrong passphrase."""
    with pytest.raises(DataError, match="impossible KDF parameters"):
        Envelope.from_json(_envelope_with_kdf(*cost))


@pytest.mark.pure
def test_the_strongest_sensible_kdf_costs_are_still_accepted() -> None:
    """RFC 9106's first recommendation (2 GiB, 1 pass) and a few times the default are
    ordinary choices."""
    for cost in ((2 << 20, 1, 4), (256 * 1024, 6, 8), (64 * 1024, 3, 4), (1024, 1, 1)):
        assert Envelope.from_json(_envelope_with_kdf(*cost)).kdf == KdfParams(*cost)


# -- a generation record pointing at another tree --------------------------------------------


def _publish_forged(image: Path, forge: Callable[[GenTable], GenTable]) -> None:
    publish_forged(str(image), forge)


@pytest.mark.inproc
def test_a_generation_pointed_at_an_older_tree_is_refused(tmp_path: Path) -> None:
    """The host keeps generation 2's number, root hash and seal, and points its tree at
    generation 1's: the seal still opens (it binds the root, which did not change), so the
    reader must check that the root is the tree's. (It did not: generation 1's data was
    served as generation 2, a silent rollback of the contents.)"""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    disk(src, change=1)
    remote_push(src, img)
    _publish_forged(img, lambda t: replace(t, generations=(
        t.generations[0], replace(t.generations[1], tree=t.generations[0].tree))))
    with pytest.raises(DataError, match="generation 2 does not authenticate") as e:
        Image.open(str(img), keyring=ring())
    assert e.value.exit_code == 6


@pytest.mark.inproc
def test_an_encrypted_image_file_does_not_name_the_client(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the file is all a host may see: the writer note of a local write (a push,
    convert, key change) must not carry the client's host name. (It did, in plain.)"""
    monkeypatch.setattr(socket, "gethostname", lambda: "payroll-server-17")
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    disk(src, change=1)
    remote_push(src, img)
    assert b"payroll-server-17" not in img.read_bytes()


@pytest.mark.inproc
def test_the_client_state_is_readable_by_its_owner_only(tmp_path: Path, state_dir: Path) -> None:
    """The seen-generations state names every host and path this client pushes encrypted
    to: its files are 0600 even in a directory that already existed with a looser mode.
    (They were 0644, by the umask.)"""
    state_dir.mkdir(mode=0o755)
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    files = list(state_dir.iterdir())
    assert files and all(f.stat().st_mode & 0o077 == 0 for f in files), \
        [oct(f.stat().st_mode) for f in files]


# -- the careless user's passphrases -------------------------------------------------------


@pytest.mark.inproc
def test_a_passphrase_file_with_windows_line_ends_is_the_typed_passphrase(
        tmp_path: Path) -> None:
    """A passphrase file saved with CRLF gives the passphrase a user types at the prompt,
    not one with a carriage return at its end that no prompt can reproduce. (It kept the
    \\r: the key was wrapped with a passphrase nobody could type.)"""
    pw = tmp_path / "pw"
    pw.write_bytes(b"correct horse battery\r\n")
    assert passphrase_source(str(pw))("an image", False) == b"correct horse battery"


@pytest.mark.inproc
@pytest.mark.parametrize("where", ["file", "environment"])
def test_a_new_key_is_never_wrapped_with_a_short_passphrase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The prompt refuses a new passphrase under 8 characters; a passphrase file or
    $DISKRSYNC_PASSPHRASE did not (an image's key wrapped with "x", guessed offline at
    once), while an existing key still opens with whatever it was wrapped with."""
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    if where == "environment":
        monkeypatch.setenv(PASSPHRASE_ENV, "x")
    source = passphrase_source(str(pw) if where == "file" else None)
    with pytest.raises(UsageError, match="at least 8 characters"):
        source("a new encryption key", True)
    assert passphrase_source(str(pw) if where == "file" else None)("an image", False) == b"x"


@pytest.mark.inproc
def test_an_unlocked_image_shows_the_sealed_times_not_the_hosts(tmp_path: Path) -> None:
    """The table's time of a generation is the host's word (the serve end's clock, or what
    it wrote there): with the key, generations and snapshots (the mount's generation
    directory names and file times, restore) carry the time the client sealed. (They showed
    the table's: a host could date a generation taken after an infection before it.)"""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    disk(src, change=1)
    remote_push(src, img)
    with Image.open(str(img), keyring=ring()) as opened:
        honest = [g.commit_time for g in opened.generations()]
    _publish_forged(img, lambda t: replace(t, generations=tuple(
        replace(r, time=86400.0 * r.number) for r in t.generations)))
    with Image.open(str(img), keyring=ring()) as opened:
        assert [g.commit_time for g in opened.generations()] == honest
        with opened.snapshot(1) as snap:
            assert snap.info.commit_time == honest[0]


@pytest.mark.process
def test_info_without_the_key_on_a_terminal(tmp_path: Path) -> None:
    """The user guide says `info` shows an encrypted image without a passphrase; on a
    terminal it always asked for one (an empty answer: 'wrong passphrase'), as `verify`
    did before its --no-key. `info --no-key` shows the structure and asks nothing."""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    res = subprocess.run([sys.executable, "-m", "diskrsync.cli", "info", "--no-key", str(img)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                         env=dict(env, PYTHONSAFEPATH="1"))
    assert res.returncode == 0, res.stderr
    assert "(encrypted)" in res.stdout and str(src) not in res.stdout


@pytest.mark.inproc
def test_a_long_lived_reader_notices_a_rollback_on_refresh(tmp_path: Path) -> None:
    """The mount re-reads its image every few seconds: a host dropping the newest
    generation (or swapping the file) under it must be refused as an open refuses it, not
    shown as a generation that left, as if pruned. (refresh() checked nothing.)"""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    disk(src, change=1)
    remote_push(src, img)
    with Image.open(str(img), keyring=ring()) as opened:
        _publish_forged(img, lambda t: replace(t, generations=t.generations[:-1]))
        with pytest.raises(DataError, match="rolled back"):
            opened.refresh()
        assert [g.number for g in opened.generations()] == [1, 2]


@pytest.mark.inproc
@pytest.mark.parametrize("lie", ["next_generation", "newest"])
def test_a_host_giving_numbers_beyond_64_bits_gets_a_peer_error(tmp_path: Path,
                                                                  lie: str) -> None:
    """Generation numbers are u64 in every seal: a number the host makes larger is its
    error (exit 5), not a crash of the client (struct.error escaped as a traceback)."""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)

    def huge(info: dict[str, Any]) -> None:
        if lie == "newest":
            info["newest"]["number"] = 1 << 70
        info["next_generation"] = (1 << 70) + 1

    with pytest.raises((PeerError, DataError)):
        remote_push(src, img, hello=huge)


@pytest.mark.inproc
def test_a_first_encrypted_push_that_fails_still_marks_the_place(tmp_path: Path) -> None:
    """The first `push --encrypt` breaks off (a read error, a lost link); the host removes
    what arrived, and the user's next push forgets --encrypt: the place was encrypted as soon
    as the target opened an encrypted image with this client's key, so no plaintext goes
    there. (It was remembered only after a commit.)"""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)

    def failing(reader: Any) -> None:
        def read(offset: int, length: int) -> bytes:
            raise ReadError(reader.description, offset, errno.EIO)
        reader.read = read

    with pytest.raises(LocalError):
        remote_push(src, img, encrypt=True, reader_hook=failing)
    img.unlink(missing_ok=True)
    with pytest.raises(DataError, match="was an encrypted image"):
        remote_push(src, img)
    assert gone_plain(img)


@pytest.mark.inproc
def test_an_encrypted_image_pushed_on_to_a_host_answering_plain_sends_no_plaintext(
        tmp_path: Path) -> None:
    """Pushing an encrypted image on (an offsite copy) asks the target to create the copy
    with the image's key; a host that answers as a plain target must be refused as it is
    for `push --encrypt`. (It was not: the source decoded its chunks and sent them in
    plain, since the refusal looked only at --encrypt.)"""
    src, img, copy = tmp_path / "disk.img", tmp_path / "b.spgz", tmp_path / "offsite.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)

    def strip(info: dict[str, Any]) -> None:
        for name in ("encryption", "next_generation", "newest"):
            info.pop(name, None)

    with pytest.raises(PeerError, match="did not create an encrypted image"):
        remote_push(img, copy, hello=strip)
    assert gone_plain(copy)


@pytest.mark.inproc
def test_a_plain_image_in_place_of_an_encrypted_one_is_not_read_as_the_backup(
        tmp_path: Path) -> None:
    """The file holder replaces an encrypted image by a plain one of its own making: a
    client that knows the path as encrypted (it pushed or opened it with the key) must not
    restore, mount or push on the host's data as its backup. (Reads took it: only pushes
    into the path were checked.)"""
    src, img, forged = tmp_path / "disk.img", tmp_path / "b.spgz", tmp_path / "forged.spgz"
    disk(src)
    remote_push(src, img, encrypt=True)
    with Image.open(str(img), keyring=ring()):
        pass
    evil = tmp_path / "evil.img"
    evil.write_bytes(b"attacker's data".ljust(8 * CS, b"!"))
    remote_push(evil, forged, requested=str(forged))
    img.write_bytes(forged.read_bytes())
    with pytest.raises(DataError, match="was an encrypted image"):
        Image.open(str(img), keyring=ring())
    with pytest.raises(DataError, match="was an encrypted image"):
        open_source(str(img), None, ring())


@pytest.mark.inproc
def test_two_encrypted_images_swapped_by_the_host_are_refused(tmp_path: Path) -> None:
    """Two backups of this client (one passphrase, two keys), swapped by the host: each
    opens with the passphrase and each has valid seals, so without a check a restore of
    web1 serves web2's disk, and a push to web1 goes into web2. The client remembers which
    key each path had."""
    a, b = tmp_path / "web1.img", tmp_path / "web2.img"
    ia, ib = tmp_path / "web1.spgz", tmp_path / "web2.spgz"
    disk(a)
    disk(b, change=7)
    remote_push(a, ia, encrypt=True)
    remote_push(b, ib, encrypt=True)
    for img in (ia, ib):
        with Image.open(str(img), keyring=ring()):
            pass
    one, two = ia.read_bytes(), ib.read_bytes()
    ia.write_bytes(two)
    ib.write_bytes(one)
    with pytest.raises(DataError, match="another key"):
        Image.open(str(ia), keyring=ring())
    with pytest.raises(DataError, match="another key"):
        remote_push(a, ia)
    # a new key made for the place on purpose is this client's own: accepted
    ia.unlink()
    opts = SourceOptions(chunk_size=CS, keyring=ring(), encrypt=True, kdf=FAST)
    assert local_push(str(a), str(ia), PushRequest(source=opts)).generation == 1
    with Image.open(str(ia), keyring=ring()):
        pass


@pytest.mark.inproc
def test_an_encrypted_push_tells_the_host_nothing_in_done_but_the_seal(tmp_path: Path) -> None:
    """Done's info towards an encrypted target is the seal and nothing else: what a push
    records about a generation (read errors, counts, and whatever later releases add, e.g.
    the changed-block map a push used) goes inside the seal, never beside it."""
    src, img = tmp_path / "secret-project-disk.img", tmp_path / "b.spgz"
    disk(src)
    heard: list[Any] = []
    remote_push(src, img, encrypt=True, heard=heard)
    done = [m for m in heard if isinstance(m, p.Done)]
    assert len(done) == 1 and set(done[0].info) <= {"seal", "dry_run", "new_generation"}, \
        done[0].info
    hello = [m for m in heard if isinstance(m, p.Hello)]
    assert "secret-project" not in json.dumps(hello[0].info).replace(src.name, "")


@pytest.mark.process
def test_convert_encrypt_with_a_key_file_copies_every_generation(tmp_path: Path) -> None:
    """`convert --encrypt --key-file OLD-KEY OLD NEW`: the key file opens OLD; the new
    image opens with its own copy. (The key file was applied to the new image too, so the
    second generation failed: 'the key file holds key …, but the target image is …'.)"""
    src, img, new, key = (tmp_path / "disk.img", tmp_path / "b.spgz", tmp_path / "new.spgz",
                          tmp_path / "key.json")
    disk(src)
    remote_push(src, img, encrypt=True)
    disk(src, change=1)
    remote_push(src, img)
    pw = tmp_path / "pw"
    pw.write_bytes(PASS + b"\n")
    env = dict(os.environ, PYTHONSAFEPATH="1", DISKRSYNC_KDF="1024,1,1")

    def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "diskrsync.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, env=env)

    assert cli("key", "export", "--passphrase-file", pw, img, key).returncode == 0
    res = cli("convert", "--encrypt", "--key-file", key, "--passphrase-file", pw, img, new)
    assert res.returncode == 0, res.stderr
    with Image.open(str(new), keyring=ring()) as opened:
        assert [g.number for g in opened.generations()] == [1, 2]


@pytest.mark.inproc
def test_a_commit_reported_as_the_unchanged_newest_generation_is_accepted(
        tmp_path: Path) -> None:
    """A target may keep a run whose disk equals its newest generation in that generation
    (no new number): the client accepts that report only when the root is the newest one
    it authenticated (the disk is exactly that generation), and any other number not."""
    src, img = tmp_path / "disk.img", tmp_path / "b.spgz"
    disk(src)
    first = remote_push(src, img, encrypt=True)
    stats = remote_push(src, img, committed=lambda c: p.Committed(1, c.root, c.info))
    assert stats.generation == 1 and stats.root_hash == first.root_hash
