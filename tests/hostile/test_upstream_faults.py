"""Upstream faults: the proxy answers every client, recovers by itself, and leaks nothing.

The real proxy (built as `twistd trackingproxy` builds it, `--upstream-timeout 1`) forwards to
`https://upstream.test:PORT`, a `FaultyUpstream` on loopback whose name is answered by a real
twisted.names DNS server on 127.0.0.1. Each test injects one fault, checks what the client got
(502/504, or a cut connection once the response head was sent), that the next request succeeds
once the upstream behaves, and that the open file descriptors of the process and the pool's
connections are back to where they were. Each outcome is also written to
``build/hostile-results/upstream-faults/<fault>.json`` (the README's figures).

The first class checks the lean client protocol's limits on a fake clock and transport.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web._newclient import ParseError, ResponseDone, ResponseFailed
from twisted.web.iweb import IResponse

from tests.hostile import faulty_upstream as fu
from tests.hostile.wire import (
    Answer,
    FaultProxy,
    fd_table,
    fetch,
    open_fds,
    poll_until,
    start_fault_proxy,
)
from trackingproxy.upstream.errors import UpstreamTimeout
from trackingproxy.upstream.http1 import MAX_HEAD_BYTES, HTTP11ClientConnection, UpstreamRequest

RESULTS = Path(__file__).resolve().parents[2] / "build" / "hostile-results" / "upstream-faults"
UPSTREAM_TIMEOUT = 1.0


# --- the client protocol's limits, on a fake clock ---------------------------------------------
class _Body:
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


class ClientProtocolLimits(SynchronousTestCase):
    """HTTP11ClientConnection against an upstream that floods, stalls or sends trailers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol = HTTP11ClientConnection()
        self.protocol.clock = self.clock
        self.protocol.body_timeout = 10.0
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.results: list[Any] = []

    def send(self) -> None:
        request = UpstreamRequest(b"GET", b"/f/x", [(b"host", b"h")], None)
        d = self.protocol.request(request)
        d.addBoth(self.results.append)

    def response(self) -> IResponse:
        [response] = self.results
        assert not isinstance(response, Failure), response
        return response  # type: ignore[no-any-return]

    def test_endless_header_block_is_cut_at_the_limit(self) -> None:
        """Header lines that never end: a protocol error (ParseError) once the head passes
        64 KiB, the connection aborted; at most one read more than the limit was buffered."""
        self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        fed = 0
        line = b"X-Flood: " + b"f" * 1000 + b"\r\n"
        while not self.results and fed < 10 * MAX_HEAD_BYTES:
            self.protocol.dataReceived(line * 4)
            fed += len(line) * 4
        self.assertLessEqual(fed, MAX_HEAD_BYTES + len(line) * 4)
        [failure] = self.results
        self.assertIsInstance(failure.value, ResponseFailed)
        self.assertIsInstance(failure.value.reasons[0].value, ParseError)
        self.assertTrue(self.transport.disconnecting)

    def test_one_huge_header_value_is_cut_too(self) -> None:
        """A single header value that never ends (httptools would buffer it whole) is cut."""
        self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(100):
            if self.results:
                break
            self.protocol.dataReceived(b"v" * 4096)
        [failure] = self.results
        self.assertIsInstance(failure.value.reasons[0].value, ParseError)

    def test_a_large_legitimate_head_passes(self) -> None:
        """A 60 KiB header block followed by a body in the same reads is accepted."""
        self.send()
        pad = b"".join(b"X-P%03d: %s\r\n" % (i, b"p" * 590) for i in range(100))
        data = b"HTTP/1.1 200 OK\r\n" + pad + b"Content-Length: 100000\r\n\r\n" + b"b" * 100000
        for i in range(0, len(data), 32768):
            self.protocol.dataReceived(data[i : i + 32768])
        body = _Body()
        self.response().deliverBody(body)
        self.assertEqual(len(body.data), 100000)
        self.assertTrue(body.reason is not None and body.reason.check(ResponseDone))

    def test_endless_trailer_section_fails_the_body(self) -> None:
        """Chunked trailers that never end fail the body once they pass the limit."""
        self.send()
        self.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
        )
        body = _Body()
        self.response().deliverBody(body)
        for i in range(200):
            if body.reason is not None:
                break
            self.protocol.dataReceived(b"X-T%d: %s\r\n" % (i, b"t" * 1000))
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(self.transport.disconnecting)

    def test_trailers_never_reach_the_next_response(self) -> None:
        """A trailer of one response is dropped: the next response on the connection does not
        carry it (it used to be prepended to the next response's headers)."""
        self.send()
        self.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
            b"Set-Cookie: stolen=1\r\n\r\n"
        )
        self.results.clear()
        self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(
            self.response().raw_headers, [(b"Content-Length", b"0")]
        )

    def test_stalled_body_times_out(self) -> None:
        """No body bytes for body_timeout: the body fails with UpstreamTimeout (in
        ResponseFailed) and the connection is aborted; every read restarts the timer."""
        self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
        body = _Body()
        self.response().deliverBody(body)
        for _ in range(5):
            self.clock.advance(9.9)
            self.protocol.dataReceived(b"x")
        self.assertIsNone(body.reason)
        self.clock.advance(10)
        assert body.reason is not None
        self.assertIsInstance(body.reason.value.reasons[0].value, UpstreamTimeout)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_paused_reader_suspends_the_body_timeout(self) -> None:
        """While the body's reader pauses the transport (a slow client), the body timeout does
        not run; it starts again on resume."""
        self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
        body = _Body()
        self.response().deliverBody(body)
        body.transport.pauseProducing()
        self.clock.advance(3600)
        self.assertIsNone(body.reason)
        body.transport.resumeProducing()
        self.clock.advance(10)
        self.assertIsNotNone(body.reason)

    def test_no_timer_outlives_a_complete_response(self) -> None:
        """A response that arrives whole leaves no timer behind, split or not."""
        self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.results.clear()
        self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.protocol.dataReceived(b"k")
        self.assertEqual(self.clock.getDelayedCalls(), [])


# --- the real proxy in front of a faulty upstream ---------------------------------------------
class UpstreamFaults(TestCase):
    """One fault per test; see the module docstring."""

    timeout = 60

    def bring_up(self, *extra: str, dns_mode: str = fu.ANSWER) -> None:
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        self.upstream = fu.FaultyUpstream().start()
        self.addCleanup(self.upstream.stop)
        self.dns = fu.LoopbackDNS({fu.HOST: ["127.0.0.1"]}, mode=dns_mode).start()
        self.addCleanup(self.dns.stop)
        ca_file = self.upstream.write_ca(str(tmp / "upstream-ca.pem"))
        url = f"https://{fu.HOST}:{self.upstream.port_number}"
        timeout = ("--upstream-timeout", f"{UPSTREAM_TIMEOUT:g}")
        self.proxy: FaultProxy = start_fault_proxy(
            tmp, url, ca_file, self.dns.resolver(), *timeout, *extra
        )
        self.addCleanup(self.proxy.stop)

    async def warm(self) -> tuple[int, int]:
        """One good request, then (open fds, pooled connections) once everything settled."""
        answer = await fetch(self.proxy.http_port, "/q/warm-up")
        self.assertEqual(answer.outcome, "200")
        return await self.settled()

    async def settled(self) -> tuple[int, int]:
        pool = self.proxy.pool
        await poll_until(
            lambda: pool.open_count == pool.idle_count == len(self.upstream.open),
            what="connections to settle",
        )
        await deferLater(reactor, 0.05, lambda: None)
        return open_fds(), pool.open_count

    async def recovers_without_leaks(
        self, fault: str, answer: Answer, before: tuple[int, int]
    ) -> None:
        """The upstream behaves again: the next request succeeds and fds/connections are back."""
        self.upstream.mode = fu.OK
        self.upstream.cert = fu.GOOD
        recovered = await fetch(self.proxy.http_port, "/q/after-" + fault)
        self.assertEqual(recovered.outcome, "200", f"{fault}: no recovery")
        self.assertEqual(recovered.body, fu.ok_response()[-44:])
        fds, pooled = before
        try:
            await poll_until(
                lambda: open_fds() == fds and self.proxy.pool.open_count == pooled,
                what="file descriptors and pooled connections to return to the baseline",
            )
        except AssertionError:
            old = getattr(self, "table", {})
            new = fd_table()
            print({k: v for k, v in new.items() if old.get(k) != v})
            raise
        finally:
            record(fault, answer, recovered, before, (open_fds(), self.proxy.pool.open_count))

    async def fault(self, mode: str, path: str) -> tuple[Answer, tuple[int, int]]:
        self.bring_up()
        before = await self.warm()
        seen = len(self.upstream.requests)
        self.upstream.mode = mode
        answer = await fetch(self.proxy.http_port, path)
        self.assertEqual(self.upstream.requests[seen:], [path.encode()], "sent exactly once")
        return answer, before

    async def test_upstream_refusing_connections(self) -> None:
        """Upstream down (its port closed: connections refused): 502 at once; once it listens
        again the next request succeeds."""
        self.bring_up()
        before = await self.warm()
        await self.upstream.stop_listening()
        await poll_until(lambda: self.proxy.pool.open_count == 0, what="the pool to notice")
        answer = await fetch(self.proxy.http_port, "/q/refused")
        self.assertEqual(answer.outcome, "502")
        self.assertLess(answer.seconds, UPSTREAM_TIMEOUT)
        self.upstream.listen_again()
        await self.recovers_without_leaks("refused", answer, before)

    async def test_reset_before_response_headers(self) -> None:
        """The upstream reads the request and resets the connection: 502, not retried."""
        answer, before = await self.fault(fu.RESET_BEFORE_HEADERS, "/f/reset-early")
        self.assertEqual(answer.outcome, "502")
        await self.recovers_without_leaks("reset-before-headers", answer, before)

    async def test_reset_mid_body(self) -> None:
        """Headers and part of the body, then a reset: the client got the head already, so
        its connection is cut (the body is visibly short), never completed with garbage."""
        answer, before = await self.fault(fu.RESET_MID_BODY, "/q/reset-mid-body")
        self.assertEqual(answer.outcome, f"200 headers, then cut after {fu.PARTIAL} body bytes")
        self.assertEqual(answer.headers[b"content-length"], str(fu.BIG_LENGTH).encode())
        await self.recovers_without_leaks("reset-mid-body", answer, before)

    async def test_reset_after_headers_before_any_body(self) -> None:
        """A complete head, then a reset before any body byte: nothing of the response has
        reached the client yet, so it gets a clean 502 (never a bare close, which would
        invite a silent resend), and the proxy recovers."""
        answer, before = await self.fault(fu.RESET_AFTER_HEADERS, "/q/reset-after-head")
        self.assertEqual(answer.outcome, "502")
        await self.recovers_without_leaks("reset-after-headers", answer, before)

    async def test_stall_before_headers(self) -> None:
        """No response head within --upstream-timeout: 504 after about that long."""
        answer, before = await self.fault(fu.STALL_HEADERS, "/f/stall-headers")
        self.assertEqual(answer.outcome, "504")
        self.assertGreaterEqual(answer.seconds, UPSTREAM_TIMEOUT * 0.9)
        self.assertLess(answer.seconds, UPSTREAM_TIMEOUT + 2)
        await poll_until(lambda: not self.upstream.open, what="the stalled connection to close")
        await self.recovers_without_leaks("stall-before-headers", answer, before)

    async def test_stall_mid_body(self) -> None:
        """Head and part of the body, then silence: the body idle timeout (the upstream
        timeout) aborts the upstream connection and cuts the client's."""
        answer, before = await self.fault(fu.STALL_BODY, "/q/stall-mid-body")
        self.assertEqual(answer.outcome, f"200 headers, then cut after {fu.PARTIAL} body bytes")
        self.assertLess(answer.seconds, UPSTREAM_TIMEOUT + 2)
        await self.recovers_without_leaks("stall-mid-body", answer, before)

    async def test_garbage(self) -> None:
        """Something that is not HTTP: 502."""
        answer, before = await self.fault(fu.GARBAGE, "/f/garbage")
        self.assertEqual(answer.outcome, "502")
        await self.recovers_without_leaks("garbage", answer, before)

    async def test_oversized_header_block(self) -> None:
        """A 1 MiB response head (1024 headers of 1 KB) is refused at 64 KiB: 502."""
        answer, before = await self.fault(fu.HUGE_HEADERS, "/f/huge-head")
        self.assertEqual(answer.outcome, "502")
        self.assertLess(answer.seconds, UPSTREAM_TIMEOUT)  # not a timeout: the limit
        await self.recovers_without_leaks("oversized-header-block", answer, before)

    async def test_endless_header_block(self) -> None:
        """Header lines streamed as fast as the proxy reads them: 502 long before the
        response timeout, and the flood stops (the proxy dropped the connection)."""
        answer, before = await self.fault(fu.ENDLESS_HEADERS, "/f/endless-head")
        self.assertEqual(answer.outcome, "502")
        self.assertLess(answer.seconds, UPSTREAM_TIMEOUT)
        await poll_until(lambda: not self.upstream.open, what="the flood's connection to close")
        self.assertLess(self.upstream.flood_written, fu.FLOOD_LIMIT // 4)
        await self.recovers_without_leaks("endless-header-block", answer, before)
        print(f"endless header block: {self.upstream.flood_written} bytes written until cut")

    async def tls_fault(self, cert: str) -> None:
        self.bring_up()
        before = await self.warm()
        await self.upstream.drop_connections()  # the next request needs a new handshake
        await poll_until(lambda: self.proxy.pool.open_count == 0, what="the pool to notice")
        seen, opened = len(self.upstream.requests), self.upstream.connections_opened
        self.upstream.cert = cert
        answer = await fetch(self.proxy.http_port, f"/f/{cert}")
        self.assertEqual(answer.outcome, "502")
        self.assertEqual(self.upstream.requests[seen:], [], "a request went over unverified TLS")
        self.assertEqual(self.upstream.connections_opened - opened, 1, "one handshake, no retry")
        await self.recovers_without_leaks(f"certificate-{cert}", answer, before)

    async def test_certificate_for_the_wrong_name(self) -> None:
        """A certificate (from the trusted CA) for another name: 502, nothing sent."""
        await self.tls_fault(fu.WRONG_NAME)

    async def test_expired_certificate(self) -> None:
        """An expired certificate for the right name: 502, never an unverified fallback."""
        await self.tls_fault(fu.EXPIRED)

    async def test_untrusted_certificate(self) -> None:
        """A certificate from a CA nobody trusts: 502, nothing sent."""
        await self.tls_fault(fu.UNTRUSTED)

    async def test_dns_failing_before_any_answer(self) -> None:
        """The upstream name has never resolved (SERVFAIL, then NXDOMAIN): 502 each; as soon
        as DNS answers, requests succeed."""
        self.bring_up(dns_mode=fu.SERVFAIL)
        await deferLater(reactor, 0.05, lambda: None)  # the reactor runs (its SIGCHLD pipe)
        fds = open_fds()
        self.table = fd_table()
        answers = []
        for mode in (fu.SERVFAIL, fu.NXDOMAIN):
            self.dns.mode = mode
            answers.append(await fetch(self.proxy.http_port, f"/q/dns-{mode}"))
        self.assertEqual([a.outcome for a in answers], ["502", "502"])
        self.assertEqual(self.upstream.requests, [])
        self.dns.mode = fu.ANSWER
        # Now one pooled connection (two descriptors: the proxy's and the upstream's end).
        await self.recovers_without_leaks("dns-failing", answers[0], (fds + 2, 1))

    async def test_dns_failing_after_an_answer(self) -> None:
        """DNS fails (SERVFAIL) after the name resolved: the last answer stays in use, so
        every request keeps succeeding through the outage, new connections included."""
        self.bring_up("--upstream-max-age", "0.5")
        before = await self.warm()
        queries = self.dns.queries
        self.dns.mode = fu.SERVFAIL
        outcomes = []
        started = time.monotonic()
        while time.monotonic() - started < 6.5:  # past the 5 s minimum TTL of the answer
            outcomes.append((await fetch(self.proxy.http_port, "/q/during-outage")).outcome)
            await deferLater(reactor, 0.4, lambda: None)
        self.assertEqual(set(outcomes), {"200"})
        self.assertGreater(self.dns.queries, queries, "DNS was not asked during the outage")
        self.assertGreater(self.upstream.connections_opened, 2, "no new connection was made")
        self.dns.mode = fu.ANSWER
        summary = Answer(200, {}, b"", True, True, 0.0)
        await self.recovers_without_leaks("dns-failing-after-answer", summary, before)
        print(f"DNS outage: {len(outcomes)} requests, all 200")

    async def test_dns_answer_change_is_followed(self) -> None:
        """DNS moves the name to another address (127.0.0.2): new connections follow within
        TTL + max age, no request fails, and the old upstream can then go away."""
        self.bring_up("--upstream-max-age", "0.5")
        other = fu.FaultyUpstream(interface="127.0.0.2", ca=self.upstream.ca)
        other.start(self.upstream.port_number)
        self.addCleanup(other.stop)
        await self.warm()
        self.dns.table[fu.HOST] = ["127.0.0.2"]
        outcomes = []
        started = time.monotonic()
        while not other.requests:
            self.assertLess(time.monotonic() - started, 12, "the new address was never used")
            outcomes.append((await fetch(self.proxy.http_port, "/q/moving")).outcome)
            await deferLater(reactor, 0.25, lambda: None)
        switched = time.monotonic() - started
        await self.upstream.stop_listening()
        for _ in range(5):
            outcomes.append((await fetch(self.proxy.http_port, "/q/moved")).outcome)
        self.assertEqual(set(outcomes), {"200"})
        self.assertEqual(other.requests[-5:], [b"/q/moved"] * 5)
        print(f"DNS change followed after {switched:.1f} s, {len(outcomes)} requests, all 200")
        summary = Answer(200, {}, b"", True, True, switched)
        record("dns-answer-changed", summary, summary, (0, 0), (0, 0))

    async def test_trailer_is_not_attached_to_the_next_response(self) -> None:
        """A chunked response with trailers (Set-Cookie among them): the next client on the
        same upstream connection gets none of them."""
        answer, before = await self.fault(fu.TRAILER, "/q/with-trailer")
        self.assertEqual(answer.outcome, "200")
        self.upstream.mode = fu.OK
        following = await fetch(self.proxy.http_port, "/q/next-on-the-same-connection")
        self.assertEqual(following.outcome, "200")
        self.assertEqual(self.upstream.connections_opened, 1, "not on the same connection")
        self.assertNotIn(b"x-injected", following.headers)
        self.assertNotIn(b"set-cookie", following.headers)
        await self.recovers_without_leaks("chunked-trailer", answer, before)


def record(
    fault: str,
    answer: Answer,
    recovered: Answer,
    before: tuple[int, int],
    after: tuple[int, int],
) -> None:
    """Write one fault's outcome for the README figures (build/ is not committed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    entry = {
        "fault": fault,
        "client_got": answer.outcome,
        "seconds": round(answer.seconds, 2),
        "next_request": recovered.outcome,
        "fds_before_after": [before[0], after[0]],
        "pooled_before_after": [before[1], after[1]],
    }
    (RESULTS / f"{fault}.json").write_text(json.dumps(entry) + "\n")
