"""Building outage mode: where the journal lives (the state directory, chosen as the
certificates' one is), and a journal that cannot be used (one log line; local answers go on)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.errors import ConfigError
from trackingproxy.outage import OutageSettings, build_outage, journal_directory
from trackingproxy.outage.records import JournaledRequest
from trackingproxy.outage.writer import blocking_now


def settings(tmp: Path, state: Path | None = None, **kw: Any) -> OutageSettings:
    return OutageSettings(
        remember_links=10, journal_ttl=3600.0, journal_max_bytes=1 << 20,
        state_dir=state, default_dir=kw.get("default", tmp / "default"),
        fallback_dir=kw.get("fallback", tmp / "fallback"),
    )


class NoUpstream:
    def request(self, *args: Any) -> Any:
        raise AssertionError("not used")


class Where(SynchronousTestCase):
    def test_the_journal_lives_in_the_state_directory(self) -> None:
        """--state-dir DIR: DIR/outage; without it the default, else the fallback directory."""
        tmp = Path(self.mktemp())
        self.assertEqual(journal_directory(settings(tmp, tmp / "s")), tmp / "s" / "outage")
        self.assertEqual(journal_directory(settings(tmp)), tmp / "default" / "outage")
        blocked = tmp / "blocked"
        blocked.write_text("a file, not a directory")
        self.assertEqual(
            journal_directory(settings(tmp, default=blocked / "x")), tmp / "fallback" / "outage"
        )

    def test_no_writable_directory_is_one_line_naming_the_fix(self) -> None:
        """An unusable --state-dir (or no usable default) stops start-up with one line."""
        tmp = Path(self.mktemp())
        tmp.mkdir()
        blocked = tmp / "blocked"
        blocked.write_text("x")
        with self.assertRaises(ConfigError) as raised:
            journal_directory(settings(tmp, blocked / "state"))
        self.assertIn("--state-dir", raised.exception.message)
        with self.assertRaises(ConfigError) as raised:
            journal_directory(settings(tmp, default=blocked / "a", fallback=blocked / "b"))
        self.assertIn("pass --state-dir", raised.exception.message)


class Unusable(SynchronousTestCase):
    def test_a_journal_that_cannot_be_opened_is_one_line_and_answers_go_on(self) -> None:
        """The journal directory holds a non-file where the journal should be: one error line
        (no traceback) at start; nothing is journaled, the service still stops cleanly."""
        tmp = Path(self.mktemp())
        clock = Clock()
        outage = build_outage(settings(tmp, tmp / "state"), clock, NoUpstream(), lambda: {"x"},
                              run=blocking_now)
        (tmp / "state" / "outage").mkdir(parents=True)
        (tmp / "state" / "outage" / "journal-0").mkdir()  # a directory: cannot be read
        with capturedLogs() as events:
            outage.service.startService()
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertNotIn("log_failure", errors[0])
        self.assertFalse(outage.journal.available)
        self.assertFalse(outage.journal.add(
            JournaledRequest(b"GET", "x", b"/q/1", "192.0.2.1", None, b"https", 0.0)
        ))
        self.successResultOf(outage.service.stopService())
        self.assertEqual(outage.status()["journal"]["available"], False)

    def test_status_says_what_outage_mode_sees(self) -> None:
        """status(): the upstream as seen, the journal's size and age, links and counters."""
        tmp = Path(self.mktemp())
        clock = Clock()
        outage = build_outage(settings(tmp, tmp / "state"), clock, NoUpstream(), lambda: {"x"},
                              run=blocking_now)
        outage.service.startService()
        self.addCleanup(outage.service.stopService)
        outage.journal.add(JournaledRequest(b"GET", "x", b"/q/1", "192.0.2.1", None, b"https", 0))
        clock.advance(5)
        status = outage.status()
        self.assertEqual(
            (status["mode"], status["upstream"], status["journal"]["entries"],
             status["journal"]["oldest_age_seconds"]),
            ("replay", "up", 1, 5.0),
        )
        self.assertEqual(os.stat(status["journal"]["path"]).st_mode & 0o777, 0o600)
        self.assertNotIn("/q/1", repr(status))
