"""Encrypted images (compression/crypto.py, docs/format.md "Security"): keys and passphrases,
the encrypting codec, sealed generations, and the attacks a storage host can try: a flipped
bit, a swapped chunk, an old chunk replayed at a new place, a rolled-back or forged
generation table, damaged key material, a downgrade to plain. Each is detected, named with
chunk and offset where there is one, and never served."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.imagetools import publish_forged
from support.mounts import MountCleanup

from diskrsync.base.errors import CorruptChunkError, DataError, PeerError, UsageError
from diskrsync.base.merkle import zero_hash
from diskrsync.cli import jsonout
from diskrsync.compression import crypto as crypto_module
from diskrsync.compression import maintenance
from diskrsync.compression.codec import STANDARD, ChunkAt, Kind
from diskrsync.compression.crypto import (
    CHUNK_OVERHEAD,
    Envelope,
    KdfParams,
    Keyring,
    MasterKey,
    OpaqueCodec,
    SealedCodec,
    SeenGenerations,
)
from diskrsync.compression.format import DATA_START, WRITER_SLOT, GenTable
from diskrsync.compression.image import Image
from diskrsync.compression.sources import RawSource
from diskrsync.synccore import protocol as p
from diskrsync.synccore.channel import channel_pair
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions, SourceSession
from diskrsync.synccore.target import TargetOptions, WireStore, open_store, serve_target

FAST = KdfParams(1024, 1, 1)  # Argon2id at its cheapest: these tests are about the scheme
PASS = b"correct horse battery"
CS = 16 * 1024
SECRET_TEXT = b"top secret payroll line\n"


def unchanged(before: bytes, after: bytes) -> bool:
    """Equal but for the writer note (who held the writer lock last: informational)."""
    return before[:WRITER_SLOT] == after[:WRITER_SLOT] \
        and before[DATA_START:] == after[DATA_START:]


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test has its own memory of seen generations (rollback detection)."""
    d = tmp_path / "state"
    monkeypatch.setenv("DISKRSYNC_STATE_DIR", str(d))
    return d


def ring(passphrase: bytes = PASS) -> Keyring:
    return Keyring(lambda why, new: passphrase)


def disk(path: Path, chunks: int = 24, seed: int = 1) -> bytearray:
    """Random chunks (stored RAW, all of one length), text chunks and zero chunks."""
    rnd = random.Random(seed)
    parts = []
    for c in range(chunks):
        if c % 4 == 3:
            parts.append(bytes(CS))
        elif c % 4 == 2:
            parts.append((SECRET_TEXT * (CS // len(SECRET_TEXT) + 1))[:CS])
        else:
            parts.append(rnd.randbytes(CS))
    data = bytearray(b"".join(parts))
    path.write_bytes(data)
    return data


def push(src: Path, dst: Path, *, encrypt: bool = False, passphrase: bytes = PASS,
         keep: int = 5) -> int:
    opts = SourceOptions(chunk_size=CS, keyring=ring(passphrase), encrypt=encrypt, kdf=FAST)
    stats = local_push(str(src), str(dst), PushRequest(source=opts,
                                                       target=TargetOptions(keep=keep)))
    assert stats.generation is not None
    return stats.generation


def read_all(image: Path, generation: int | None = None,
             passphrase: bytes = PASS) -> bytes:
    with Image.open(str(image), keyring=ring(passphrase)) as img, \
            img.snapshot(generation) as snap:
        return snap.read(0, snap.size)


def entry(image: Path, chunk: int, generation: int | None = None) -> tuple[int, int]:
    """(offset, stored length) of a chunk, read without the key."""
    with Image.open(str(image)) as img, img.snapshot(generation) as snap:
        e = snap.tree.entry(chunk)
        assert e.kind != Kind.ZERO
        return e.offset, e.length


# -- pure: the key and the codec ----------------------------------------------------------


@pytest.mark.pure
def test_envelope_opens_only_with_its_passphrase_and_names_damage_apart() -> None:
    key = MasterKey.generate()
    env = Envelope.wrap(key, PASS, FAST)
    back = Envelope.decode(env.encode()).unwrap(PASS)
    assert back.secret == key.secret and back.key_id == key.key_id
    with pytest.raises(UsageError, match="wrong passphrase") as wrong:
        env.unwrap(b"not it")
    assert wrong.value.exit_code == 2
    raw = env.encode()
    for bad in (raw[: len(raw) // 2], raw.replace(b'"wrapped": "', b'"wrapped": "00', 1),
                raw.replace(env.wrapped.hex()[:2].encode(),
                            b"%02x" % (int(env.wrapped.hex()[:2], 16) ^ 1), 1), b""):
        with pytest.raises(DataError, match="key material is damaged") as damaged:
            Envelope.decode(bad)
        assert damaged.value.exit_code == 6


@pytest.mark.pure
@given(data=st.binary(min_size=1, max_size=4096), index=st.integers(0, 1 << 40))
def test_sealed_codec_round_trips_and_binds_every_field(data: bytes, index: int) -> None:
    codec = SealedCodec(MasterKey.generate())
    digest = codec.leaf_hash(data, index)
    kind, stored = codec.encode(data, ChunkAt(index, digest))
    assert len(stored) <= len(data) + CHUNK_OVERHEAD
    assert codec.decode(kind, stored, len(data), ChunkAt(index, digest)) == data
    wrong = [(kind, stored, len(data), ChunkAt(index + 1, digest)),  # another place
             (kind, stored, len(data), ChunkAt(index, bytes(32))),  # another version
             (kind, stored[:-1] + bytes([stored[-1] ^ 1]), len(data), ChunkAt(index, digest)),
             (Kind.RAW if kind == Kind.ZSTD else Kind.ZSTD, stored, len(data),
              ChunkAt(index, digest))]
    for args in wrong:
        with pytest.raises(ValueError):
            codec.decode(*args)


@pytest.mark.pure
def test_digests_are_keyed_and_bound_to_the_position_zero_chunks_public() -> None:
    a, b = SealedCodec(MasterKey.generate()), SealedCodec(MasterKey.generate())
    data = os.urandom(CS)
    assert a.leaf_hash(data, 0) != a.leaf_hash(data, 1)  # equal chunks do not show
    assert a.leaf_hash(data, 0) != b.leaf_hash(data, 0)
    assert a.leaf_hash(data, 0) != STANDARD.leaf_hash(data, 0)
    assert a.zero_hash(CS) == zero_hash(CS)  # the host needs it to grow a disk
    # nonces never repeat: the same chunk encrypts differently every time
    at = ChunkAt(3, a.leaf_hash(data, 3))
    assert len({a.encode(data, at)[1] for _ in range(50)}) == 50


@pytest.mark.pure
def test_a_seal_opens_only_for_its_generation_and_root() -> None:
    codec = SealedCodec(MasterKey.generate())
    root = os.urandom(32)
    seal = codec.seal(7, root, {"source": "/dev/sda"})
    assert codec.open_seal(7, root, seal)["source"] == "/dev/sda"
    for number, r, s in ((6, root, seal), (7, os.urandom(32), seal), (7, root, seal[:-2]),
                         (7, root, ""), (7, root, "zz")):
        with pytest.raises(DataError, match="does not authenticate"):
            codec.open_seal(number, r, s)


@pytest.mark.pure
def test_seen_generations_catch_a_rollback_and_a_fork(tmp_path: Path) -> None:
    seen = SeenGenerations(str(tmp_path))
    kid, r5, r6 = os.urandom(16), os.urandom(32), os.urandom(32)
    here = "host:/srv/a.spgz"
    seen.check(kid, here, None, {}, "img")  # nothing seen yet: nothing to compare
    seen.record(kid, here, 6, r6)
    seen.record(kid, here, 5, r5)  # older: ignored
    seen.check(kid, here, (6, r6), {6: r6}, "img")
    seen.check(kid, here, (9, os.urandom(32)), {}, "img")
    with pytest.raises(DataError, match="rolled back"):
        seen.check(kid, here, (5, r5), {5: r5}, "img")
    with pytest.raises(DataError, match="forked or forged"):
        seen.check(kid, here, (6, r5), {6: r5}, "img")
    seen.check(kid, "host:/srv/copy.spgz", (1, r5), {1: r5}, "img")  # another place


@pytest.mark.process
def test_seen_state_written_by_many_processes_at_once_keeps_every_entry(
        tmp_path: Path) -> None:
    """Pushes to different places running at once each add their place to the one file of
    encrypted destinations: every entry survives. (Each read the file, added its own and
    replaced it: the last writer dropped the others' entries.)"""
    code = ("import sys\n"
            "from diskrsync.compression.crypto import SeenGenerations\n"
            "seen = SeenGenerations(sys.argv[1])\n"
            "for i in range(40):\n"
            "    seen.remember_place(f'host:/{sys.argv[2]}/{i}', bytes(16))\n")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"w{n}"], env=env)
             for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    seen = SeenGenerations(str(tmp_path))
    missing = [f"host:/w{n}/{i}" for n in range(4) for i in range(40)
               if seen.encrypted_at(f"host:/w{n}/{i}") is None]
    assert missing == []


@pytest.mark.inproc
def test_a_state_directory_that_cannot_be_written_is_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Rollback memory that cannot be kept is said (once), not silently dropped."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    seen = SeenGenerations(str(blocker / "state"))  # a directory under a file: ENOTDIR
    with caplog.at_level(logging.WARNING, logger="diskrsync.state"):
        seen.record(bytes(16), "host:/a", 3, bytes(32))
        seen.remember_place("host:/a", bytes(16))
    warned = [r.getMessage() for r in caplog.records if r.name == "diskrsync.state"]
    assert len(warned) == 1 and "rolling them back" in warned[0]
    assert seen.get(bytes(16), "host:/a") is None


# -- in-process: pushes and the attacks on the file ---------------------------------------


@pytest.mark.inproc
def test_encrypted_push_hides_data_and_names_and_reads_back(tmp_path: Path) -> None:
    src, img = tmp_path / "payroll-disk.img", tmp_path / "backup.spgz"
    data = disk(src)
    assert push(src, img, encrypt=True) == 1
    raw = img.read_bytes()
    assert SECRET_TEXT not in raw and b"payroll-disk" not in raw
    assert bytes(data[:64]) not in raw
    assert read_all(img) == data
    with Image.open(str(img), keyring=ring()) as opened:
        assert opened.sealed_record(opened.record())["source"] == str(src)
        assert opened.record().source == ""  # the host's copy says nothing
    # a push with nothing changed sends no chunk; a change sends that chunk only
    opts = SourceOptions(chunk_size=CS, keyring=ring())
    stats = local_push(str(src), str(img), PushRequest(source=opts))
    assert stats.chunks_differing == 0 and stats.generation == 1 and stats.unchanged
    data[5 * CS + 7] ^= 0xFF
    src.write_bytes(data)
    stats = local_push(str(src), str(img), PushRequest(source=opts))
    assert stats.chunks_differing == 1
    assert read_all(img) == data
    assert maintenance.verify(Image.open(str(img), keyring=ring())).ok


@pytest.mark.inproc
def test_wrong_passphrase_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    src, img = tmp_path / "d.img", tmp_path / "b.spgz"
    disk(src)
    push(src, img, encrypt=True)
    before = img.read_bytes()
    with pytest.raises(UsageError, match="wrong passphrase") as e:
        push(src, img, passphrase=b"not it")
    assert e.value.exit_code == 2
    assert unchanged(before, img.read_bytes())
    with pytest.raises(UsageError, match="give its passphrase"):
        local_push(str(src), str(img), PushRequest(source=SourceOptions(chunk_size=CS)))
    assert unchanged(before, img.read_bytes())


@pytest.mark.inproc
def test_encrypt_refuses_plain_images_and_raw_targets(tmp_path: Path) -> None:
    src, plain = tmp_path / "d.img", tmp_path / "plain.spgz"
    disk(src)
    local_push(str(src), str(plain), PushRequest(source=SourceOptions(chunk_size=CS)))
    before = plain.read_bytes()
    with pytest.raises(UsageError, match="unencrypted image"):
        push(src, plain, encrypt=True)
    assert plain.read_bytes() == before
    raw = tmp_path / "raw.img"
    opts = SourceOptions(chunk_size=CS, keyring=ring(), encrypt=True, kdf=FAST)
    with pytest.raises(UsageError, match="needs an image"):
        local_push(str(src), str(raw), PushRequest(source=opts, raw_target=True))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.inproc
def test_flipped_bit_swapped_and_replayed_chunks_are_refused_with_chunk_and_offset(
        tmp_path: Path) -> None:
    src, img = tmp_path / "d.img", tmp_path / "b.spgz"
    data = disk(src)
    push(src, img, encrypt=True)
    data[4 * CS] ^= 1  # chunk 4 changes in generation 2 (chunks 0, 1, 4, 5 are RAW)
    src.write_bytes(data)
    push(src, img)
    old4, new4 = entry(img, 4, 1), entry(img, 4, 2)
    c0, c1 = entry(img, 0), entry(img, 1)
    assert old4 != new4 and c0[1] == c1[1] == new4[1] == old4[1]  # all RAW: one length
    pristine = img.read_bytes()

    def attack(name: str, edits: list[tuple[int, bytes]], bad: set[int]) -> None:
        img.write_bytes(pristine)
        with open(img, "r+b") as f:
            for off, blob in edits:
                f.seek(off)
                f.write(blob)
        with Image.open(str(img), keyring=ring()) as opened, opened.snapshot() as snap:
            for c in bad:
                with pytest.raises(CorruptChunkError) as e:
                    snap.read_chunk(c)
                assert e.value.exit_code == 6
                assert f"chunk {c} at offset {c * CS}" in e.value.message, name
            report = maintenance.verify(opened)
        assert {b["chunk"] for b in report.bad_chunks} == bad, name

    def stored(e: tuple[int, int]) -> bytes:
        return pristine[e[0] : e[0] + e[1]]

    attack("flipped bit", [(c1[0] + c1[1] // 2, bytes([stored(c1)[c1[1] // 2] ^ 4]))], {1})
    attack("swapped chunks", [(c0[0], stored(c1)), (c1[0], stored(c0))], {0, 1})
    attack("old version replayed", [(new4[0], stored(old4))], {4})
    attack("copied to a new place", [(c0[0], stored(new4))], {0})


def _publish_forged(image: Path, forge: Callable[[GenTable], GenTable]) -> None:
    publish_forged(str(image), forge)


@pytest.mark.inproc
def test_forged_and_rolled_back_generations_are_refused(tmp_path: Path) -> None:
    src, img = tmp_path / "d.img", tmp_path / "b.spgz"
    data = disk(src)
    push(src, img, encrypt=True)
    gen1_copy = tmp_path / "gen1-copy.spgz"
    shutil.copyfile(img, gen1_copy)
    data[CS] ^= 1
    src.write_bytes(data)
    push(src, img)
    assert read_all(img) == data  # this client has now seen generation 2
    pristine = img.read_bytes()

    # the whole file rolled back to an older copy: noticed from the client's own memory
    shutil.copyfile(gen1_copy, img)
    with pytest.raises(DataError, match="rolled back") as e:
        Image.open(str(img), keyring=ring())
    assert e.value.exit_code == 6
    with pytest.raises(DataError, match="rolled back"):
        push(src, img)
    # the newest generation dropped from the table
    img.write_bytes(pristine)
    _publish_forged(img, lambda t: replace(t, generations=t.generations[:-1]))
    with pytest.raises(DataError, match="rolled back"):
        Image.open(str(img), keyring=ring())
    # generation 2's record given generation 1's seal, or renumbered, or another root
    for forge in (
        lambda t: replace(t, generations=(t.generations[0], replace(
            t.generations[1], seal=t.generations[0].seal))),
        lambda t: replace(t, generations=(t.generations[0], replace(
            t.generations[1], number=9))),
        lambda t: replace(t, generations=(t.generations[0], replace(
            t.generations[1], tree=t.generations[0].tree,
            root_hash=t.generations[0].root_hash))),
    ):
        img.write_bytes(pristine)
        _publish_forged(img, forge)
        with pytest.raises(DataError, match=r"does not authenticate|forked or forged"):
            Image.open(str(img), keyring=ring())
    img.write_bytes(pristine)
    assert read_all(img) == data


@pytest.mark.inproc
def test_damaged_or_missing_key_material_is_a_data_error(tmp_path: Path) -> None:
    src, img = tmp_path / "d.img", tmp_path / "b.spgz"
    disk(src)
    push(src, img, encrypt=True)
    _publish_forged(img, lambda t: replace(t, encryption={
        **t.encryption, "envelope": {**t.encryption["envelope"],
                                     "wrapped": t.encryption["envelope"]["wrapped"][:-8]}}))
    with pytest.raises(DataError, match="key material is damaged") as e:
        Image.open(str(img), keyring=ring())
    assert e.value.exit_code == 6
    _publish_forged(img, lambda t: replace(t, encryption={**t.encryption, "envelope": None}))
    with pytest.raises(UsageError, match="--key-file"):
        Image.open(str(img), keyring=ring())


@pytest.mark.inproc
def test_host_cannot_strip_encryption_to_get_plaintext(tmp_path: Path) -> None:
    """A host that replaces an encrypted image by a plain one (or deletes it) must not
    receive the next push in plaintext: the client remembers where it pushed encrypted."""
    src, img = tmp_path / "d.img", tmp_path / "b.spgz"
    disk(src)
    push(src, img, encrypt=True)
    img.unlink()
    with pytest.raises(DataError, match="was an encrypted image"):
        push(src, img)
    assert not img.exists() or SECRET_TEXT not in img.read_bytes()


@pytest.mark.inproc
def test_host_end_checks_encrypted_chunks_for_shape(tmp_path: Path) -> None:
    """The target (a serve end) has no key: it refuses chunks that cannot be ciphertext
    of their length, and generations that come without a seal."""
    src, img = tmp_path / "d.img", tmp_path / "b.spgz"
    disk(src)
    push(src, img, encrypt=True)
    with Image.open(str(img)) as opened:
        assert isinstance(opened.codec, OpaqueCodec)
        enc = opened.table.encryption
    for chunk, done in ((p.Chunk(0, int(Kind.RAW), bytes(32), b"short"), None),
                        (None, p.Done(bytes(32), {}))):
        a, b = channel_pair()
        info = {"caps": list(p.CAPABILITIES), "hash": p.HASH}
        a.send(p.Hello("source", 24 * CS, CS, 128, "test", info))

        def opener(hello: p.Hello) -> WireStore:
            return open_store(str(img), hello, TargetOptions(), raw=False)

        if chunk is not None:
            a.send(chunk)
        if done is not None:
            a.send(done)
        a.close()
        with pytest.raises(PeerError, match=r"cannot be|no sealed record"):
            serve_target(b, opener)
    assert enc is not None
    assert read_all(img) is not None


# -- real processes: the command line ------------------------------------------------------


def cli(*args: str | Path | int, env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONSAFEPATH="1", DISKRSYNC_KDF="1024,1,1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "diskrsync.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=full,
                          stdin=stdin, start_new_session=True)


CliImage = tuple[Path, Path, Path, bytearray]


@pytest.fixture
def cli_image(tmp_path: Path) -> Iterator[CliImage]:
    src, img, pw = tmp_path / "disk.img", tmp_path / "b.spgz", tmp_path / "pw"
    data = disk(src)
    pw.write_text("correct horse battery\n")
    res = cli("push", "--encrypt", "--passphrase-file", pw, "--chunk-size", CS, "-q", src, img)
    assert res.returncode == 0, res.stderr
    yield src, img, pw, data


@pytest.mark.inproc
def test_state_is_kept_where_the_file_system_has_no_locks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NFS without its lock daemon answers flock with ENOLCK: the state is still written
    (unguarded), not dropped. (It was dropped, with a warning.)"""
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(crypto_module.fcntl, "flock", no_locks)
    seen = SeenGenerations(str(tmp_path / "state"))
    seen.record(bytes(16), "host:/a", 3, bytes(32))
    assert seen.get(bytes(16), "host:/a") == (3, bytes(32))
    assert not list((tmp_path / "state").glob("*.tmp"))


@pytest.mark.process
def test_a_push_whose_state_directory_cannot_be_written_warns_and_succeeds(
        tmp_path: Path) -> None:
    src, img, pw = tmp_path / "disk.img", tmp_path / "b.spgz", tmp_path / "pw"
    disk(src)
    pw.write_text("correct horse battery\n")
    (tmp_path / "file").write_text("")
    res = cli("push", "--encrypt", "--passphrase-file", pw, "-q", src, img,
              env={"DISKRSYNC_STATE_DIR": str(tmp_path / "file" / "state")})
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("diskrsync: warning: cannot keep what this client has seen") == 1


@pytest.mark.process
def test_cli_exit_codes_of_encrypted_images(cli_image: CliImage, tmp_path: Path) -> None:
    src, img, pw, data = cli_image
    before = img.read_bytes()
    wrong = cli("push", src, img, env={"DISKRSYNC_PASSPHRASE": "nope"})
    assert wrong.returncode == 2 and "wrong passphrase" in wrong.stderr
    assert "Traceback" not in wrong.stderr and unchanged(before, img.read_bytes())
    missing = cli("restore", img, tmp_path / "out")
    assert missing.returncode == 2 and "DISKRSYNC_PASSPHRASE" in missing.stderr
    out = tmp_path / "out"
    ok = cli("restore", "--passphrase-file", pw, "-q", img, out)
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == data
    # info and verify without any key source: what the host can see and check
    shown = json.loads(cli("info", "--json", img).stdout)
    assert shown["encryption"]["unlocked"] is False
    assert shown["generations"][0]["source"] == "(encrypted)"
    checked = cli("verify", img)
    assert checked.returncode == 0 and "without its key" in checked.stderr
    full = json.loads(cli("info", "--json", "--passphrase-file", pw, img).stdout)
    assert full["generations"][0]["source"] == str(src)
    assert jsonout.check(shown) == [] and jsonout.check(full) == []
    checked_json = json.loads(cli("verify", "--json", img).stdout)
    assert checked_json["contents_checked"] is False and jsonout.check(checked_json) == []
    # one flipped bit in a chunk: verify and restore name it, exit 6
    off, length = entry(img, 1)
    _flip(img, off + length // 2)
    bad = cli("verify", "--passphrase-file", pw, img)
    assert bad.returncode == 6 and f"chunk 1 at offset {CS}" in bad.stdout
    fails = cli("restore", "--passphrase-file", pw, "-q", img, tmp_path / "out2")
    assert fails.returncode == 6 and f"chunk 1 at offset {CS}" in fails.stderr


@pytest.mark.process
def test_cli_key_export_import_and_change_passphrase(cli_image: CliImage,
                                                    tmp_path: Path) -> None:
    _src, img, pw, _data = cli_image
    key = tmp_path / "key.json"
    # the passphrase is checked before anything is written: an export that would never open
    # is found now, not on the day it is needed
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    refused = cli("key", "export", "--passphrase-file", wrong, img, key)
    assert refused.returncode == 2 and not key.exists(), refused.stderr
    assert cli("key", "export", "--passphrase-file", pw, img, key).returncode == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    # never overwritten
    assert cli("key", "export", "--passphrase-file", pw, img, key).returncode == 2
    new = tmp_path / "pw2"
    new.write_text("another passphrase\n")
    res = cli("key", "change-passphrase", "--passphrase-file", pw, "--new-passphrase-file", new,
              img)
    assert res.returncode == 0, res.stderr
    assert cli("info", "--passphrase-file", pw, img).returncode == 2
    assert cli("info", "--passphrase-file", new, img).returncode == 0
    # the old export still opens the image with the old passphrase
    assert cli("info", "--key-file", key, "--passphrase-file", pw, img).returncode == 0
    truncated = tmp_path / "cut.json"
    truncated.write_bytes(key.read_bytes()[:120])
    res = cli("info", "--key-file", truncated, "--passphrase-file", pw, img)
    assert res.returncode == 6 and "key material is damaged" in res.stderr
    assert cli("key", "import", img, key, "--passphrase-file", pw).returncode == 0
    assert cli("info", "--passphrase-file", pw, img).returncode == 0
    shown = json.loads(cli("key", "show", img).stdout)
    assert shown["key_in_image"] is True and len(shown["key_id"]) == 32


@pytest.mark.process
def test_cli_convert_encrypts_every_generation(cli_image: CliImage, tmp_path: Path) -> None:
    src, _img, pw, data = cli_image
    plain = tmp_path / "plain.spgz"
    assert cli("push", "-q", "--chunk-size", CS, src, plain).returncode == 0
    data[CS] ^= 1
    src.write_bytes(data)
    assert cli("push", "-q", src, plain).returncode == 0
    enc = tmp_path / "enc.spgz"
    res = cli("convert", "--encrypt", "--json", "--passphrase-file", pw, plain, enc)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["generations"] == 2 and jsonout.check(summary) == []
    assert SECRET_TEXT not in enc.read_bytes()
    for g in (1, 2):
        out = tmp_path / f"g{g}"
        assert cli("restore", "-q", "-g", g, plain, out).returncode == 0
        again = tmp_path / f"e{g}"
        assert cli("restore", "-q", "-g", g, "--passphrase-file", pw, enc, again).returncode == 0
        assert again.read_bytes() == out.read_bytes()


@pytest.mark.process
@pytest.mark.fuse
@pytest.mark.root
def test_mount_decrypts_and_answers_eio_for_a_damaged_chunk_only(cli_image: CliImage,
                                                                 tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    _src, img, pw, data = cli_image
    off, length = entry(img, 5)
    _flip(img, off + length // 2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cleanup = MountCleanup(tmp_path)
    cleanup.fuse.append(mnt)
    try:
        nokey = cli("mount", img, mnt)
        assert nokey.returncode == 2 and "passphrase" in nokey.stderr
        res = cli("mount", "--passphrase-file", pw, "--log-file", tmp_path / "log", img, mnt)
        assert res.returncode == 0, res.stderr
        disk_raw = mnt / "disk.raw"
        with open(disk_raw, "rb") as f:
            assert f.read(5 * CS) == data[: 5 * CS]
            with pytest.raises(OSError) as e:
                os.pread(f.fileno(), CS, 5 * CS)
            assert e.value.errno == errno.EIO
            assert os.pread(f.fileno(), len(data) - 6 * CS, 6 * CS) == data[6 * CS :]
        assert f"corrupt chunk 5 at offset {5 * CS}" in (tmp_path / "log").read_text()
    finally:
        cleanup.cleanup()


@pytest.mark.inproc
def test_an_encrypted_image_pushed_on_stays_encrypted_with_its_key(tmp_path: Path) -> None:
    """The offsite copy (`push backups/x.spgz offsite:...`) never sends plaintext: the new
    image gets the same key and the chunks travel as stored."""
    src, img, copy = tmp_path / "d.img", tmp_path / "b.spgz", tmp_path / "offsite.spgz"
    data = disk(src)
    push(src, img, encrypt=True)
    stats = local_push(str(img), str(copy), PushRequest(source=SourceOptions(keyring=ring())))
    assert stats.generation == 1
    assert SECRET_TEXT not in copy.read_bytes()
    with Image.open(str(img)) as a, Image.open(str(copy)) as b:
        assert a.key_id == b.key_id is not None
    assert read_all(copy) == data
    plain = tmp_path / "plain.spgz"
    local_push(str(src), str(plain), PushRequest(source=SourceOptions(chunk_size=CS)))
    with pytest.raises(UsageError, match="unencrypted image"):
        local_push(str(img), str(plain), PushRequest(source=SourceOptions(keyring=ring())))


@pytest.mark.process
def test_cli_warns_of_key_loss_and_never_sends_plain_to_a_go_server(cli_image: CliImage,
                                                                    tmp_path: Path) -> None:
    src, img, pw, _data = cli_image
    res = cli("push", "--encrypt", "--passphrase-file", pw, "-q", src, tmp_path / "new.spgz")
    assert res.returncode == 0 and "without the key the backup is unreadable" in res.stderr
    go = cli("push", "--legacy", "--passphrase-file", pw, img, "nohost.invalid:/x.spgz")
    assert go.returncode == 2 and "would receive it in plain" in go.stderr, go.stderr


@pytest.mark.inproc
def test_the_hello_never_names_the_source(tmp_path: Path) -> None:
    """Whether the target is encrypted is known only from its answer, so the source's
    description travels in Done: in the seal when encrypted. (It was in the Hello: every
    later push into an encrypted image told the host the source's path.)"""
    src = tmp_path / "secret-project-disk.img"
    disk(src, 2)
    reader = RawSource(str(src))
    try:
        session = SourceSession(channel_pair()[0], reader, SourceOptions(keyring=ring()))
        assert "secret-project" not in json.dumps(session.conv.hello().info)
    finally:
        reader.close()
