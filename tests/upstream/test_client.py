"""The upstream client's rules: bytes on the wire, retry only when unsent, timeout, abandon."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)

from tests.upstream_standin import Collect, memory_upstream
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.errors import (
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from trackingproxy.upstream.http1 import UpstreamResponse
from trackingproxy.upstream.pool import PooledConnection

HEADERS = [(b"host", b"click.example.com"), (b"x-a", b"1")]




class ClientOverPool(SynchronousTestCase):
    """The client with the real pool, over in-memory connections."""

    def setUp(self) -> None:
        self.clock = Clock()
        upstream = memory_upstream(self.clock)
        self.connector, self.pool, self.client = upstream.connector, upstream.pool, upstream.client

    def send(self, method: bytes = b"GET", path: bytes = b"/", body: bytes | None = None) -> Deferred[UpstreamResponse]:
        attempts = len(self.connector.attempts)
        d = self.client.request(method, path, HEADERS, body)
        if len(self.connector.attempts) > attempts:
            self.connector.last.succeed()
        return d

    @property
    def wire(self) -> StringTransport:
        transport = self.connector.last.transport
        assert transport is not None
        return transport

    def test_request_goes_out_byte_for_byte(self) -> None:
        """Method, path with query and the given headers are written as given, kept alive."""
        self.send(path=b"/a%2Fb/?x=1&&y=%zz;z")
        sent = self.wire.value()
        self.assertTrue(sent.startswith(b"GET /a%2Fb/?x=1&&y=%zz;z HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nhost: click.example.com\r\nx-a: 1\r\n", sent)
        self.assertNotIn(b"Connection", sent)
        self.assertNotIn(b"Content-Length", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n"))

    def test_unsendable_path_fails_at_once(self) -> None:
        """A path that cannot go on the wire fails with 'protocol' before any connection is made."""
        d = self.client.request(b"GET", b"/a b", HEADERS, None)
        self.assertEqual(self.failureResultOf(d, UpstreamError).value.cause, "protocol")
        self.assertEqual(self.connector.attempts, [])

    def test_unsendable_header_field_fails_at_once(self) -> None:
        """A field name that is not a token, or CR, LF or NUL in a field, fails with 'protocol'
        before any connection is made: nothing can split the request."""
        for field in [
            (b"x-a", b"1\r\nX-Evil: 1"),
            (b"x-a", b"1\nX-Evil: 1"),
            (b"x-a", b"1\rX"),
            (b"x-a", b"a\x00b"),
            (b"x a", b"1"),
            (b"x:a", b"1"),
            (b"", b"1"),
            (b"x-\xe9", b"1"),
            (b"x-a\r\nX-Evil", b"1"),
        ]:
            with self.subTest(field=field):
                d = self.client.request(b"GET", b"/", [*HEADERS, field], None)
                self.assertEqual(self.failureResultOf(d, UpstreamError).value.cause, "protocol")
        self.assertEqual(self.connector.attempts, [])

    def test_header_values_may_hold_any_other_byte(self) -> None:
        """Tabs, spaces, colons and obs-text in a value go out as given."""
        self.client.request(b"GET", b"/", [*HEADERS, (b"x-b", b"\t: a\x80\xff ")], None)
        self.connector.last.succeed()
        self.assertIn(b"\r\nx-b: \t: a\x80\xff \r\n\r\n", self.wire.value())

    def test_post_body_is_framed_by_content_length(self) -> None:
        """A body is written after the headers with a Content-Length."""
        self.send(b"POST", b"/f", b"a=1")
        sent = self.wire.value()
        self.assertIn(b"\r\nContent-Length: 3\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\na=1"))

    def test_response_streams_and_connection_returns(self) -> None:
        """The response arrives at its headers; once its body is read the connection is idle."""
        d = self.send()
        self.wire.protocol.dataReceived(b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 5\r\n\r\n")
        response = self.successResultOf(d)
        self.assertEqual(
            (response.code, response.raw_headers), (302, [(b"Location", b"/x"), (b"Content-Length", b"5")])
        )
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/x"])  # IResponse's view
        body = Collect()
        response.deliverBody(body)
        self.assertEqual(self.pool.idle_count, 0)
        self.wire.protocol.dataReceived(b"hello")
        self.assertEqual(body.data, b"hello")
        self.assertEqual(self.pool.idle_count, 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 50.0)  # only the idle sweep

    def test_timeout_aborts_the_connection(self) -> None:
        """No response headers within the timeout: UpstreamTimeout, connection aborted, no retry."""
        d = self.send()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, UpstreamTimeout).value
        self.assertEqual((error.cause, error.status), ("timeout", 504))
        self.assertFalse(self.wire.connected)
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertEqual(self.pool.open_count, 0)

    def test_timeout_covers_connecting(self) -> None:
        """The response timeout also bounds the wait for a connection."""
        self.client = UpstreamClient(self.pool, self.clock, response_timeout=3.0)
        d = self.client.request(b"GET", b"/", HEADERS, None)
        self.clock.advance(3)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertEqual(self.pool.open_count, 1)  # the connect goes on, for the pool...
        self.clock.advance(2)
        self.assertEqual(self.pool.open_count, 0)  # ... bounded by the connect timeout

    def test_cancel_after_writing_lets_the_answer_finish(self) -> None:
        """Cancelling a written request (the client went away) does not cut it: its answer is
        read and dropped, and the connection goes back to the pool."""
        d = self.send()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.wire.connected)
        self.wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(self.pool.idle_count, 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 50.0)  # only the idle sweep

    def test_cancel_after_writing_is_bounded_by_the_timeout(self) -> None:
        """A withdrawn request whose answer never comes is aborted at the response timeout."""
        d = self.send()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(10)
        self.assertFalse(self.wire.connected)

    def test_cancel_while_connecting_sends_nothing(self) -> None:
        """Cancelled before a connection was there: nothing is ever written, and the
        connection, once made, is kept idle for the next request (no connect wasted)."""
        d = self.client.request(b"GET", b"/", HEADERS, None)
        attempt = self.connector.last
        d.cancel()
        self.failureResultOf(d, CancelledError)
        attempt.succeed()
        self.assertEqual(self.wire.value(), b"")
        self.assertEqual(self.pool.idle_count, 1)

    def test_reset_after_the_request_was_written_is_final(self) -> None:
        """A reused connection lost after the request went out fails with 'reset', not retried."""
        first = self.send()
        self.wire.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(first)
        second = self.send(path=b"/click")
        self.assertIn(b"GET /click ", self.wire.value())
        self.wire.protocol.connectionLost(Failure(ConnectionLost()))
        error = self.failureResultOf(second, UpstreamReset).value
        self.assertEqual(error.cause, "reset")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_abandon_closes_a_half_read_response(self) -> None:
        """abandon() on a response whose body is not fully read closes its connection."""
        d = self.send()
        self.wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        response = self.successResultOf(d)
        body = Collect()
        response.deliverBody(body)
        self.client.abandon(response)
        self.assertFalse(self.wire.connected)
        self.assertIsNotNone(body.reason)
        self.assertEqual((self.pool.idle_count, self.pool.open_count), (0, 0))

    def test_abandon_before_reading_closes_too(self) -> None:
        """abandon() before deliverBody was ever called closes the connection as well."""
        d = self.send()
        self.wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.client.abandon(self.successResultOf(d))
        self.assertEqual(self.pool.open_count, 0)

    def test_abandon_after_the_body_is_harmless(self) -> None:
        """abandon() after the body was fully read leaves the pooled connection alone."""
        d = self.send()
        self.wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        response = self.successResultOf(d)
        response.deliverBody(Collect())
        self.client.abandon(response)
        self.assertTrue(self.wire.connected)
        self.assertEqual(self.pool.idle_count, 1)

    def test_close_closes_the_pool(self) -> None:
        """close() closes every upstream connection; an in-flight request fails."""
        d = self.send()
        self.successResultOf(self.client.close())
        self.assertEqual(self.pool.open_count, 0)
        self.failureResultOf(d, UpstreamReset)


class StubProtocol:
    """Stands in for a connection's protocol: request() ends as the test says."""

    def __init__(self, outcome: Exception | None) -> None:
        self.outcome = outcome
        self.sent: list[Any] = []
        self.transport = StringTransport()

    def request(self, request: Any) -> Deferred[Any]:
        self.sent.append(request)
        if self.outcome is None:
            return succeed(cast(Any, "response"))
        return fail(self.outcome)


class ScriptedPool:
    """A pool handing out prepared connections and recording how it was asked."""

    def __init__(self, *conns: tuple[Exception | None, bool]) -> None:
        self.prepared = list(conns)
        self.asked: list[bool] = []
        self.protocols: list[StubProtocol] = []

    def acquire(self, fresh: bool = False) -> Deferred[PooledConnection]:
        self.asked.append(fresh)
        outcome, reused = self.prepared.pop(0)
        conn = PooledConnection("192.0.2.1")
        protocol = StubProtocol(outcome)
        self.protocols.append(protocol)
        conn.protocol = cast(Any, protocol)
        conn.requests = 2 if reused else 1
        return succeed(conn)

    def close(self) -> Deferred[None]:
        return succeed(None)


class RetryRule(SynchronousTestCase):
    """Retry once, on a fresh connection, only when the request provably was not sent."""

    def run_with(self, *conns: tuple[Exception | None, bool]) -> tuple[ScriptedPool, Deferred[UpstreamResponse]]:
        pool = ScriptedPool(*conns)
        client = UpstreamClient(pool, Clock())
        return pool, client.request(b"GET", b"/click", HEADERS, None)

    def test_unsent_on_reused_connection_is_retried_fresh(self) -> None:
        """RequestNotSent on a reused connection: retried once on a fresh connection."""
        pool, d = self.run_with((RequestNotSent(), True), (None, False))
        self.assertEqual(self.successResultOf(d), "response")
        self.assertEqual(pool.asked, [False, True])

    def test_transmission_failure_on_reused_connection_is_retried(self) -> None:
        """RequestTransmissionFailed on a reused connection is retried on a fresh one."""
        reason = RequestTransmissionFailed([Failure(ConnectionDone())])
        pool, d = self.run_with((reason, True), (None, False))
        self.successResultOf(d)
        self.assertEqual(pool.asked, [False, True])

    def test_failure_on_fresh_connection_is_not_retried(self) -> None:
        """A fresh connection's RequestNotSent is final."""
        pool, d = self.run_with((RequestNotSent(), False))
        self.assertEqual(self.failureResultOf(d, UpstreamError).value.cause, "reset")
        self.assertEqual(pool.asked, [False])

    def test_only_one_retry(self) -> None:
        """If the retry fails as well, the failure is final."""
        pool, d = self.run_with((RequestNotSent(), True), (RequestNotSent(), False))
        self.failureResultOf(d, UpstreamReset)
        self.assertEqual(pool.asked, [False, True])

    def test_response_never_received_is_not_retried(self) -> None:
        """ResponseNeverReceived on a reused connection is final: the upstream may have seen it."""
        reason = ResponseNeverReceived([Failure(ConnectionDone())])
        pool, d = self.run_with((reason, True))
        self.failureResultOf(d, UpstreamReset)
        self.assertEqual(pool.asked, [False])
        self.assertEqual(len(pool.protocols[0].sent), 1)
