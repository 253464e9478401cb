"""Replaying the journal, on a fake clock with an upstream spy: probing until the upstream
answers, re-sending oldest first at the paced rate with the original request's fields, stopping
at the first failure, and never sending an entry twice (ambiguous failures, crashes)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.journal import Journal
from trackingproxy.outage.links import RememberedLinks
from trackingproxy.outage.records import JournaledRequest
from trackingproxy.outage.replay import PROBE_INTERVAL, PROBE_TARGET, Replayer
from trackingproxy.outage.writer import blocking_now, open_journal_file
from trackingproxy.upstream.errors import UpstreamConnectFailed, UpstreamReset

HOST = "click.example.com"


@define
class Answer:
    code: int
    raw_headers: list[tuple[bytes, bytes]] = field(factory=list)

    def deliverBody(self, protocol: Any) -> None:
        pass


@define
class Sent:
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    at: float
    answer: Deferred[Any]


@define
class SenderSpy:
    clock: Clock
    sent: list[Sent] = field(factory=list)

    def request(self, method: bytes, path: bytes, headers: Any, body: bytes | None) -> Any:
        d: Deferred[Any] = Deferred()
        self.sent.append(Sent(method, path, list(headers), self.clock.seconds(), d))
        return d

    def unanswered(self) -> list[Sent]:
        return [s for s in self.sent if not s.answer.called]

    def paths(self) -> list[bytes]:
        return [s.path for s in self.sent]


def failed_before_write() -> Failure:
    return Failure(UpstreamConnectFailed("refused", written=False))


class ReplayCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.clock = Clock()
        self.counters = OutageCounters()
        self.spy = SenderSpy(self.clock)
        self.links = RememberedLinks(self.clock, 100)
        self.open()

    def open(self) -> None:
        self.journal = Journal(
            lambda: open_journal_file(self.dir), self.clock, blocking_now, self.counters,
            ttl=3600.0, max_bytes=1 << 20,
        )
        self.journal.open()
        self.replayer = Replayer(
            self.clock, self.spy, self.journal, self.counters, self.links, lambda: {HOST},
        )
        self.replayer.start()

    def tearDown(self) -> None:
        self.replayer.stop()
        self.journal.close()

    def journal_requests(self, count: int, ua: bytes | None = b"Mail/1") -> None:
        for n in range(count):
            self.journal.add(JournaledRequest(
                b"GET", HOST, f"/q/open-{n}?x={n}".encode(), f"203.0.113.{n}", ua, b"https",
                self.clock.seconds(),
            ))
        self.replayer.upstream_failed()

    def recover(self) -> None:
        """Let the next probe go out and answer it."""
        self.clock.advance(PROBE_INTERVAL)
        probe = self.spy.sent[-1]
        self.assertEqual(probe.path, PROBE_TARGET)
        probe.answer.callback(Answer(404))

    def answer_all(self, code: int = 200) -> None:
        """Answer every replay as it goes out, until none is left."""
        while True:
            waiting = [s for s in self.spy.unanswered() if s.path != PROBE_TARGET]
            if not waiting:
                if self.replayer.replaying:
                    self.clock.advance(0.05)
                    continue
                return
            for s in waiting:
                s.answer.callback(Answer(code))


class Probing(ReplayCase):
    def test_nothing_is_probed_while_the_journal_is_empty(self) -> None:
        """A failure with nothing journaled sends no probe (SparkPost sees no extra request)."""
        self.replayer.upstream_failed()
        self.clock.advance(PROBE_INTERVAL * 3)
        self.assertEqual(self.spy.sent, [])

    def test_probes_repeat_until_the_upstream_answers(self) -> None:
        """GET /f/a/b/c/d with the entries' Host every 5 s while it fails; a 503 counts as
        down; any other answer starts the replay."""
        self.journal_requests(1)
        self.assertEqual(self.spy.sent, [])
        self.clock.advance(PROBE_INTERVAL)
        first = self.spy.sent[0]
        self.assertEqual((first.method, first.path), (b"GET", PROBE_TARGET))
        self.assertIn((b"host", HOST.encode()), first.headers)
        first.answer.errback(failed_before_write())
        self.clock.advance(PROBE_INTERVAL)
        self.spy.sent[1].answer.callback(Answer(503))
        self.clock.advance(PROBE_INTERVAL)
        self.spy.sent[2].answer.callback(Answer(302, [(b"Location", b"https://x.example/")]))
        self.assertEqual(self.spy.paths()[3:], [b"/q/open-0?x=0"])
        self.assertEqual(self.replayer.state, "replaying")

    def test_a_live_answer_probes_at_once(self) -> None:
        """While down, the first live request that gets an answer triggers a probe now."""
        self.journal_requests(1)
        self.clock.advance(1)
        self.replayer.upstream_answered()
        self.clock.advance(0)
        self.assertEqual(self.spy.paths(), [PROBE_TARGET])

    def test_entries_left_from_before_are_probed_for_at_start(self) -> None:
        """A journal reopened with pending entries starts with a probe at once."""
        self.journal_requests(2)
        self.replayer.stop()
        self.journal.close()
        self.open()
        self.clock.advance(0)
        self.assertEqual(self.spy.paths(), [PROBE_TARGET])


class Replaying(ReplayCase):
    def test_each_entry_is_resent_with_its_original_fields(self) -> None:
        """Method, Host, path and query, X-Forwarded-For (the client), User-Agent,
        X-Forwarded-Proto and -Host, and no body."""
        self.journal_requests(1)
        self.journal_requests(1, ua=None)
        self.recover()
        replays = [s for s in self.spy.sent if s.path != PROBE_TARGET]
        self.assertEqual(replays[0].method, b"GET")
        self.assertEqual(replays[0].path, b"/q/open-0?x=0")
        self.assertEqual(
            replays[0].headers,
            [
                (b"user-agent", b"Mail/1"),
                (b"host", HOST.encode()),
                (b"x-forwarded-for", b"203.0.113.0"),
                (b"x-forwarded-proto", b"https"),
                (b"x-forwarded-host", HOST.encode()),
            ],
        )
        self.answer_all()
        second = [s for s in self.spy.sent if s.path != PROBE_TARGET][1]
        self.assertNotIn(b"user-agent", [name for name, _ in second.headers])

    def test_oldest_first_at_the_paced_rate(self) -> None:
        """20 per second at most, 4 in flight at most, in journal order; each entry once."""
        self.journal_requests(10)
        self.recover()
        self.assertEqual(len(self.spy.unanswered()), 1)  # the rest wait for their slot
        self.clock.advance(0.05)
        self.clock.advance(0.05)
        self.clock.advance(0.05)
        self.assertEqual(len(self.spy.unanswered()), 4)
        self.clock.advance(0.05)
        self.assertEqual(len(self.spy.unanswered()), 4)  # concurrency: none starts
        self.answer_all()
        replays = [s for s in self.spy.sent if s.path != PROBE_TARGET]
        self.assertEqual([s.path for s in replays], [f"/q/open-{n}?x={n}".encode() for n in range(10)])
        starts = [s.at for s in replays]
        self.assertTrue(all(b - a >= 0.05 - 1e-9 for a, b in itertools.pairwise(starts)))
        self.assertEqual((self.counters.replayed, len(self.journal)), (10, 0))
        self.assertEqual(self.replayer.state, "up")

    def test_the_first_failure_stops_the_replay_and_the_entry_waits(self) -> None:
        """A replay that provably never left is pending again; the replay stops, probing
        resumes, and after recovery it is sent (once more, its first real send)."""
        self.journal_requests(3)
        self.recover()
        self.spy.unanswered()[0].answer.errback(failed_before_write())
        self.assertEqual(self.replayer.state, "down")
        self.clock.advance(1)  # no replay starts while down
        self.assertEqual([s.path for s in self.spy.sent].count(b"/q/open-1?x=1"), 0)
        self.recover()
        self.answer_all()
        replays = [s.path for s in self.spy.sent if s.path != PROBE_TARGET]
        self.assertEqual(replays.count(b"/q/open-0?x=0"), 2)  # failed before write, then sent
        self.assertEqual((self.counters.replayed, len(self.journal)), (3, 0))

    def test_a_replay_cut_after_it_was_written_is_never_sent_again(self) -> None:
        """A reset after the write: maybe seen, so given up (counted ambiguous), not resent."""
        self.journal_requests(2)
        self.recover()
        self.spy.unanswered()[0].answer.errback(Failure(UpstreamReset("reset")))
        self.assertEqual(self.counters.ambiguous, 1)
        self.recover()
        self.answer_all()
        replays = [s.path for s in self.spy.sent if s.path != PROBE_TARGET]
        self.assertEqual(replays, [b"/q/open-0?x=0", b"/q/open-1?x=1"])
        self.assertEqual((self.counters.replayed, len(self.journal)), (1, 0))

    def test_a_503_answer_keeps_the_entry(self) -> None:
        """SparkPost answering 503 to a replay: pending again, replay stopped."""
        self.journal_requests(1)
        self.recover()
        self.spy.unanswered()[0].answer.callback(Answer(503))
        self.assertEqual((len(self.journal), self.replayer.state), (1, "down"))

    def test_a_crash_while_sending_drops_the_entry_instead_of_resending_it(self) -> None:
        """The process dies while a replay is in flight: at the next start that entry is given
        up (counted as crash), the others are re-sent; the crashed one went out once only."""
        self.journal_requests(3)
        self.recover()
        in_flight = self.spy.unanswered()[0]
        self.replayer.stop()
        for timer in (self.journal._flush_timer, self.journal._sweep_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.journal._file.close()  # killed: nothing more is written
        self.journal._file = None
        in_flight.answer.callback(Answer(200))  # whatever came back is not recorded
        self.open()
        self.assertEqual(self.counters.dropped["crash"], 1)
        self.clock.advance(0)
        self.spy.sent[-1].answer.callback(Answer(404))  # the start-up probe
        self.answer_all()
        replays = [s.path for s in self.spy.sent if s.path != PROBE_TARGET]
        self.assertEqual(sorted(replays), [b"/q/open-0?x=0", b"/q/open-1?x=1", b"/q/open-2?x=2"])

    def test_replayed_redirects_are_remembered(self) -> None:
        """A click re-sent and answered with a redirect is learned for later outages."""
        self.journal.add(JournaledRequest(b"GET", HOST, b"/f/c1", "203.0.113.1", None, b"https",
                                          0.0))
        self.replayer.upstream_failed()
        self.recover()
        self.spy.unanswered()[0].answer.callback(
            Answer(302, [(b"Location", b"https://www.example.com/")])
        )
        self.assertEqual(self.links.recall(HOST, b"/f/c1"), (302, b"https://www.example.com/"))

    def test_stopping_leaves_no_timer_behind(self) -> None:
        """After stop() nothing is probed or sent any more."""
        self.journal_requests(2)
        self.replayer.stop()
        self.clock.advance(PROBE_INTERVAL * 2)
        self.assertEqual(self.spy.sent, [])
        self.assertEqual([c for c in self.clock.getDelayedCalls() if "Replayer" in repr(c)], [])
