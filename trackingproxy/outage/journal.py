# -*- test-case-name: tests.outage.test_journal -*-
"""The replay journal: requests that provably never reached SparkPost, kept until they are
re-sent once, expire (``ttl``) or are pushed out by newer ones (``max_bytes``).

The entries live in memory (in arrival order) and in an append-only file (`records` says the
format, `writer` does the file operations off the reactor thread). On the request path `add`
only encodes one line and appends it to a buffer; the buffer is written and fsynced every
``flush_delay`` (0.2 s) by one blocking call in the thread pool. A crash can lose what was
buffered and not yet written: those requests are lost, never duplicated.

At most once: `mark_sending` writes the entry's ``sending`` record and fsyncs it before the
Deferred it returns fires; only then may the caller send the request. `sent` (answered) and
`forget` (maybe sent, no answer) end the entry; `unsent` (provably not sent) makes it pending
again. After a crash an entry still marked sending is given up, never sent again.

Bounds: the pending entries' records stay within ``max_bytes`` (when a new one would not fit,
the oldest are dropped down to 90 % of it, and counted); the file is rewritten with only the
live entries (compaction) whenever it would grow past ``max_bytes``, once it is more than twice
their size, after entries expired, and once the journal is empty (so sent requests do not
linger on disk). Memory: the entries' records plus about 150 bytes each.

Opening (at start-up, in `open`) reads the file, drops what a crash left marked sending and what
expired, and rewrites it: one synchronous read and write of at most ``max_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.records import (
    HEADER,
    JournaledRequest,
    add_record,
    decode_add,
    mark_record,
    parse,
)
from trackingproxy.outage.writer import JournalFile, Run, SerialRunner

__all__ = ["FLUSH_DELAY", "SWEEP_INTERVAL", "Entry", "Journal"]

log = Logger(namespace="trackingproxy.outage")

FLUSH_DELAY: Final = 0.2
SWEEP_INTERVAL: Final = 60.0
_COMPACT_MIN: Final = 1024 * 1024  # below this the file is not rewritten just for its garbage


class Entry:
    """One journaled request: its id, arrival time, its ``a`` record line, and whether it is
    being sent now."""

    __slots__ = ("id", "line", "sending", "time")

    def __init__(self, entry_id: int, time: float, line: bytes) -> None:
        self.id = entry_id
        self.time = time
        self.line = line
        self.sending = False

    def request(self) -> JournaledRequest:
        return decode_add(self.line)


class Journal:
    """See the module docstring.

    @ivar _entries: id -> entry, oldest first (pending and being sent).
    @ivar _live: bytes of the entries' records (bounded by ``max_bytes``).
    @ivar _file_bytes: bytes in the file, as written (and being written).
    @ivar _buffer: record lines not yet handed to the writer.
    """

    def __init__(
        self,
        opener: Callable[[], JournalFile],
        clock: IReactorTime,
        run: Run,
        counters: OutageCounters,
        *,
        ttl: float,
        max_bytes: int,
        flush_delay: float = FLUSH_DELAY,
        sweep_interval: float = SWEEP_INTERVAL,
    ) -> None:
        self._opener = opener
        self._clock = clock
        self._runner = SerialRunner(run)
        self._counters = counters
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._flush_delay = flush_delay
        self._sweep_interval = sweep_interval
        self._file: JournalFile | None = None
        self._entries: dict[int, Entry] = {}
        self._next_id = 1
        self._live = 0
        self._file_bytes = 0
        self._buffer: list[bytes] = []
        self._compact = False
        self._flush_timer: IDelayedCall | None = None
        self._sweep_timer: IDelayedCall | None = None
        self._failing = False
        self._closing = False

    # -- facts ----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether requests are being journaled (the file is open)."""
        return self._file is not None

    @property
    def path(self) -> Path | None:
        return None if self._file is None else self._file.path

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def file_bytes(self) -> int:
        return self._file_bytes

    def oldest(self) -> float | None:
        """Arrival time of the oldest entry, if any."""
        for entry in self._entries.values():
            return entry.time
        return None

    # -- opening and closing --------------------------------------------------------------
    def open(self) -> None:
        """Lock and read the file, give up what a crash left marked sending and what expired,
        rewrite it (synchronously: at start-up). Raises OSError if the file cannot be used."""
        journal = self._opener()
        try:
            parsed = parse(journal.read())
            now = self._clock.seconds()
            crash = len(parsed.given_up)
            expired = 0
            for entry_id, (time, line) in parsed.entries.items():
                if now - time >= self.ttl:
                    expired += 1
                    continue
                self._entries[entry_id] = Entry(entry_id, time, line)
                self._live += len(line)
            self._next_id = parsed.last_id + 1
            size = self._make_room(0)
            data = self._snapshot()
            journal.rewrite(data)
        except BaseException:
            journal.close()
            self._entries.clear()
            self._live = 0
            raise
        self._file = journal
        self._file_bytes = len(data)
        self._compact = False
        self._counters.dropped["crash"] += crash
        self._counters.dropped["ttl"] += expired
        if parsed.damaged:
            log.warn(
                "Outage journal {path}: {damaged} damaged record(s); the {crash} request(s) "
                "journaled before them are given up (maybe sent: never sent twice)",
                path=str(journal.path), damaged=parsed.damaged, crash=crash,
            )
        elif crash:
            log.info(
                "Outage journal {path}: {crash} request(s) were being sent when the process "
                "stopped; given up (maybe sent: never sent twice)",
                path=str(journal.path), crash=crash,
            )
        if self._entries or expired or size:
            log.info(
                "Outage journal {path}: {count} request(s) waiting to be re-sent "
                "({expired} expired, {size} over the size limit)",
                path=str(journal.path), count=len(self._entries), expired=expired, size=size,
            )
        self._closing = False
        self._sweep_timer = self._clock.callLater(self._sweep_interval, self._sweep)

    def close(self) -> Deferred[None]:
        """Once the writes under way are done (and their callers have heard of them), write
        what is buffered, close the file and release its lock; fires when done (never fails:
        a failed write is logged). Nothing is journaled afterwards."""
        self._closing = True
        for timer in (self._flush_timer, self._sweep_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._flush_timer = self._sweep_timer = None
        if self._file is None:
            return succeed(None)

        def final(_: object) -> Deferred[None]:
            journal = self._file
            if journal is None:
                return succeed(None)
            done = self._flush()
            done.addErrback(lambda _: None)
            self._file = None
            closed = self._runner.submit(journal.close)
            closed.addErrback(
                lambda f: log.warn("Outage journal: closing failed: {e}", e=f.getErrorMessage())
            )
            return done.addCallback(lambda _: closed)

        return self._runner.submit(lambda: None).addBoth(final)

    # -- the request path -----------------------------------------------------------------
    def add(self, request: JournaledRequest) -> bool:
        """Journal ``request`` (buffered); False when the journal is not open."""
        if self._file is None:
            return False
        entry_id = self._next_id
        self._next_id += 1
        line = add_record(entry_id, request)
        if self._make_room(len(line)) < 0:
            self._counters.dropped["size"] += 1  # bigger than the whole journal
            return False
        self._entries[entry_id] = Entry(entry_id, request.time, line)
        self._live += len(line)
        self._counters.journaled += 1
        self._write(line)
        return True

    def _make_room(self, needed: int) -> int:
        """Drop the oldest entries not being sent until ``needed`` more bytes fit (down to
        90 % of the limit, so the file is not rewritten for every new entry); how many were
        dropped, or -1 if ``needed`` cannot fit at all."""
        if self._live + needed <= self.max_bytes:
            return 0
        if needed > self.max_bytes:
            return -1
        goal = int(self.max_bytes * 0.9) - needed
        victims = []
        live = self._live
        for entry in self._entries.values():
            if live <= goal:
                break
            if not entry.sending:
                victims.append(entry)
                live -= len(entry.line)
        for entry in victims:
            self._drop(entry, "size")
        return len(victims) if self._live + needed <= self.max_bytes else -1

    # -- replaying ------------------------------------------------------------------------
    def next_pending(self) -> Entry | None:
        """The oldest entry neither being sent nor expired (expired ones met are dropped)."""
        cutoff = self._clock.seconds() - self.ttl
        expired = []
        found = None
        for entry in self._entries.values():
            if entry.sending:
                continue
            if entry.time <= cutoff:
                expired.append(entry)
                continue
            found = entry
            break
        for entry in expired:
            self._drop(entry, "ttl")
        return found

    def mark_sending(self, entry: Entry) -> Deferred[None]:
        """Mark ``entry`` sending; fires once that is on disk (fsynced), fails if it could not
        be written: then the request must not be sent."""
        if self._file is None or entry.id not in self._entries:
            return _closed()
        entry.sending = True
        self._buffer.append(mark_record("s", entry.id))
        return self._flush()

    def sent(self, entry: Entry) -> None:
        """``entry`` was sent and answered: it is done."""
        self._end(entry)

    def forget(self, entry: Entry) -> None:
        """``entry`` was sent but got no answer (maybe seen): done, never sent again."""
        self._end(entry)

    def unsent(self, entry: Entry) -> None:
        """``entry`` provably did not reach the upstream: pending again, in its place."""
        if self._file is None or self._entries.get(entry.id) is not entry:
            return
        entry.sending = False
        self._write(mark_record("u", entry.id))

    def _end(self, entry: Entry) -> None:
        if self._file is None or self._remove(entry) is None:
            return
        self._write(mark_record("d", entry.id))

    # -- bookkeeping ----------------------------------------------------------------------
    def _remove(self, entry: Entry) -> Entry | None:
        found = self._entries.pop(entry.id, None)
        if found is not None:
            self._live -= len(found.line)
        return found

    def _drop(self, entry: Entry, reason: str) -> None:
        """Give ``entry`` up; no record: the next compaction (soon) leaves it out."""
        if self._remove(entry) is not None:
            self._counters.dropped[reason] += 1
            self._compact = True
            self._schedule_flush()

    def _sweep(self) -> None:
        self._sweep_timer = self._clock.callLater(self._sweep_interval, self._sweep)
        cutoff = self._clock.seconds() - self.ttl
        old = []
        for entry in self._entries.values():
            if entry.time > cutoff:
                break
            if not entry.sending:
                old.append(entry)
        for entry in old:
            self._drop(entry, "ttl")

    def _write(self, line: bytes) -> None:
        self._buffer.append(line)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_timer is None and self._file is not None and not self._closing:
            self._flush_timer = self._clock.callLater(self._flush_delay, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_timer = None
        self._flush().addErrback(lambda _: None)  # logged in _failed

    def _snapshot(self) -> bytes:
        """The file as compaction writes it: the header, then each entry (and its sending
        mark)."""
        parts = [HEADER]
        for entry in self._entries.values():
            parts.append(entry.line)
            if entry.sending:
                parts.append(mark_record("s", entry.id))
        return b"".join(parts)

    def _flush(self) -> Deferred[None]:
        """Hand the buffer (or, when due, a compacted file) to the writer."""
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        journal = self._file
        lines, self._buffer = self._buffer, []
        if journal is None:
            return succeed(None)
        pending = sum(len(line) for line in lines)
        if (
            self._compact
            or self._file_bytes + pending > self.max_bytes
            or (not self._entries and self._file_bytes > len(HEADER))
            or (self._file_bytes > _COMPACT_MIN and self._file_bytes > 2 * self._live)
        ):
            self._compact = False
            data = self._snapshot()
            self._file_bytes = len(data)
            d = self._runner.submit(lambda: journal.rewrite(data))
        elif lines:
            data = b"".join(lines)
            self._file_bytes += len(data)
            d = self._runner.submit(lambda: journal.append(data))
        else:
            return succeed(None)
        return d.addCallbacks(self._written, self._failed)

    def _written(self, _: object) -> None:
        if self._failing:
            self._failing = False
            log.info("Outage journal: writing works again")

    def _failed(self, failure: Failure) -> Failure:
        self._counters.write_errors += 1
        self._compact = True  # a partial write may have been left: rewrite the file next
        if not self._failing:
            self._failing = True
            log.warn(
                "Outage journal {path}: cannot write it ({error}); journaled requests may be "
                "lost at a restart",
                path=str(self.path), error=failure.getErrorMessage(),
            )
        return failure


def _closed() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.errback(Failure(RuntimeError("the journal is closed")))
    return d
