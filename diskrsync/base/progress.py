"""Progress on a terminal: the sink long operations report bytes to."""

from __future__ import annotations

import sys
from typing import Any

from diskrsync.base.units import human


class Progress:
    """A tqdm bar on a terminal, nothing otherwise (logs and cron mails stay clean)."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                            unit_divisor=1024, leave=False, file=sys.stderr)

    def update(self, n: int, sent: int | None = None) -> None:
        """Advance by ``n`` bytes (read or written); ``sent``: bytes sent so far (pushes)."""
        if self.bar is not None:
            if sent is not None:
                self.bar.set_postfix_str(f"sent {human(sent)}", refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
