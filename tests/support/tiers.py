"""Every test says how much of the machine it needs: exactly one tier marker.

* ``pure``: logic only: no files, processes or threads beyond the test's own (hypothesis is
  fine);
* ``inproc``: in this process: temporary files, threads, in-memory channels;
* ``process``: real processes: FUSE mounts, sshd, loop devices, child processes.

``make test-fast`` runs ``pure`` and ``inproc`` (minus ``slow``), so a test that forgets its tier
would silently fall out of it, or a slow one in: collection fails instead. ``slow``, ``fuse``,
``ssh`` and ``root`` are extra facets on top of a tier. tests/conftest.py loads this plugin.
"""

from __future__ import annotations

import pytest

TIERS = ("pure", "inproc", "process")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects anything: every test is checked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            "each test needs exactly one tier marker (pytest.mark.pure, inproc or process; "
            "see tests/support/tiers.py):\n" + "\n".join(wrong))
