"""``python -m diskrsync.cli``: the same as the ``diskrsync`` command."""

import sys

from diskrsync.cli.main import main

sys.exit(main())
