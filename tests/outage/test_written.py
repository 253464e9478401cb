"""The upstream client says whether a failed request was ever written to a connection
(`UpstreamError.written`), which is what outage mode journals on: the real client and pool over
in-memory connections on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestNotSent, ResponseNeverReceived

from tests.upstream.test_client import ScriptedPool
from tests.upstream_standin import memory_upstream
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.errors import (
    UpstreamBusy,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)

HEADERS = [(b"host", b"click.example.com")]


class Written(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def upstream(self, **pool: Any) -> Any:
        return memory_upstream(self.clock, **pool)

    def test_a_refused_connection_was_never_written(self) -> None:
        """Connect failure: written is False."""
        up = self.upstream()
        d = up.client.request(b"GET", b"/q/1", HEADERS, None)
        up.connector.last.fail(ConnectionRefusedError())
        self.assertFalse(self.failureResultOf(d, UpstreamConnectFailed).value.written)

    def test_the_busy_queue_never_wrote_the_request(self) -> None:
        """Every connection busy until the queue timeout: UpstreamBusy, written False."""
        up = self.upstream(max_connections=1, queue_timeout=1.0)
        up.client.request(b"GET", b"/q/1", HEADERS, None)
        up.connector.last.succeed()
        waiting = up.client.request(b"GET", b"/q/2", HEADERS, None)
        self.clock.advance(1.0)
        self.assertFalse(self.failureResultOf(waiting, UpstreamBusy).value.written)

    def test_a_timeout_while_waiting_for_a_connection_was_never_written(self) -> None:
        """The response timeout firing before the request got a connection: written False."""
        up = self.upstream(max_connections=1, queue_timeout=60.0)
        first = up.client.request(b"GET", b"/q/1", HEADERS, None)
        up.connector.last.succeed()
        self.clock.advance(1.0)
        waiting = up.client.request(b"GET", b"/q/2", HEADERS, None)
        self.clock.advance(9.0)
        self.assertTrue(self.failureResultOf(first, UpstreamTimeout).value.written)
        self.clock.advance(1.0)
        self.assertFalse(self.failureResultOf(waiting, UpstreamTimeout).value.written)

    def test_a_timeout_after_the_write_may_have_been_seen(self) -> None:
        """Written, then no answer within the response timeout: written True."""
        up = self.upstream()
        d = up.client.request(b"GET", b"/q/1", HEADERS, None)
        up.connector.last.succeed()
        self.clock.advance(10.0)
        self.assertTrue(self.failureResultOf(d, UpstreamTimeout).value.written)

    def test_a_reset_after_the_write_may_have_been_seen(self) -> None:
        """Written, then the connection lost before any answer: written True."""
        up = self.upstream()
        d = up.client.request(b"GET", b"/q/1", HEADERS, None)
        transport = up.connector.last.succeed()
        transport.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.failureResultOf(d, UpstreamReset).value.written)

    def test_an_unsendable_request_was_never_written(self) -> None:
        """A request that cannot go on the wire: protocol error, written False."""
        up = self.upstream()
        d = up.client.request(b"GET", b"/a b", HEADERS, None)
        self.assertFalse(self.failureResultOf(d, UpstreamProtocolError).value.written)

    def test_a_retry_that_fails_to_connect_was_never_written(self) -> None:
        """RequestNotSent on a reused connection (provably not through), then the fresh
        connection fails before the write: written False."""
        pool = ScriptedPool((RequestNotSent(), True), (RequestNotSent(), False))
        d = UpstreamClient(pool, Clock()).request(b"GET", b"/q/1", HEADERS, None)
        self.assertFalse(self.failureResultOf(d, UpstreamError).value.written)

    def test_response_never_received_was_written(self) -> None:
        """ResponseNeverReceived: the request went out; written True."""
        pool = ScriptedPool((ResponseNeverReceived([Failure(ConnectionLost())]), False))
        d = UpstreamClient(pool, Clock()).request(b"GET", b"/q/1", HEADERS, None)
        self.assertTrue(self.failureResultOf(d, UpstreamReset).value.written)
