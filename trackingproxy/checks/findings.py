"""What a check reports: one `Finding` per fact, printed as one line that carries its own fix."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from attrs import frozen


class Level(enum.Enum):
    """OK: as it should be. WARN: works now, needs attention soon. FAIL: broken.
    SKIP: not checked (disabled, or an earlier failure makes the answer meaningless)."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@frozen
class Finding:
    """One line of the report: `level`, what was checked (`kind`), the text, and the fix."""

    level: Level
    kind: str
    text: str
    fix: str = ""

    def line(self) -> str:
        """e.g. `FAIL cert click.example.com: expires in 3 days; renewal is failing: ...`."""
        fix = f"; {self.fix}" if self.fix else ""
        return f"{self.level.value:<4} {self.kind:<4} {self.text}{fix}"


def exit_status(findings: Iterable[Finding]) -> int:
    """0 when all is well, 1 when any finding is FAIL or WARN (so a cron job notices)."""
    return 1 if any(f.level in (Level.FAIL, Level.WARN) for f in findings) else 0


__all__ = ["Finding", "Level", "exit_status"]
