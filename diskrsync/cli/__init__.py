"""The command line (the top layer): parser and dispatch in ``main``, one module per command
group. ``main`` is re-exported as the console entry point ``diskrsync.cli:main``."""

from diskrsync.cli.main import main

__all__ = ["main"]
