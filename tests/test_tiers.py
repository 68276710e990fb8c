"""The tier check itself (support/tiers.py): a test without exactly one tier fails collection."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.inproc  # runs pytest in this process over temporary files

pytest_plugins = ["pytester"]

MARKERS = "[pytest]\nmarkers =\n    pure: x\n    inproc: x\n    process: x\n    slow: x\n"


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makeini(MARKERS)
    pytester.makepyfile(test_sample=source)
    return pytester.runpytest("-p", "support.tiers", *args)


def test_a_test_without_a_tier_fails_collection(pytester: pytest.Pytester) -> None:
    r = _run(pytester, """
import pytest

@pytest.mark.pure
def test_marked(): pass

@pytest.mark.slow
def test_forgotten(): pass
""", "-m", "pure")  # even when -m would deselect it
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    err = r.stderr.str()
    assert "test_sample.py::test_forgotten: no tier" in err
    assert "test_marked" not in err


def test_two_tiers_fail_collection(pytester: pytest.Pytester) -> None:
    r = _run(pytester, """
import pytest

pytestmark = pytest.mark.inproc

@pytest.mark.process
def test_both(): pass
""")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "test_sample.py::test_both: inproc, process" in r.stderr.str()


def test_one_tier_each_runs(pytester: pytest.Pytester) -> None:
    r = _run(pytester, """
import pytest

@pytest.mark.pure
def test_marked(): pass

class TestGroup:
    pytestmark = pytest.mark.inproc

    def test_from_the_class(self): pass
""")
    r.assert_outcomes(passed=2)
