"""The command line itself: options spelled out, unknown words refused with suggestions where
they stand, hidden commands hidden, the exit codes in --help, and what -v adds to a push."""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
from collections.abc import Iterator
from pathlib import Path

import docgen
import pytest

from diskrsync import __version__
from diskrsync.base.errors import EXIT_CODES
from diskrsync.cli.main import build_parser, main


def parse(*argv: str) -> tuple[int | None, str, argparse.Namespace | None]:
    """(exit status or None, what the parser printed, the namespace when it parsed)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            ns = build_parser().parse_args(list(argv))
    except SystemExit as e:
        return int(e.code or 0), out.getvalue(), None
    return None, out.getvalue(), ns


def subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subs.choices)


@pytest.mark.pure
def test_no_parser_accepts_abbreviations() -> None:
    assert not build_parser().allow_abbrev
    assert all(not sp.allow_abbrev for sp in subparsers().values())


@pytest.mark.parametrize(("argv", "word", "meant"), [
    (["push", "--ke", "3", "a", "b"], "--ke", "--keep"),
    (["push", "--dry", "a", "b"], "--dry", "--dry-run"),
    (["verify", "--rep", "x"], "--rep", "--repair"),
])
@pytest.mark.pure
def test_abbreviated_option_is_refused_with_a_suggestion(argv: list[str], word: str,
                                                         meant: str) -> None:
    """Regression: `--ke 3 --dry` ran as `--keep 3 --dry-run`."""
    code, text, _ = parse(*argv)
    assert code == 2
    assert f"unknown option {word} (did you mean {meant}?)" in text


@pytest.mark.pure
def test_unknown_option_is_refused_before_positionals_are_assigned() -> None:
    """Regression: `push --kep 3 SRC DST` took 3 for SRC and complained about DST."""
    code, text, _ = parse("push", "--kep", "3", "SRC", "DST")
    assert code == 2
    assert "unknown option --kep (did you mean --keep?)" in text
    assert "unrecognized arguments" not in text and "DST" not in text.splitlines()[-1]
    code, text, _ = parse("push", "--kep=3", "SRC", "DST")
    assert code == 2 and "unknown option --kep (did you mean --keep?)" in text


@pytest.mark.pure
def test_unknown_option_before_the_command() -> None:
    code, text, _ = parse("--verison", "info", "x")
    assert code == 2 and "unknown option --verison (did you mean --version?)" in text


@pytest.mark.pure
def test_too_many_arguments() -> None:
    code, text, _ = parse("info", "a", "b", "c")
    assert code == 2 and "too many arguments: b c" in text


@pytest.mark.pure
def test_unknown_command_gets_a_suggestion_and_the_list() -> None:
    code, text, _ = parse("pusj", "a", "b")
    assert code == 2
    assert "unknown command 'pusj' (did you mean push?)" in text
    assert "info, verify, restore, prune, push, mount, umount, convert" in text


@pytest.mark.pure
def test_serve_is_hidden_and_still_runs() -> None:
    """Regression: the refusal of an unknown command offered `serve`."""
    code, text, _ = parse("frobnicate")
    assert code == 2 and "serve" not in text
    code, text, _ = parse("serv")
    assert code == 2 and "serve" not in text  # never suggested either
    code, text, _ = parse("--help")
    assert code == 0 and "serve" not in text
    for kind in docgen.GENERATORS:
        assert "serve" not in docgen.generate(kind).replace("served", ""), kind
    code, _, ns = parse("serve", "--target", "/b/x.spgz", "--keep", "3")
    assert code is None and ns is not None and ns.func == "serve:cmd_serve" and ns.keep == 3


@pytest.mark.parametrize("flag", ["--version", "-V"])
@pytest.mark.pure
def test_version(flag: str) -> None:
    code, text, _ = parse(flag)
    assert code == 0 and text.strip() == f"diskrsync {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["push", "--help"], ["umount", "--help"]])
@pytest.mark.pure
def test_help_lists_every_exit_code(argv: list[str]) -> None:
    code, text, _ = parse(*argv)
    assert code == 0
    epilog = text[text.index("exit status:"):]
    for status, meaning in EXIT_CODES:
        assert f"{status:>3}  {meaning.split()[0]}" in epilog


@pytest.mark.pure
def test_short_flags_still_combine() -> None:
    code, _, ns = parse("push", "-qn", "-g2", "a", "b")
    assert code is None and ns is not None
    assert ns.quiet and ns.dry_run and ns.generation == 2 and (ns.src, ns.dst) == ("a", "b")


@pytest.mark.parametrize("flag", ["--raw-target", "--no-compress"])
@pytest.mark.pure
def test_raw_target_and_its_old_name(flag: str) -> None:
    code, _, ns = parse("push", flag, "a", "b")
    assert code is None and ns is not None and ns.no_compress


@pytest.mark.pure
def test_man_page_umount() -> None:
    """Regression: the man page gave umount `[OPTIONS]` and called its argument "an empty
    directory"."""
    page = docgen.generate("man")
    section = page[page.index(".SS umount"):page.index(".SS convert")]
    assert "OPTIONS" not in section and "empty directory" not in section
    assert "[OPTIONS]" in page[page.index(".SS mount"):page.index(".SS umount")]


# -- push -v -------------------------------------------------------------------------------


@pytest.fixture
def _keep_sigterm() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.usefixtures("_keep_sigterm")
@pytest.mark.inproc
def test_push_verbose_says_what_happened(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: `push -v` was accepted and printed nothing more."""
    src, img = tmp_path / "disk.img", tmp_path / "disk.spgz"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, 8 chunks
    assert main(["push", "-q", str(src), str(img)]) == 0
    with open(src, "r+b") as f:
        f.seek(3 * 128 * 1024)
        f.write(b"changed")
    capsys.readouterr()
    assert main(["push", "-v", str(src), str(img)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("generation 2, ")
    assert "  differs: bytes 393216-524287" in out
    assert any(line.startswith("compared: ") and "1 chunks" in line for line in out)
    assert f"target:   {img}: wrote 1 chunks, committed generation 2 in " in "\n".join(out)
    phases = next(line for line in out if line.startswith("phases:"))
    for phase in ("connect", "compare", "drain", "commit"):
        assert phase in phases
    capsys.readouterr()
    assert main(["push", str(src), str(img)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # without -v: the one line
