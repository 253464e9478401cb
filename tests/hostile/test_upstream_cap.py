"""Upstream connections are capped; requests beyond the cap wait a bounded time, in a bounded
queue, and fail with 503 'busy' having sent nothing (issue 12, defect 5)."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.upstream_standin import memory_upstream
from trackingproxy.upstream.errors import UpstreamBusy
from trackingproxy.upstream.http1 import UpstreamResponse

HEADERS = [(b"host", b"click.example.com")]
OK = b"HTTP/1.1 204 No Content\r\n\r\n"


class ConnectionCap(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        upstream = memory_upstream(self.clock, max_connections=2, queue_timeout=3.0, max_waiting=2)
        self.connector, self.pool, self.client = upstream.connector, upstream.pool, upstream.client

    def busy_pair(self) -> list[Deferred[UpstreamResponse]]:
        sent = []
        for path in (b"/a", b"/b"):
            sent.append(self.client.request(b"GET", path, HEADERS, None))
            self.connector.last.succeed()
        self.assertEqual(self.pool.open_count, 2)
        return sent

    def test_beyond_the_cap_a_request_waits_then_gets_a_returned_connection(self) -> None:
        """A third request opens no third connection; it is sent on the first one returned."""
        first, _ = self.busy_pair()
        third = self.client.request(b"GET", b"/c", HEADERS, None)
        self.assertEqual((len(self.connector.attempts), self.pool.waiting_count), (2, 1))
        wire = self.connector.attempts[0].transport
        assert wire is not None
        wire.clear()
        wire.protocol.dataReceived(OK)
        self.successResultOf(first)
        self.assertEqual(self.pool.waiting_count, 0)
        self.assertTrue(wire.value().startswith(b"GET /c HTTP/1.1\r\n"))
        wire.protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(third).code, 204)

    def test_a_waiting_request_fails_503_after_the_queue_timeout(self) -> None:
        """Nothing comes back within the queue timeout: 503 'busy', nothing written."""
        self.busy_pair()
        third = self.client.request(b"GET", b"/c", HEADERS, None)
        self.clock.advance(3.0)
        error = self.failureResultOf(third, UpstreamBusy).value
        self.assertEqual((error.cause, error.status), ("busy", 503))
        self.assertIn("--upstream-max-connections", str(error))
        for attempt in self.connector.attempts:
            assert attempt.transport is not None
            self.assertNotIn(b"/c", attempt.transport.value())

    def test_the_queue_is_bounded(self) -> None:
        """With max_waiting requests waiting, the next one fails at once."""
        self.busy_pair()
        self.client.request(b"GET", b"/c", HEADERS, None)
        self.client.request(b"GET", b"/d", HEADERS, None)
        fourth = self.client.request(b"GET", b"/e", HEADERS, None)
        self.assertEqual(self.failureResultOf(fourth, UpstreamBusy).value.status, 503)
        self.assertEqual(self.pool.waiting_count, 2)

    def test_a_cancelled_waiter_leaves_the_queue_and_is_never_sent(self) -> None:
        """The client went away while waiting: the request is not sent later."""
        first, _ = self.busy_pair()
        third = self.client.request(b"GET", b"/c", HEADERS, None)
        third.cancel()
        self.failureResultOf(third, CancelledError)
        self.assertEqual(self.pool.waiting_count, 0)
        wire = self.connector.attempts[0].transport
        assert wire is not None
        wire.clear()
        wire.protocol.dataReceived(OK)
        self.successResultOf(first)
        self.assertEqual(wire.value(), b"")
        self.assertEqual(self.pool.idle_count, 1)

    def test_a_lost_connection_frees_a_slot_for_a_waiter(self) -> None:
        """When a busy connection goes away, a waiting request opens a new one."""
        first, _ = self.busy_pair()
        third = self.client.request(b"GET", b"/c", HEADERS, None)
        wire = self.connector.attempts[0].transport
        assert wire is not None
        wire.loseConnection()
        self.failureResultOf(first)
        self.assertEqual(len(self.connector.attempts), 3)
        self.connector.last.succeed()
        new = self.connector.last.transport
        assert new is not None
        self.assertTrue(new.value().startswith(b"GET /c "))
        new.protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(third).code, 204)

    def test_connections_never_exceed_the_cap(self) -> None:
        """Under many requests the pool never holds more than max_connections."""
        pending = [self.client.request(b"GET", b"/%d" % i, HEADERS, None) for i in range(2)]
        for attempt in self.connector.attempts:
            attempt.succeed()
        more = [self.client.request(b"GET", b"/x", HEADERS, None) for _ in range(10)]
        self.assertLessEqual(self.pool.open_count, 2)
        self.assertEqual(len(self.connector.attempts), 2)
        refused = [self.failureResultOf(d, UpstreamBusy) for d in more[2:]]  # queue full
        self.assertEqual((len(refused), [d.called for d in more[:2]]), (8, [False, False]))
        del pending
