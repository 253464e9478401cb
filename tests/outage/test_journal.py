"""The replay journal: its record format, what survives a crash (never a second send), the
TTL and size bounds, compaction, file modes, the lock, and writes off the request path."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.journal import FLUSH_DELAY, Journal
from trackingproxy.outage.records import (
    HEADER,
    JournaledRequest,
    add_record,
    decode_add,
    mark_record,
    parse,
)
from trackingproxy.outage.writer import JournalFile, blocking_now, open_journal_file

HOST = "click.example.com"


def request(n: int, at: float = 0.0, ua: bytes | None = b"Mozilla/5.0") -> JournaledRequest:
    return JournaledRequest(
        b"GET", HOST, f"/q/token-{n}?x=1".encode(), f"203.0.113.{n % 250}", ua, b"https", at
    )


class ManualRun:
    """A ``Run`` whose calls wait until the test runs them (a thread pool the test drives)."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, call: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((call, d))
        return d

    def run_all(self) -> None:
        while self.queue:
            call, d = self.queue.pop(0)
            maybeDeferred(call).chainDeferred(d)


class JournalCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()) / "outage"
        self.clock = Clock()
        self.counters = OutageCounters()
        self.journals: list[Journal] = []

    def tearDown(self) -> None:
        for journal in self.journals:
            journal.close()

    def journal(self, run: Any = blocking_now, **kw: Any) -> Journal:
        kw.setdefault("ttl", 3600.0)
        kw.setdefault("max_bytes", 1024 * 1024)
        journal = Journal(
            lambda: open_journal_file(self.dir), self.clock, run, self.counters, **kw
        )
        journal.open()
        self.journals.append(journal)
        return journal

    def crash(self, journal: Journal) -> None:
        """The process dies: nothing more is written, the lock goes away."""
        self.journals.remove(journal)
        for timer in (journal._flush_timer, journal._sweep_timer):
            if timer is not None and timer.active():
                timer.cancel()
        file: JournalFile | None = journal._file
        assert file is not None
        file.close()

    def on_disk(self, number: int = 0) -> bytes:
        return (self.dir / f"journal-{number}").read_bytes()


class Records(SynchronousTestCase):
    def test_a_request_comes_back_byte_for_byte(self) -> None:
        """Target and User-Agent bytes (obs-text included) survive the JSON record unchanged."""
        original = JournaledRequest(
            b"HEAD", HOST, b"/f/a%2Fb?q=\xe9&t=1", "2001:db8::1", b"UA \xff\x80", b"http", 12.5
        )
        line = add_record(7, original)
        self.assertTrue(line.endswith(b"\n") and line.isascii())
        self.assertEqual(decode_add(line), original)
        self.assertIsNone(decode_add(add_record(8, request(1, ua=None))).user_agent)

    def test_an_entry_marked_sending_is_given_up_when_read_back(self) -> None:
        """s without u or d: maybe sent, so given up; u makes it pending again; d ends it."""
        data = HEADER + b"".join(
            [add_record(i, request(i)) for i in (1, 2, 3)]
            + [mark_record("s", 1), mark_record("s", 2), mark_record("u", 2)]
            + [mark_record("s", 3), mark_record("d", 3)]
        )
        parsed = parse(data)
        self.assertEqual(list(parsed.entries), [2])
        self.assertEqual(parsed.given_up, {1})
        self.assertEqual(parsed.last_id, 3)

    def test_a_line_cut_by_a_crash_is_ignored(self) -> None:
        """A last line without its LF was never complete: ignored, nothing else lost."""
        data = HEADER + add_record(1, request(1)) + add_record(2, request(2))[:-10]
        parsed = parse(data)
        self.assertEqual((list(parsed.entries), parsed.torn_tail), ([1], True))

    def test_a_damaged_line_gives_up_every_entry_before_it(self) -> None:
        """A damaged record may have been a sending mark: the entries before it are given up
        (at most once), those after it are kept."""
        bad = bytearray(mark_record("s", 1))
        bad[12] ^= 0x01
        data = HEADER + add_record(1, request(1)) + bytes(bad) + add_record(2, request(2))
        parsed = parse(data)
        self.assertEqual((list(parsed.entries), parsed.given_up, parsed.damaged), ([2], {1}, 1))


class Writing(JournalCase):
    def test_appends_are_buffered_and_written_off_the_request_path(self) -> None:
        """add() only buffers; one write (and fsync) of the batch follows after the flush
        delay, in the writer (here a thread pool the test drives)."""
        run = ManualRun()
        journal = self.journal(run)
        for n in range(3):
            self.assertTrue(journal.add(request(n)))
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.on_disk(), HEADER)  # the write is queued, not done
        self.assertEqual(len(run.queue), 1)
        run.run_all()
        self.assertEqual(self.on_disk().count(b'"a":'), 3)
        self.assertEqual(self.counters.journaled, 3)

    def test_the_journal_is_private(self) -> None:
        """The file and its lock are 0600, the directory 0700."""
        journal = self.journal()
        journal.add(request(1))
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        for name in ("journal-0", "journal-0.lock"):
            self.assertEqual(stat.S_IMODE(os.stat(self.dir / name).st_mode), 0o600)

    def test_a_second_process_takes_the_next_journal(self) -> None:
        """The journal is locked: another process (or --workers child) gets journal-1."""
        first = self.journal()
        second = self.journal()
        self.assertEqual((first.path, second.path), (self.dir / "journal-0", self.dir / "journal-1"))

    def test_the_sending_mark_is_on_disk_before_the_send_may_start(self) -> None:
        """mark_sending fires only once its record was written and fsynced."""
        run = ManualRun()
        journal = self.journal(run)
        journal.add(request(1))
        entry = journal.next_pending()
        assert entry is not None
        marked = journal.mark_sending(entry)
        self.assertNoResult(marked)
        run.run_all()
        self.successResultOf(marked)
        self.assertIn(mark_record("s", entry.id), self.on_disk())
        self.assertIsNone(journal.next_pending())  # being sent: not offered again

    def test_a_failed_write_fails_the_mark_and_is_logged_once(self) -> None:
        """When the disk refuses, the mark fails (so nothing is sent) and one warning says so."""
        calls = []

        def failing(call: Callable[[], Any]) -> Deferred[Any]:
            calls.append(call)
            return maybeDeferred(lambda: (_ for _ in ()).throw(OSError(28, "No space left")))

        journal = self.journal(failing)
        journal.add(request(1))
        entry = journal.next_pending()
        assert entry is not None
        with capturedLogs() as events:
            self.failureResultOf(journal.mark_sending(entry), OSError)
            journal.unsent(entry)
            self.failureResultOf(journal.mark_sending(entry), OSError)
        self.assertEqual(self.counters.write_errors, 2)
        warnings = [e for e in events if "cannot write" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertNotIn("log_failure", warnings[0])
        self.assertNotIn("token", str(warnings[0]))


class Crashes(JournalCase):
    def test_after_a_crash_entries_marked_sending_are_dropped_never_resent(self) -> None:
        """Entry 1 was marked sending when the process died: given up (counted as crash);
        entry 2, sent and done, is gone; entry 3 is still pending."""
        journal = self.journal()
        for n in (1, 2, 3):
            journal.add(request(n))
        first = journal.next_pending()
        assert first is not None
        self.successResultOf(journal.mark_sending(first))
        second = journal.next_pending()
        assert second is not None
        self.successResultOf(journal.mark_sending(second))
        journal.sent(second)
        self.clock.advance(FLUSH_DELAY)
        self.crash(journal)
        reopened = self.journal()
        self.assertEqual(self.counters.dropped["crash"], 1)
        left = reopened.next_pending()
        assert left is not None
        self.assertEqual(left.request(), request(3))
        self.assertEqual(len(reopened), 1)

    def test_what_was_only_buffered_is_lost_not_duplicated(self) -> None:
        """An entry added but not yet written when the process dies is simply not there."""
        journal = self.journal()
        journal.add(request(1))
        self.crash(journal)
        self.assertEqual(len(self.journal()), 0)

    def test_opening_rewrites_the_file_without_what_was_dropped(self) -> None:
        """After reopening, the file holds only the entries still pending."""
        journal = self.journal()
        journal.add(request(1))
        journal.add(request(2))
        entry = journal.next_pending()
        assert entry is not None
        self.successResultOf(journal.mark_sending(entry))
        self.crash(journal)
        self.journal()
        data = self.on_disk()
        self.assertNotIn(b"token-1", data)
        self.assertIn(b"token-2", data)


class Bounds(JournalCase):
    def test_entries_older_than_the_ttl_are_dropped_and_deleted(self) -> None:
        """The periodic sweep drops expired entries (counted) and rewrites the file without
        them; an expired entry is never offered for replay."""
        journal = self.journal(ttl=100.0, sweep_interval=60.0)
        journal.add(request(1, at=0.0))
        self.clock.advance(50)
        journal.add(request(2, at=50.0))
        self.clock.advance(70)  # t=120: entry 1 expired, sweep at t=60 and t=120
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.counters.dropped["ttl"], 1)
        self.assertNotIn(b"token-1", self.on_disk())
        entry = journal.next_pending()
        assert entry is not None
        self.assertEqual(entry.request().target, b"/q/token-2?x=1")
        self.clock.advance(40)  # t=160: entry 2 expired too, met by next_pending
        self.assertIsNone(journal.next_pending())
        self.assertEqual(self.counters.dropped["ttl"], 2)

    def test_expired_entries_are_dropped_when_the_journal_is_opened(self) -> None:
        """Entries that expired while the process was down are not replayed."""
        journal = self.journal(ttl=100.0)
        journal.add(request(1, at=0.0))
        self.clock.advance(FLUSH_DELAY)
        journal.close()
        self.journals.remove(journal)
        self.clock.advance(200)
        self.assertEqual(len(self.journal(ttl=100.0)), 0)
        self.assertEqual(self.counters.dropped["ttl"], 1)

    def test_a_full_journal_drops_its_oldest_entries_and_stays_within_its_size(self) -> None:
        """Past --journal-max-bytes the oldest entries go (counted, down to 90 %); the newest
        are kept and the file never grows past the limit."""
        size = len(add_record(1, request(1)))
        limit = size * 20
        journal = self.journal(max_bytes=limit)
        for n in range(100):
            journal.add(request(n))
            self.clock.advance(FLUSH_DELAY)
            self.assertLessEqual(len(self.on_disk()), limit)
        self.assertGreater(self.counters.dropped["size"], 0)
        self.assertEqual(self.counters.dropped["size"] + len(journal), 100)
        self.assertIn(b"token-99?", self.on_disk())
        self.assertNotIn(b"token-0?", self.on_disk())

    def test_sent_requests_do_not_linger_on_disk(self) -> None:
        """Once every entry was re-sent the file is rewritten to its header alone."""
        journal = self.journal()
        for n in range(3):
            journal.add(request(n))
        while (entry := journal.next_pending()) is not None:
            self.successResultOf(journal.mark_sending(entry))
            journal.sent(entry)
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.on_disk(), HEADER)

    def test_nothing_is_journaled_when_the_file_cannot_be_used(self) -> None:
        """Before open() (or after a failed one) add() refuses, and says so."""
        journal = Journal(
            lambda: open_journal_file(self.dir), self.clock, blocking_now, self.counters,
            ttl=10.0, max_bytes=1000,
        )
        self.assertFalse(journal.add(request(1)))
        self.assertEqual(self.counters.journaled, 0)


class Stopping(JournalCase):
    def test_a_mark_in_progress_at_stop_is_settled_before_the_file_closes(self) -> None:
        """A normal stop while a sending mark is being written: its caller (the replayer,
        stopped) takes it back before the last write, so the entry waits for the next start
        instead of being given up."""
        run = ManualRun()
        journal = self.journal(run)
        journal.add(request(1))
        entry = journal.next_pending()
        assert entry is not None
        journal.mark_sending(entry).addCallback(lambda _: journal.unsent(entry))
        closed = journal.close()
        self.journals.remove(journal)
        while run.queue:
            run.run_all()
        self.successResultOf(closed)
        reopened = self.journal()
        self.assertEqual((len(reopened), self.counters.dropped["crash"]), (1, 0))
