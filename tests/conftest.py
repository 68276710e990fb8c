"""Shared test set-up: make tests/support importable (import mode is importlib)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
