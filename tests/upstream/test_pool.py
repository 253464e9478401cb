"""The connection pool's logic on a fake clock with an in-memory connector."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import trustme
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.upstream_standin import MemoryConnector, StaticDNS
from trackingproxy.errors import ConfigError
from trackingproxy.upstream.dns import CachingResolver
from trackingproxy.upstream.errors import DNSLookupFailed, UpstreamConnectFailed, UpstreamTLSFailed
from trackingproxy.upstream.http1 import UpstreamRequest
from trackingproxy.upstream.pool import ConnectionPool, PooledConnection, make_trust_root
from trackingproxy.upstream.target import UpstreamTarget

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class PoolTests(SynchronousTestCase):
    def make(self, addresses: list[str] | None = None, tls: bool = False, **knobs: Any) -> ConnectionPool:
        self.clock = Clock()
        self.connector = MemoryConnector(tls=tls)
        target = UpstreamTarget("https" if tls else "http", "upstream.test", 443)
        table = {} if addresses is None else {"upstream.test": addresses}
        resolver = CachingResolver(StaticDNS(table), self.clock)
        self.pool = ConnectionPool(self.clock, target, resolver, self.connector, **knobs)
        return self.pool

    def new(self, fresh: bool = False) -> PooledConnection:
        """Acquire, expecting a new connection, and let it connect."""
        d = self.pool.acquire(fresh)
        self.connector.last.succeed()
        return self.successResultOf(d)

    def serve(self, conn: PooledConnection) -> None:
        """Run one request/response on the connection so that it goes quiescent."""
        d = conn.protocol.request(UpstreamRequest(b"GET", b"/", [(b"host", b"h")], None))
        conn.protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_idle_connection_is_reused(self) -> None:
        """A connection that finished its response is handed out again, marked reused."""
        self.make(["192.0.2.1"])
        conn = self.new()
        self.assertFalse(conn.reused)
        self.serve(conn)
        self.assertEqual(self.pool.idle_count, 1)
        again = self.successResultOf(self.pool.acquire())
        self.assertIs(again, conn)
        self.assertTrue(again.reused)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_fresh_skips_idle_connections(self) -> None:
        """acquire(fresh=True) always opens a new connection."""
        self.make(["192.0.2.1"])
        conn = self.new()
        self.serve(conn)
        other = self.new(fresh=True)
        self.assertIsNot(other, conn)
        self.assertFalse(other.reused)

    def test_most_recently_used_is_reused_first(self) -> None:
        """Idle connections are reused last-in first-out, so surplus ones can idle out."""
        self.make(["192.0.2.1"])
        first, second = self.new(), self.new()
        self.serve(first)
        self.serve(second)
        self.assertIs(self.successResultOf(self.pool.acquire()), second)

    def test_connection_past_max_age_is_not_reused(self) -> None:
        """An idle connection older than max_age is closed instead of being handed out."""
        self.make(["192.0.2.1"], max_age=120.0, idle_timeout=1000.0)
        conn = self.new()
        self.serve(conn)
        self.clock.advance(119)
        self.assertIs(self.successResultOf(self.pool.acquire()), conn)
        self.serve(conn)
        self.clock.advance(1)
        self.assertEqual(self.pool.idle_count, 0)  # the sweep closed it at 120 s
        self.assertEqual(self.pool.open_count, 0)
        self.assertIsNot(self.new(), conn)

    def test_connection_aging_during_a_request_is_closed_after_it(self) -> None:
        """A connection that passes max_age while busy finishes its request, then is closed."""
        self.make(["192.0.2.1"], max_age=120.0)
        conn = self.new()
        transport = self.connector.last.transport
        assert transport is not None
        d = conn.protocol.request(UpstreamRequest(b"GET", b"/", [(b"host", b"h")], None))
        self.clock.advance(121)
        conn.protocol.dataReceived(OK)
        self.successResultOf(d)
        self.assertEqual(self.pool.idle_count, 0)
        self.assertFalse(transport.connected)

    def test_idle_timeout_closes_connections(self) -> None:
        """A connection idle for idle_timeout is closed by the pool."""
        self.make(["192.0.2.1"], idle_timeout=50.0)
        conn = self.new()
        transport = self.connector.last.transport
        assert transport is not None
        self.serve(conn)
        self.clock.advance(49.9)
        self.assertEqual(self.pool.idle_count, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.pool.idle_count, 0)
        self.assertFalse(transport.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_at_most_max_idle_connections_are_kept(self) -> None:
        """Beyond max_idle, a connection going idle is closed."""
        self.make(["192.0.2.1"], max_idle=1)
        first, second = self.new(), self.new()
        self.serve(first)
        self.serve(second)
        self.assertEqual(self.pool.idle_count, 1)
        self.assertEqual(self.pool.open_count, 1)

    def test_connection_lost_while_idle_is_dropped(self) -> None:
        """An idle connection the upstream closed leaves the pool; the next acquire opens one."""
        self.make(["192.0.2.1"])
        conn = self.new()
        self.serve(conn)
        conn.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.pool.idle_count, self.pool.open_count), (0, 0))
        self.assertIsNot(self.new(), conn)

    def test_new_connections_round_robin_over_addresses(self) -> None:
        """Successive new connections go to successive resolved addresses."""
        self.make(["192.0.2.1", "192.0.2.2", "2001:db8::1"])
        for _ in range(4):
            self.new()
        self.assertEqual(
            [a.address for a in self.connector.attempts],
            ["192.0.2.1", "192.0.2.2", "2001:db8::1", "192.0.2.1"],
        )

    def test_refused_address_fails_over_to_the_next(self) -> None:
        """When TCP to one address fails, the next address is tried for the same acquire."""
        self.make(["192.0.2.1", "192.0.2.2"])
        d = self.pool.acquire()
        self.connector.last.fail(ConnectionRefusedError())
        self.connector.last.succeed()
        self.assertEqual(self.successResultOf(d).address, "192.0.2.2")

    def test_all_addresses_refused_is_a_connect_error(self) -> None:
        """When every address refuses, acquire fails with cause 'connect'."""
        self.make(["192.0.2.1", "192.0.2.2"])
        d = self.pool.acquire()
        self.connector.last.fail(ConnectionRefusedError())
        self.connector.last.fail(ConnectionRefusedError())
        error = self.failureResultOf(d, UpstreamConnectFailed).value
        self.assertEqual(error.cause, "connect")
        self.assertIn("192.0.2.2", str(error))
        self.assertEqual(self.pool.open_count, 0)

    def test_connect_timeout(self) -> None:
        """A TCP connect that does not finish within connect_timeout is a connect error."""
        self.make(["192.0.2.1"], connect_timeout=5.0)
        d = self.pool.acquire()
        self.clock.advance(5)
        self.assertIn("timed out", str(self.failureResultOf(d, UpstreamConnectFailed).value))
        self.assertEqual(self.pool.open_count, 0)

    def test_tls_handshake_timeout(self) -> None:
        """A TLS handshake that does not finish within connect_timeout is a 'tls' error."""
        self.make(["192.0.2.1"], tls=True, connect_timeout=5.0)
        d = self.pool.acquire()
        transport = self.connector.last.tcp_up()
        self.assertNoResult(d)
        self.clock.advance(5)
        error = self.failureResultOf(d, UpstreamTLSFailed).value
        self.assertEqual(error.cause, "tls")
        self.assertFalse(transport.connected)
        self.assertEqual(self.pool.open_count, 0)

    def test_tls_connection_is_ready_after_the_handshake(self) -> None:
        """For TLS, acquire fires only once the handshake has completed."""
        self.make(["192.0.2.1"], tls=True)
        d = self.pool.acquire()
        self.connector.last.tcp_up()
        self.assertNoResult(d)
        self.connector.last.protocol.handshakeCompleted()
        self.successResultOf(d)

    def test_dns_failure(self) -> None:
        """A name that does not resolve fails acquire with cause 'dns'."""
        self.make(None)
        error = self.failureResultOf(self.pool.acquire(), DNSLookupFailed).value
        self.assertEqual(error.cause, "dns")
        self.assertEqual(self.connector.attempts, [])

    def test_close(self) -> None:
        """close() closes idle and busy connections, stops connecting, and fires when all are gone."""
        self.make(["192.0.2.1"])
        idle, busy = self.new(), self.new()
        self.serve(idle)
        connecting = self.pool.acquire(fresh=True)
        closed = self.pool.close()
        self.successResultOf(closed)
        self.failureResultOf(connecting)
        self.assertFalse(idle.protocol.transport.connected)
        self.assertFalse(busy.protocol.transport.connected)
        self.assertEqual(self.pool.open_count, 0)
        self.failureResultOf(self.pool.acquire(), UpstreamConnectFailed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_polite_close_without_answer_is_aborted(self) -> None:
        """A closing connection whose peer never finishes the close is aborted after a grace period."""
        self.make(["192.0.2.1"], idle_timeout=50.0)
        conn = self.new()
        self.serve(conn)
        transport = conn.protocol.transport
        aborted: list[bool] = []
        transport.loseConnection = lambda: None  # the peer never answers our close
        transport.abortConnection = lambda: aborted.append(True)
        self.clock.advance(50)
        self.assertEqual(aborted, [])
        self.clock.advance(5)
        self.assertEqual(aborted, [True])


class TrustRoot(SynchronousTestCase):
    def tempfile(self, content: bytes) -> str:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "ca.pem")
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_unreadable_bundle(self) -> None:
        """A CA bundle that cannot be read is a one-line ConfigError naming the option."""
        with self.assertRaises(ConfigError) as caught:
            make_trust_root("/nonexistent/ca.pem")
        self.assertEqual(
            str(caught.exception),
            "--upstream-ca-bundle '/nonexistent/ca.pem': cannot read it (No such file or directory);"
            " give a readable PEM file",
        )

    def test_bundle_without_certificates(self) -> None:
        """A file with no PEM certificate in it is a ConfigError."""
        path = self.tempfile(b"not a certificate\n")
        with self.assertRaises(ConfigError) as caught:
            make_trust_root(path)
        self.assertIn("no PEM certificate in it", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_bundle_certificates_are_added_to_the_context(self) -> None:
        """Every certificate of a bundle is added to the context's store (beside the defaults)."""
        path = self.tempfile(trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes())
        root = make_trust_root(path)
        added: list[Any] = []

        class Store:
            def add_cert(self, cert: Any) -> None:
                added.append(cert)

        class Context:
            defaults = False

            def set_default_verify_paths(self) -> None:
                self.defaults = True

            def get_cert_store(self) -> Store:
                return Store()

        context = Context()
        root._addCACertsToContext(context)
        self.assertTrue(context.defaults)
        self.assertEqual(len(added), 2)
