"""The upstream leg never lets bytes of one exchange reach another (issue 12, defects 1, 6, 7).

Each test feeds a response the way a broken or hostile upstream would send it, in one read,
and has the reader of the first response start the next request at once (as a pipelined
client request is dispatched synchronously when the previous answer ends).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.upstream_standin import memory_upstream
from trackingproxy.upstream.errors import UpstreamError
from trackingproxy.upstream.http1 import UpstreamResponse

HEADERS = [(b"host", b"click.example.com")]
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Evil: 1\r\n\r\nEVIL!"


class _Then(Protocol):
    """Reads a body; when it ends, runs ``then`` (the next request, sent at once)."""

    def __init__(self, then: object) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self._then = then

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self._then()  # type: ignore[operator]


class ResponseBoundaries(SynchronousTestCase):
    """What follows a complete response in the same read is never the next one's answer."""

    def setUp(self) -> None:
        self.clock = Clock()
        upstream = memory_upstream(self.clock)
        self.connector, self.pool, self.client = upstream.connector, upstream.pool, upstream.client

    def _first_then_second(self, method: bytes, answer: bytes) -> tuple[Deferred[UpstreamResponse], int]:
        """Send ``method /a``; feed ``answer`` in one read; the reader sends ``GET /b`` when the
        first body ends. Returns the second request's Deferred and the connection count then."""
        d1 = self.client.request(method, b"/a", HEADERS, None)
        self.connector.last.succeed()
        first = self.connector.last
        second: list[Deferred[UpstreamResponse]] = []

        def send_second() -> None:
            second.append(self.client.request(b"GET", b"/b", HEADERS, None))

        def got(response: UpstreamResponse) -> None:
            response.deliverBody(_Then(send_second))

        d1.addCallback(got)
        assert first.transport is not None
        first.transport.protocol.dataReceived(answer)
        self.assertEqual(len(second), 1, "the first response did not end")
        self.assertFalse(first.transport.connected, "the first connection was not closed")
        return second[0], len(self.connector.attempts)

    def assert_fresh_connection(self, d2: Deferred[UpstreamResponse], attempts: int) -> None:
        self.assertEqual(attempts, 2, "the second request reused the connection")
        self.assertNoResult(d2)
        self.connector.last.succeed()
        wire = self.connector.last.transport
        assert wire is not None
        self.assertTrue(wire.value().startswith(b"GET /b HTTP/1.1\r\n"))
        wire.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d2).code, 204)

    def test_204_followed_by_a_second_response(self) -> None:
        """A 204 followed in the same read by another response: the connection is dropped and
        the next request is sent on a new one (before: it was answered with EVIL!)."""
        d2, attempts = self._first_then_second(b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + EVIL)
        self.assert_fresh_connection(d2, attempts)

    def test_304_with_a_body(self) -> None:
        """A 304 that carries a body (it may have none): the body is never the next answer."""
        d2, attempts = self._first_then_second(
            b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello" + EVIL
        )
        self.assert_fresh_connection(d2, attempts)

    def test_body_longer_than_its_content_length(self) -> None:
        """Bytes past Content-Length are not a response for the next request."""
        d2, attempts = self._first_then_second(
            b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" + EVIL
        )
        self.assert_fresh_connection(d2, attempts)

    def test_garbage_after_a_response(self) -> None:
        """Garbage after a complete response closes the connection; the response stands."""
        d1 = self.client.request(b"GET", b"/a", HEADERS, None)
        self.connector.last.succeed()
        wire = self.connector.last.transport
        assert wire is not None
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXYZ")
        self.assertEqual(self.successResultOf(d1).code, 200)
        self.assertEqual(self.pool.idle_count, 0)
        self.assertEqual(self.pool.open_count, 0)
        self.assertFalse(wire.connected)

    def test_head_answer_followed_by_a_response(self) -> None:
        """A HEAD's answer followed by another response: not reused."""
        d2, attempts = self._first_then_second(
            b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n" + EVIL
        )
        self.assert_fresh_connection(d2, attempts)

    def test_head_keeps_its_connection(self) -> None:
        """A HEAD answered cleanly leaves its connection reusable (before: every HEAD closed
        it, one TLS handshake upstream per HEAD)."""
        for answer in [
            [b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n", b"X-A: 1\r\n\r\n"],
            [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n"],
        ]:
            with self.subTest(answer=answer):
                d = self.client.request(b"HEAD", b"/a", HEADERS, None)
                if self.connector.last.transport is None:
                    self.connector.last.succeed()
                wire = self.connector.last.transport
                assert wire is not None
                for part in answer:
                    wire.protocol.dataReceived(part)
                self.assertIn(self.successResultOf(d).code, (200, 302))
                self.assertEqual(self.pool.idle_count, 1)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_a_connection_paused_by_its_reader_is_pooled_reading(self) -> None:
        """The reader pauses the body as its last bytes arrive (its client stopped reading):
        the connection goes back to the pool reading again, so the next request on it gets
        its answer (before: it stayed paused, and the next request timed out, a 504)."""
        d1 = self.client.request(b"GET", b"/a", HEADERS, None)
        self.connector.last.succeed()
        wire = self.connector.last.transport
        assert wire is not None

        class Pausing(_Then):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.pauseProducing()  # the client's buffer is full

        body = Pausing(lambda: None)
        d1.addCallback(lambda response: response.deliverBody(body))
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual((body.data, self.pool.idle_count), (b"abc", 1))
        self.assertEqual(wire.producerState, "producing")
        d2 = self.client.request(b"GET", b"/b", HEADERS, None)
        wire.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d2).code, 204)

    def test_101_is_a_protocol_error(self) -> None:
        """A 101 to a request that asked for no upgrade fails the request with 'protocol' and
        aborts the connection; nothing escapes as an unhandled error."""
        d = self.client.request(b"GET", b"/a", HEADERS, None)
        self.connector.last.succeed()
        wire = self.connector.last.transport
        assert wire is not None
        wire.protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\nxyz")
        self.assertEqual(self.failureResultOf(d, UpstreamError).value.cause, "protocol")
        self.assertEqual(self.pool.idle_count, 0)

    def test_bytes_on_an_idle_connection(self) -> None:
        """Bytes on a connection with no request outstanding abort it; it is never reused."""
        d = self.client.request(b"GET", b"/a", HEADERS, None)
        self.connector.last.succeed()
        wire = self.connector.last.transport
        assert wire is not None
        wire.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d)
        self.assertEqual(self.pool.idle_count, 1)
        wire.protocol.dataReceived(EVIL)
        self.assertEqual(self.pool.idle_count, 0)
        d2 = self.client.request(b"GET", b"/b", HEADERS, None)
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertNoResult(d2)
