"""A hostile or broken peer: every number it sends is checked before anything is allocated.

Each case is a red-team stream from issue 10 sent to the real program (``serve --target``,
``serve --source``, or the Go remote end ``--target``) running under an address-space limit:
the answer must be exit 5 with one line, quickly, and the target image must keep its
generation, stay healthy and hold no new checkpoint or data.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zstandard
from support.hostile import (
    DISKRSYNC,
    frame,
    hello,
    image_state,
    json_frame,
    one_error_line,
    run_bounded,
)

from diskrsync.base.errors import PeerError
from diskrsync.base.merkle import leaf_hash, zero_hash
from diskrsync.cli.main import _run
from diskrsync.compression import codec
from diskrsync.compression import targets as t
from diskrsync.compression.codec import Kind
from diskrsync.compression.go_target import ImageTargetStore
from diskrsync.compression.image import Image
from diskrsync.synccore import protocol as p
from diskrsync.synccore.legacy import MAGIC
from diskrsync.synccore.push import PushRequest, local_push
from diskrsync.synccore.source import SourceOptions
from diskrsync.synccore.ssh.errors import LinkError, RemoteCommandError
from diskrsync.synccore.ssh.process import MAX_STDERR_LINE, RemoteProcess

CS = 16384
SIZE = CS * 24


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A one-generation image of SIZE bytes."""
    src, dst = tmp_path / "src", tmp_path / "d.spgz"
    src.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 2))
    local_push(str(src), str(dst), PushRequest(source=SourceOptions(chunk_size=CS)))
    return dst


def _serve_target(dst: Path, stream: bytes, *extra: str, restricted: bool = False):
    """``serve --target`` (or the documented restricted key) fed ``stream`` then EOF."""
    if restricted:
        env = {**os.environ, "SSH_ORIGINAL_COMMAND": f"diskrsync serve --target {dst}"}
        argv = [*DISKRSYNC, "serve", "--restrict-to", str(dst.parent), "--write-only", *extra]
        return run_bounded(argv, p.preamble() + stream, env=env)
    return run_bounded([*DISKRSYNC, "serve", "--target", str(dst), *extra],
                       p.preamble() + stream)


def _refused(r, image: Path | None = None, before=None, why: str = "") -> None:
    assert r.returncode == 5, r.stderr
    assert one_error_line(r.stderr), r.stderr
    assert why.encode() in r.stderr, r.stderr
    if image is not None:
        after = image_state(image)
        assert after == before, (before, after)  # no generation, checkpoint or new data
        assert after.verify_ok
        # the chunks a peer sent may lie in free space until the next writer; no index
        assert after.file_size <= before.file_size + (1 << 20)


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "why"), [
    (2**40, "closed the connection before finishing"),  # allowed, but nothing may be written
    (2**55, "more than the 70368744177664 this end accepts"),
    ("1e300", "'size' must be int"),
    (2**64, "outside 0.."),
    (-1, "outside 0.."),
], ids=["2^40", "2^55", "1e300", "2^64", "negative"])
@pytest.mark.process
def test_a_huge_size_request_to_a_restricted_key_changes_nothing(image, size, why):
    """Red team: a 305-byte Hello with size 2^40 wrote 390 MiB of index pages (a checkpoint
    of nothing), 2^55 grew to 17.6 GB of memory, 1e300 hung."""
    before = image_state(image)
    body = hello(size=0, info={"hash": p.HASH, "caps": list(p.CAPABILITIES), "name": "d"})
    text = json.dumps(body).replace('"size": 0', f'"size": {size}')
    r = _serve_target(image, json_frame(1, text), restricted=True)
    _refused(r, image, before, why)


@pytest.mark.process
def test_a_huge_size_and_one_chunk_leave_no_index_behind(image):
    """The 2^40 request plus one chunk: a checkpoint of it would store the index of the
    whole announced size (about 50 MiB here for 16 GiB at 16 KiB chunks, 390 MiB per TiB
    at 128 KiB) to save one chunk; a checkpoint is taken only when it saves more than it
    writes."""
    before = image_state(image)
    data = os.urandom(CS)
    stream = json_frame(1, hello(size=16 << 30)) + p.encode(
        p.Chunk(0, Kind.RAW, leaf_hash(data), data))
    r = _serve_target(image, stream, restricted=True)
    _refused(r, image, before, "closed the connection before finishing")


@pytest.mark.parametrize("restricted", [False, True], ids=["serve", "restricted"])
@pytest.mark.process
def test_max_size_is_the_servers_limit(image, restricted):
    before = image_state(image)
    r = _serve_target(image, json_frame(1, hello(size=SIZE * 2)), "--max-size", str(SIZE),
                      restricted=restricted)
    _refused(r, image, before, f"more than the {SIZE} this end accepts (--max-size)")


@pytest.mark.process
def test_a_client_cannot_raise_the_servers_limit(image):
    env = {**os.environ,
           "SSH_ORIGINAL_COMMAND": f"diskrsync serve --target {image} --max-size 8E"}
    argv = [*DISKRSYNC, "serve", "--restrict-to", str(image.parent), "--write-only"]
    r = run_bounded(argv, b"", env=env)
    assert r.returncode == 2 and b"option '--max-size' is not allowed" in r.stderr


# -- chunk payloads ------------------------------------------------------------------------


def _zstd_declaring(declared: int, run: int = 128 * 1024) -> bytes:
    """A few bytes of zstd frame that claim ``declared`` bytes of content (one RLE block)."""
    head = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 7 << 3]) + struct.pack("<Q", declared)
    return head + struct.pack("<I", 1 | (1 << 1) | (run << 3))[:3] + b"\x07"


@pytest.mark.process
def test_a_zstd_frame_declaring_gigabytes_is_refused_before_allocating(image):
    """Red team: max_output_size does not cap a declared content size; the target
    allocated gigabytes for a 98 KB chunk before rejecting it."""
    before = image_state(image)
    stream = (json_frame(1, hello(size=SIZE))
              + frame(5, struct.pack("<QB32s", 0, Kind.ZSTD, b"\1" * 32)
                      + _zstd_declaring(4 << 30)))
    r = _serve_target(image, stream)
    _refused(r, image, before, "zstd frame declares 4294967296 bytes, expected 16384")


@pytest.mark.pure
def test_decoded_chunks_are_capped_at_the_chunk_length():
    with pytest.raises(ValueError, match="declares"):
        codec.decode(Kind.ZSTD, _zstd_declaring(6 << 30), CS)
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * (CS + 1))
    with pytest.raises(ValueError):
        codec.decode(Kind.ZSTD, undeclared, CS)
    assert codec.decode(Kind.ZSTD, codec.encode(b"y" * CS)[1], CS) == b"y" * CS


# -- malformed JSON ------------------------------------------------------------------------

_INFO = {"hash": p.HASH, "caps": list(p.CAPABILITIES)}
_TARGET_CASES: dict[str, tuple[dict[str, Any] | str, str]] = {
    "nul-in-name": (hello(size=SIZE, info={**_INFO, "name": "a\0b"}), "NUL"),
    "caps-not-a-list": (hello(size=SIZE, info={**_INFO, "caps": 5}), "'caps' must be"),
    "infinity": (json.dumps(hello(size=0)).replace('"size": 0', '"size": Infinity'),
                 "Infinity is not a number"),
    "nan": (json.dumps(hello(size=0)).replace('"size": 0', '"size": NaN'),
            "NaN is not a number"),
    "deep-nesting": (json.dumps(hello(size=SIZE)).replace(
        '"software"', '"deep": ' + "[" * 100_000 + "]" * 100_000 + ', "software"'),
        "malformed message"),
    "negative-chunk-size": (hello(size=SIZE, chunk_size=-CS), "'chunk_size' is"),
}


@pytest.mark.parametrize("case", sorted(_TARGET_CASES))
@pytest.mark.process
def test_malformed_source_hello_is_one_line_and_changes_nothing(tmp_path, image, case):
    """Red team: these were tracebacks (exit 1) or, for a negative chunk size, a usage
    error (exit 2) blamed on the user."""
    before = image_state(image)
    body, why = _TARGET_CASES[case]
    # a directory target: the source's name becomes the file name
    r = _serve_target(tmp_path, json_frame(1, body))
    _refused(r, why=why)
    assert image_state(image) == before
    assert sorted(os.listdir(tmp_path)) == ["d.spgz", "src"]


def _serve_source(tmp_path: Path, stream: bytes):
    src = tmp_path / "src"
    if not src.exists():
        src.write_bytes(os.urandom(SIZE))
    return run_bounded([*DISKRSYNC, "serve", "--source", str(src)], p.preamble() + stream)


_SOURCE_CASES = {
    "fanout-0": (hello("target", SIZE, fanout=0), "'fanout' is 0"),
    "fanout-1": (hello("target", SIZE, fanout=1), "'fanout' is 1"),
    "chunk-size-0": (hello("target", SIZE, chunk_size=0), "chunk size 0 is not a power"),
    "chunk-size-negative": (hello("target", SIZE, chunk_size=-CS), "'chunk_size' is"),
    "chunk-size-not-a-power": (hello("target", SIZE, chunk_size=CS + 1), "power of two"),
    "negative-size": (hello("target", -5), "'size' is -5"),
    "caps-not-a-list": (hello("target", SIZE, info={"hash": p.HASH, "caps": 5}),
                        "'caps' must be"),
}


@pytest.mark.parametrize("case", sorted(_SOURCE_CASES))
@pytest.mark.process
def test_malformed_target_hello_is_one_line(tmp_path, case):
    """The source side (a pull's ``serve --source``) against a target's bad Hello: these
    were tracebacks from Shape or set()."""
    body, why = _SOURCE_CASES[case]
    _refused(_serve_source(tmp_path, json_frame(1, body)), why=why)


@pytest.mark.process
def test_unsolicited_leaves_are_refused(tmp_path):
    stream = json_frame(1, hello("target", SIZE)) + p.encode(p.Leaves(5, b""))
    _refused(_serve_source(tmp_path, stream), why="which was not asked for")


@pytest.mark.process
def test_an_early_committed_is_refused_not_waited_on(tmp_path):
    """Red team: a Committed before the source's Done, then EOF, left the source waiting
    forever for page digests that never came."""
    stream = json_frame(1, hello("target", SIZE)) + p.encode(p.Committed(1, b"\0" * 32))
    _refused(_serve_source(tmp_path, stream), why="committed before the source finished")


@pytest.mark.process
def test_too_many_page_digests_are_refused(tmp_path):
    stream = json_frame(1, hello("target", SIZE)) + p.encode(p.PageHashes(0, b"\0" * 64))
    _refused(_serve_source(tmp_path, stream), why="more page digests than its 1 pages")


@pytest.mark.process
def test_a_chunk_outside_the_disk_is_refused(image):
    before = image_state(image)
    data = b"z" * CS
    stream = json_frame(1, hello(size=SIZE)) + p.encode(
        p.Chunk(2**40, Kind.RAW, leaf_hash(data), data))
    _refused(_serve_target(image, stream), image, before, "outside the disk")


@pytest.mark.process
def test_leaves_asked_for_a_page_the_target_lacks_are_refused(image):
    """A NeedLeaves beyond the target's pages was answered with no digests; it is a protocol
    violation (a source only asks about pages both ends have)."""
    before = image_state(image)
    stream = json_frame(1, hello(size=SIZE)) + p.encode(p.NeedLeaves(10**6))
    _refused(_serve_target(image, stream), image, before, "leaf digests of page 1000000")


@pytest.mark.pure
def test_the_decoder_checks_shapes_in_one_place():
    ok = p.Decoder()
    ok.feed(p.preamble() + p.encode(p.Error("Weird\nKind", "two\nlines")))
    with pytest.raises(PeerError, match="not a class name"):
        ok.next()
    d = p.Decoder()
    d.feed(p.preamble() + p.encode(p.Error("LocalError", "two\nlines\0")))
    with pytest.raises(PeerError, match="NUL"):
        d.next()
    d = p.Decoder()
    d.feed(p.preamble() + p.encode(p.Error("LocalError", "two\nlines")))
    assert d.next() == p.Error("LocalError", "two lines")  # shown as one line
    d = p.Decoder()
    d.feed(p.preamble() + p.encode(p.Error("LocalError", "x" * 100_000)))
    msg = d.next()
    assert isinstance(msg, p.Error) and len(msg.message) == 4000
    for info in ({"read_errors": 5}, {"read_errors": [[1, 2, 3]]},
                 {"differing_ranges": [["x", 1]]}, {"source_changed_chunks": "many"},
                 {"chunks_differing": -1}):
        d = p.Decoder()  # a pull's summary added these up after the commit: tracebacks
        d.feed(p.preamble() + p.encode(p.Done(b"\1" * 32, info)))
        with pytest.raises(PeerError, match="malformed message"):
            d.next()
    d = p.Decoder()
    d.feed(p.preamble() + frame(5, struct.pack("<QB32s", 0, 3, b"\0" * 32)))
    with pytest.raises(PeerError, match="malformed chunk frame"):
        d.next()


# -- the Go protocol -----------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new", "image"])
@pytest.mark.process
def test_a_25_byte_go_stream_claiming_a_petabyte_is_refused(tmp_path, image, existing):
    """Red team: size 2^50 plus one zero run kept ``diskrsync --target`` busy forever,
    growing 4-14 MB/s."""
    work = tmp_path / "go"
    work.mkdir()
    path = work / "t.img"
    if existing:
        shutil.copyfile(image, path)
        before = image_state(path)
    stream = MAGIC + struct.pack("<Q", 2**50) + b"\0" + struct.pack("<q", 2**50)
    assert len(stream) == 25
    r = run_bounded([*DISKRSYNC, "--target", str(path)], stream, cwd=work)
    _refused(r, path if existing else None, before if existing else None,
             why="more than the 70368744177664 this end accepts")
    assert os.listdir(work) == (["t.img"] if existing else [])  # no temporary left


@pytest.mark.inproc
def test_a_zero_run_past_the_end_costs_nothing(tmp_path):
    """A zero run over space that was just grown stores no chunks (it was a loop over
    every chunk of the run)."""
    path = tmp_path / "t.img"
    Image.create(str(path), chunk_size=CS).close()
    img = Image.open(str(path))
    tx = img.begin()
    try:
        store = ImageTargetStore(tx)
        store.write(0, b"a" * 100)
        store.write_zeros(100, 1 << 30)
        store.flush()
        assert store.size == 100 + (1 << 30)
        assert store.chunks_stored == 1  # the written head only
        assert store.read(0, 200) == b"a" * 100 + bytes(100)
    finally:
        tx.abort()
        img.close()


# -- the SSH transport ----------------------------------------------------------------------


@pytest.mark.inproc
def test_a_remote_stderr_line_without_an_end_is_not_held_in_memory():
    """A hostile remote (a pull connects to the machine being backed up) could send an
    endless stderr line; the relay held all of it until the end."""
    pieces = [b"x" * 65536] * 100 + [b"\nlast\n", b""]
    chan = SimpleNamespace(recv_stderr=lambda n: pieces.pop(0))
    lines: list[str] = []
    proc = RemoteProcess(SimpleNamespace(host="evil"), chan, lines.append)
    proc._stderr_thread.join(10)
    assert lines[-1] == "last"
    assert sum(map(len, lines[:-1])) == 100 * 65536
    assert max(map(len, lines)) <= MAX_STDERR_LINE + 65536


@pytest.mark.inproc
def test_a_command_killed_by_a_signal_is_not_a_lost_link_when_sshd_then_hangs_up():
    """sshd sends EOF and closes the channel of a command a signal killed (exit-signal, no
    exit-status), then closes the connection, its last channel gone. A status looked at
    after that was reported as a lost connection (tests/test_remote.py::
    test_link_drop_keeps_checkpoint_and_resumes failed now and then on that race)."""
    def chan(eof: bool) -> SimpleNamespace:
        done = threading.Event()
        done.set()
        return SimpleNamespace(recv_stderr=lambda n: b"", exit_status=-1, status_event=done,
                               eof_received=eof)

    gone = SimpleNamespace(host="h", opts=SimpleNamespace(remote_cmd="diskrsync"),
                           link_lost=True, link_error=lambda doing: LinkError(f"lost {doing}"))
    killed = RemoteProcess(gone, chan(eof=True), lambda line: None)
    with pytest.raises(RemoteCommandError, match="killed by a signal"):
        killed.wait(1)
    dropped = RemoteProcess(gone, chan(eof=False), lambda line: None)
    with pytest.raises(LinkError, match="lost running diskrsync"):
        dropped.wait(1)


@pytest.mark.pure
def test_running_out_of_memory_is_one_line_and_exit_3(capsys):
    def hungry() -> int:
        raise MemoryError()

    assert _run(hungry) == 3
    assert capsys.readouterr().err == "diskrsync: out of memory\n"


@pytest.mark.inproc
def test_zero_chunks_scattered_over_pages_do_not_pile_up_in_memory(tmp_path, monkeypatch):
    """One zero chunk per index page costs the peer 45 bytes and the target a whole page
    (6 KiB) in memory; with no payload no checkpoint ever came to write them out."""

    monkeypatch.setattr(t, "DIRTY_INDEX_BYTES", 64 << 10)
    path = tmp_path / "d.spgz"
    Image.create(str(path), chunk_size=CS).close()
    store = t.ImageStore(str(path), CS * 128 * 64, CS, t.TargetOptions())
    try:
        for page in range(20):
            store.put(page * 128, Kind.ZERO, zero_hash(CS), b"")
    finally:
        store.abort(save=False)
    assert image_state(path).checkpoint  # the pages went to disk, not into a pile
