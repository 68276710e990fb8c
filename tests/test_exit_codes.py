"""The exit-code contract: every code diskrsync ends with is named in diskrsync.base.errors,
has the value docs/user-guide.md's table gives it, and an error that crosses the wire (from
the other end of a push, or from the mount daemon) comes back in the category, hence with the
exit code, it left with. The literals below are the contract scripts rely on: changing a code
in the code or in the guide fails here."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import diskrsync.compression.image
import diskrsync.fsmount.mount
import diskrsync.synccore.ssh.errors  # loads the classes the walk below finds
from diskrsync.base import errors as e
from diskrsync.cli.main import _run

pytestmark = pytest.mark.pure

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "user-guide.md"

# (value in the code, the documented value, a phrase of the guide's row for it)
CONTRACT: list[tuple[str, int, int, str]] = [
    ("UsageError", e.UsageError.exit_code, 2, "usage"),
    ("LocalError", e.LocalError.exit_code, 3, "local failure"),
    ("BusyError", e.BusyError.exit_code, 4, "busy"),
    ("PeerError", e.PeerError.exit_code, 5, "the other end"),
    ("DataError", e.DataError.exit_code, 6, "data"),
    ("EXIT_SOURCE_CHANGED", e.EXIT_SOURCE_CHANGED, 10, "source changed"),
    ("EXIT_READ_ERRORS_IGNORED", e.EXIT_READ_ERRORS_IGNORED, 11, "--ignore-read-errors"),
    ("EXIT_REDUNDANCY_LOST", e.EXIT_REDUNDANCY_LOST, 12, "metadata"),
    ("EXIT_INTERRUPTED", e.EXIT_INTERRUPTED, 130, "interrupted"),
    ("EXIT_BROKEN_PIPE", e.EXIT_BROKEN_PIPE, 141, "reader of stdout"),
    ("EXIT_TERMINATED", e.EXIT_TERMINATED, 143, "terminated"),
]
CATEGORIES = (e.UsageError, e.BusyError, e.LocalError, e.PeerError, e.DataError)


@pytest.fixture(autouse=True)
def _keep_sigterm() -> Iterator[None]:
    """``_run`` installs its SIGTERM handler; leave the test process's as it was."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def documented() -> dict[int, str]:
    text = GUIDE.read_text()
    section = text[text.index("## Exit codes"):]
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"^\| (\d+) \| ((?:[^|\\]|\\.)*) \|", section, re.M)}


def error_classes() -> list[type[e.DiskrsyncError]]:
    found: list[type[e.DiskrsyncError]] = []
    todo: list[type[e.DiskrsyncError]] = [e.DiskrsyncError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found[1:], key=lambda c: c.__name__)


def category(cls: type[e.DiskrsyncError]) -> type[e.DiskrsyncError]:
    return next(c for c in CATEGORIES if issubclass(cls, c))


@pytest.mark.parametrize(("name", "code", "value", "phrase"), CONTRACT,
                         ids=[c[0] for c in CONTRACT])
def test_named_code_has_its_documented_value(name: str, code: int, value: int,
                                             phrase: str) -> None:
    assert code == value, f"{name} is {code}, the contract says {value}"
    table = documented()
    assert value in table, f"docs/user-guide.md's exit-code table has no row for {value}"
    assert phrase in table[value], f"the guide's row {value} ({table[value]!r}) is not {name}"


def test_the_guide_lists_exactly_the_named_codes() -> None:
    assert set(documented()) == {0} | {value for _, _, value, _ in CONTRACT}


def test_the_help_table_lists_exactly_the_named_codes() -> None:
    """base/errors.EXIT_CODES is what --help, the man page and docs/cli.md show."""
    codes = [code for code, _ in e.EXIT_CODES]
    assert len(codes) == len(set(codes))
    assert set(codes) == {0} | {value for _, _, value, _ in CONTRACT}


def test_every_error_class_exits_with_its_categorys_code() -> None:
    classes = error_classes()
    assert e.FormatVersionError in classes and e.ConnectionClosed in classes
    for cls in classes:
        assert cls.exit_code == category(cls).exit_code, cls


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_cli_turns_each_error_into_its_exit_code(cls: type[e.DiskrsyncError],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def fail() -> int:
        err = Exception.__new__(cls)
        e.DiskrsyncError.__init__(err, "boom")
        raise err

    assert _run(fail) == cls.exit_code
    assert capsys.readouterr().err == "diskrsync: boom\n"


@pytest.mark.parametrize(("exc", "code"), [(KeyboardInterrupt, 130), (e.Terminated, 143)])
def test_cli_signal_ends(exc: type[BaseException], code: int,
                         capsys: pytest.CaptureFixture[str]) -> None:
    def fail() -> int:
        raise exc()

    assert _run(fail) == code
    assert capsys.readouterr().err.startswith("diskrsync: ")


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_error_from_a_peer_keeps_its_category(cls: type[e.DiskrsyncError]) -> None:
    err = e.error_from_wire(cls.__name__, "host: it broke")
    # the peer's own failures (I/O on its side) are the peer's to fix: exit 5
    want = e.PeerError if category(cls) is e.LocalError else category(cls)
    assert type(err) is want
    assert err.exit_code == want.exit_code
    assert err.message == "host: it broke" and err.relayed


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_error_from_the_mount_daemon_keeps_its_category_and_code(
    cls: type[e.DiskrsyncError],
) -> None:
    err = e.error_from_wire(cls.__name__, "it broke", from_peer=False, exit_code=cls.exit_code)
    assert type(err) is category(cls) and err.exit_code == cls.exit_code
    assert not err.relayed
    line = f"ERROR {cls.exit_code} {cls.__name__} it broke"
    again = diskrsync.fsmount.mount.reported_error(line)
    assert type(again) is category(cls) and again.exit_code == cls.exit_code


def test_unknown_error_from_the_wire() -> None:
    assert type(e.error_from_wire("ErrorOfANewerRelease", "x")) is e.PeerError
    child = e.error_from_wire("ErrorOfANewerRelease", "x", from_peer=False, exit_code=7)
    assert type(child) is e.DiskrsyncError and child.exit_code == 7


def test_generation_gone_is_a_usage_error() -> None:
    # a class outside base/errors.py, found by name like the rest
    gone = diskrsync.compression.image.GenerationGoneError
    assert type(e.error_from_wire(gone.__name__, "x")) is e.UsageError
