"""Outage mode's rules for one request, through the real handler and forward with a fake
exchange and an upstream spy: local answers, what is journaled (only what provably never
reached the upstream), repeats, ambiguous failures, learning links, and no open redirect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.proxy.test_handler import DOMAIN, FakeExchange, UpstreamSpy, _Tokens
from trackingproxy.outage.answers import PIXEL, RETRY_AFTER
from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.journal import Journal
from trackingproxy.outage.links import RememberedLinks
from trackingproxy.outage.policy import REPEAT_WINDOW, OutagePolicy, classify
from trackingproxy.outage.writer import blocking_now, open_journal_file
from trackingproxy.proxy.forwarded import ForwardedFor
from trackingproxy.proxy.handler import TrackingHandler
from trackingproxy.upstream.errors import (
    DNSLookupFailed,
    UpstreamBusy,
    UpstreamConnectFailed,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamTLSFailed,
)

LANDING = b"https://www.example.com/landing?utm=1"


@define
class Watch:
    events: list[str] = field(factory=list)

    def upstream_failed(self) -> None:
        self.events.append("failed")

    def upstream_answered(self) -> None:
        self.events.append("answered")


@define
class Head:
    """An upstream response head (the body is never read by these tests)."""

    code: int
    raw_headers: list[tuple[bytes, bytes]]
    length: int = 0
    phrase: bytes = b"Status"
    delivered: list[Any] = field(factory=list)

    def deliverBody(self, protocol: Any) -> None:
        self.delivered.append(protocol)


def unreached(error: Any) -> Any:
    error.written = False
    return error


class PolicyCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counters = OutageCounters()
        self.links = RememberedLinks(self.clock, 100)
        directory = Path(self.mktemp())
        self.journal = Journal(
            lambda: open_journal_file(directory), self.clock, blocking_now, self.counters,
            ttl=3600.0, max_bytes=1 << 20,
        )
        self.journal.open()
        self.addCleanup(self.journal.close)
        self.watch = Watch()
        self.policy = OutagePolicy(self.clock, self.links, self.journal, self.counters, self.watch)
        self.upstream = UpstreamSpy()

    def handler(self, outage: bool = True) -> TrackingHandler:
        return TrackingHandler(
            scheme=b"https",
            domains=lambda: frozenset({DOMAIN}),
            upstream=self.upstream,
            forwarded=ForwardedFor(()),
            well_known=lambda: {},
            challenges=_Tokens(),
            outage=self.policy if outage else None,
        )

    def ask(self, uri: bytes, outcome: Any, method: bytes = b"GET", ua: bytes = b"UA",
            peer: str = "198.51.100.7", outage: bool = True) -> FakeExchange:
        """Send ``uri`` through the handler; ``outcome`` (an error or a Head) answers it."""
        exchange = FakeExchange(
            method=method, uri=uri, peer=peer,
            headers=[(b"host", DOMAIN.encode()), (b"user-agent", ua)],
        )
        self.handler(outage).handle(exchange)
        answer: Deferred[Any] = self.upstream.answers[-1]
        if isinstance(outcome, Head):
            answer.callback(outcome)
        else:
            answer.errback(Failure(outcome))
        return exchange

    def journaled(self) -> list[bytes]:
        out = []
        while (entry := self.journal.next_pending()) is not None:
            out.append(entry.request().target)
            self.successResultOf(self.journal.mark_sending(entry))
        return out


class Classification(SynchronousTestCase):
    def test_only_failures_before_any_write_count_as_unreached(self) -> None:
        """DNS, connect, TLS, busy and a timeout while waiting for a connection: unreached; a
        timeout or reset after the write: ambiguous; an unsendable request: not an outage."""
        for error in (DNSLookupFailed("x"), UpstreamConnectFailed("x"), UpstreamTLSFailed("x"),
                      UpstreamBusy("x"), UpstreamTimeout("x")):
            self.assertEqual(classify(unreached(error)), "unreached")
        self.assertEqual(classify(UpstreamTimeout("x")), "ambiguous")
        self.assertEqual(classify(UpstreamReset("x")), "ambiguous")
        self.assertIsNone(classify(UpstreamProtocolError("x", written=False)))
        self.assertIsNone(classify(ValueError("x")))


class LocalAnswers(PolicyCase):
    def test_an_open_is_answered_with_sparkposts_pixel(self) -> None:
        """Upstream unreachable: /q/ gets 200, the 44-byte GIF, image/gif, no-store."""
        exchange = self.ask(b"/q/open-1", unreached(UpstreamConnectFailed("refused")))
        [(_, code, headers, body)] = exchange.answer
        self.assertEqual((code, body, len(body)), (200, PIXEL, 44))
        self.assertIn((b"content-type", b"image/gif"), headers)
        self.assertIn((b"cache-control", b"no-store"), headers)
        self.assertEqual(exchange.work, [1, -1])
        self.assertEqual(self.counters.local_answers["open"], 1)

    def test_a_remembered_click_gets_its_learned_redirect(self) -> None:
        """A redirect seen while up is answered for the same target while down."""
        self.ask(b"/f/click-1?a=b", Head(302, [(b"Location", LANDING)]))
        exchange = self.ask(b"/f/click-1?a=b", unreached(DNSLookupFailed("nxdomain")))
        [(_, code, headers, body)] = exchange.answer
        self.assertEqual(code, 302)
        self.assertIn((b"location", LANDING), headers)
        self.assertIn((b"cache-control", b"no-store"), headers)
        self.assertEqual(self.counters.local_answers["remembered_click"], 1)

    def test_another_click_gets_503_with_retry_after(self) -> None:
        """An unknown click: 503, Retry-After, a short page, no Location."""
        exchange = self.ask(b"/f/never-seen", unreached(UpstreamConnectFailed("refused")))
        [(_, code, headers, body)] = exchange.answer
        self.assertEqual(code, 503)
        self.assertIn((b"retry-after", str(RETRY_AFTER).encode()), headers)
        self.assertIn(b"work again shortly", body)
        self.assertNotIn(b"location", [name for name, _ in headers])

    def test_a_target_parameter_never_becomes_a_redirect(self) -> None:
        """/f/...?target=https://evil during an outage: 503, no Location, nothing of it sent."""
        evil = b"https://evil.example/phish"
        exchange = self.ask(b"/f/x?target=" + evil, unreached(UpstreamConnectFailed("refused")))
        [(_, code, headers, body)] = exchange.answer
        self.assertEqual(code, 503)
        self.assertNotIn(evil, b"".join(v for _, v in headers) + body)

    def test_other_paths_keep_the_usual_error_answer(self) -> None:
        """A path that is neither an open nor a click gets 502 as before; nothing journaled."""
        exchange = self.ask(b"/robots.txt", unreached(UpstreamConnectFailed("refused")))
        self.assertEqual(exchange.code, 502)
        self.assertEqual(self.journaled(), [])
        self.flushLoggedErrors()

    def test_an_upstream_503_is_replaced_and_journaled(self) -> None:
        """SparkPost answering 503 (before any body byte): the open gets the pixel here, the
        503 body is read and dropped, and the request is journaled."""
        head = Head(503, [(b"Retry-After", b"10")])
        exchange = self.ask(b"/q/open-503", head)
        self.assertEqual((exchange.code, exchange.answer[0][3]), (200, PIXEL))
        self.assertEqual(len(head.delivered), 1)
        self.assertEqual(exchange.work, [1, -1])
        self.assertEqual(self.journaled(), [b"/q/open-503"])

    def test_outage_mode_off_answers_exactly_as_before(self) -> None:
        """Without outage mode an unreachable upstream still answers an open with 502."""
        exchange = self.ask(b"/q/open-1", unreached(UpstreamConnectFailed("refused")),
                            outage=False)
        self.assertEqual(exchange.code, 502)
        self.assertEqual(self.counters.local_answers["open"], 0)
        self.flushLoggedErrors()

    def test_other_methods_are_left_alone(self) -> None:
        """A POST to an open path is not answered locally nor journaled."""
        exchange = self.ask(b"/q/open-1", unreached(UpstreamConnectFailed("refused")),
                            method=b"POST")
        self.assertEqual(exchange.code, 502)
        self.assertEqual(self.journaled(), [])

    def test_a_head_request_gets_the_pixels_head(self) -> None:
        """HEAD of an open: 200 with the GIF's type (the server drops the body for HEAD)."""
        exchange = self.ask(b"/q/open-h", unreached(UpstreamBusy("busy")), method=b"HEAD")
        self.assertEqual(exchange.code, 200)


class Journaling(PolicyCase):
    def test_only_requests_that_never_reached_the_upstream_are_journaled(self) -> None:
        """Connect/DNS/TLS/busy failures are journaled with what the re-send needs; a timeout or
        reset after the write is counted ambiguous and not journaled."""
        self.ask(b"/q/a?x=1", unreached(UpstreamConnectFailed("refused")), ua=b"Mail/1")
        self.ask(b"/f/b", unreached(UpstreamBusy("busy")))
        self.ask(b"/q/c", UpstreamTimeout("slow"))
        self.ask(b"/f/d", UpstreamReset("reset"))
        entry = self.journal.next_pending()
        assert entry is not None
        first = entry.request()
        self.assertEqual(
            (first.method, first.host, first.target, first.client, first.user_agent, first.scheme),
            (b"GET", DOMAIN, b"/q/a?x=1", "198.51.100.7", b"Mail/1", b"https"),
        )
        self.assertEqual(self.journaled(), [b"/q/a?x=1", b"/f/b"])
        self.assertEqual((self.counters.journaled, self.counters.ambiguous), (2, 2))

    def test_a_failure_after_the_answer_head_is_not_ambiguous(self) -> None:
        """The upstream answered a head, then the body failed: seen by SparkPost, so neither
        journaled nor counted ambiguous."""
        exchange = FakeExchange(uri=b"/q/seen")
        self.handler().handle(exchange)
        head = Head(200, [(b"Content-Type", b"image/gif")], length=44)
        self.upstream.answers[-1].callback(head)
        forward = head.delivered[0]
        forward.connectionLost(Failure(UpstreamReset("cut")))
        self.assertEqual((self.counters.ambiguous, self.counters.journaled), (0, 0))
        self.assertEqual(exchange.code, 200)  # answered here: the head was never sent on

    def test_repeats_within_ten_seconds_are_journaled_once(self) -> None:
        """Same target, client and User-Agent within 10 s: one entry (link scanners); a
        different client, User-Agent, or a repeat after 10 s is journaled again."""
        down = UpstreamConnectFailed("refused")
        for _ in range(3):
            self.ask(b"/f/scan", unreached(down))
        self.ask(b"/f/scan", unreached(UpstreamConnectFailed("x")), peer="198.51.100.8")
        self.ask(b"/f/scan", unreached(UpstreamConnectFailed("x")), ua=b"Other")
        self.clock.advance(REPEAT_WINDOW)
        self.ask(b"/f/scan", unreached(UpstreamConnectFailed("x")))
        self.assertEqual((self.counters.journaled, self.counters.repeats), (4, 2))
        self.assertEqual(self.journaled(), [b"/f/scan"] * 4)

    def test_the_replayer_hears_of_failures_and_answers(self) -> None:
        """Every unreachable failure and every answer is reported (recovery detection)."""
        self.ask(b"/q/1", unreached(UpstreamConnectFailed("refused")))
        self.ask(b"/q/2", Head(200, []))
        self.assertEqual(self.watch.events, ["failed", "answered"])
