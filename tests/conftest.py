"""Shared test set-up: make tests/support and the development tools in scripts/ importable
(import mode is importlib)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
