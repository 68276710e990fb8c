"""Shared test set-up: make tests/support and the development tools in scripts/ importable
(import mode is importlib), check every test's tier marker (support/tiers.py), and keep
hypothesis from timing examples: no test asserts on wall-clock time."""

import os
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))

from support.tiers import pytest_collection_modifyitems  # noqa: F401  (a hook)

# what a client remembers of encrypted images (rollback detection) stays out of $HOME, also
# in the children tests start
os.environ.setdefault("DISKRSYNC_STATE_DIR", tempfile.mkdtemp(prefix="diskrsync-state-"))

settings.register_profile("diskrsync", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("diskrsync")
