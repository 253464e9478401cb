"""Memory per connection: what an idle or closed HTTP/1.1 connection keeps, and the allocator
trim after a wave of closed connections (``trackingproxy.ops.malloctrim``), on a Clock."""

from __future__ import annotations

import gc
import platform
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.server.test_http1 import H, _connect, _Server
from trackingproxy.ops.malloctrim import AllocatorTrim, glibc_malloc_trim
from trackingproxy.server.listener import HTTPListener


class _Handler:
    def handle(self, exchange: object) -> None:
        raise AssertionError("no request expected")


@contextmanager
def _no_collector() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ConnectionMemoryTests(SynchronousTestCase):
    def _freed_by_refcount(self, data: bytes) -> bool:
        server = _Server(answer=True)
        conn, transport = _connect(server)
        conn.dataReceived(data)
        conn.connectionLost(Failure(ConnectionDone()))
        server.handled.clear()
        server.done.clear()
        ref = weakref.ref(conn)
        with _no_collector():
            del conn, transport
            return ref() is None

    def test_closed_connection_is_freed_without_the_collector(self) -> None:
        """A connection closed in the middle of a request head (its parser alive) or after an
        answer is freed by reference counting alone: it is not part of a reference cycle that
        would wait for the (tuned, rarely running) garbage collector."""
        self.assertTrue(self._freed_by_refcount(b"GET /q/a HTTP/1.1\r\nHost: cl"))
        self.assertTrue(self._freed_by_refcount(b"GET /q/a HTTP/1.1\r\n" + H + b"\r\n"))

    def test_idle_connection_keeps_no_parser_and_no_head(self) -> None:
        """Once its answer is written an idle keep-alive connection holds no parser and not the
        last request's head; the next request on it is parsed and answered as usual."""
        server = _Server(answer=True)
        conn, transport = _connect(server)
        conn.dataReceived(b"GET /q/a HTTP/1.1\r\n" + H + b"X-A: 1\r\n\r\n")
        self.assertIsNone(conn._parser)
        self.assertEqual((conn._url, conn._headers), (b"", []))
        transport.clear()
        conn.dataReceived(b"GET /q/b HTTP/1.1\r\n" + H + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(transport.value().endswith(b"GET /q/b "))
        self.assertEqual(server.handled[1].header(b"host"), b"click.example.com")

    def test_parser_kept_while_a_request_is_open(self) -> None:
        """A request still being answered, a head or a body still arriving keep the parser, and
        a head split across reads is parsed as one."""
        server = _Server(answer=False)
        conn, transport = _connect(server)
        conn.dataReceived(b"GET /q/a HTTP/1.1\r\n" + H + b"\r\nGET /q/b HTT")
        self.assertIsNotNone(conn._parser)
        server.handled[0].respond(200, [], b"a")
        self.assertIsNotNone(conn._parser)  # /q/b is half-way through its head
        conn.dataReceived(b"P/1.1\r\n" + H + b"\r\n")
        self.assertEqual([r.uri for r in server.handled], [b"/q/a", b"/q/b"])
        server.handled[1].respond(200, [], b"b")
        self.assertIsNone(conn._parser)
        conn.dataReceived(b"POST /q/c HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n\r\nab")
        self.assertIsNotNone(conn._parser)
        conn.dataReceived(b"cd")
        self.assertEqual(server.handled[2].body(), b"abcd")


class AllocatorTrimTests(SynchronousTestCase):
    def test_one_trim_after_a_wave_of_closes(self) -> None:
        """Nothing is trimmed below ``after`` closed connections; reaching it schedules one trim
        ``delay`` seconds later, however many more close meanwhile; the count starts again."""
        clock, calls = Clock(), []
        trimmer = AllocatorTrim(clock, lambda: calls.append(clock.seconds()), after=3, delay=5)
        trimmer.connection_closed()
        trimmer.connection_closed()
        clock.advance(60)
        self.assertEqual(calls, [])
        for _ in range(10):
            trimmer.connection_closed()
        clock.advance(4.9)
        self.assertEqual(calls, [])
        clock.advance(0.1)
        self.assertEqual(calls, [65.0])
        self.assertEqual(clock.getDelayedCalls(), [])
        trimmer.connection_closed()
        trimmer.connection_closed()
        clock.advance(60)
        self.assertEqual(len(calls), 1)
        trimmer.connection_closed()
        clock.advance(5)
        self.assertEqual(len(calls), 2)

    def test_stop_cancels_a_pending_trim(self) -> None:
        """stop() cancels a scheduled trim and closes schedule none until start(); the closes
        meanwhile still count."""
        clock, calls = Clock(), []
        trimmer = AllocatorTrim(clock, lambda: calls.append(1), after=2)
        trimmer.connection_closed()
        trimmer.connection_closed()
        trimmer.stop()
        trimmer.connection_closed()
        clock.advance(60)
        self.assertEqual((calls, clock.getDelayedCalls()), ([], []))
        trimmer.start()
        trimmer.connection_closed()
        clock.advance(5)
        self.assertEqual(calls, [1])

    def test_stopping_the_service_cancels_a_pending_trim(self) -> None:
        """As a Service: stopping (SIGTERM) cancels the pending trim and schedules none until
        started again."""
        clock = Clock()
        calls: list[int] = []
        trimmer = AllocatorTrim(clock, lambda: calls.append(1), after=1)
        trimmer.startService()
        trimmer.connection_closed()
        trimmer.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        trimmer.connection_closed()
        self.assertEqual(clock.getDelayedCalls(), [])
        trimmer.startService()
        trimmer.connection_closed()
        clock.advance(5)
        self.assertEqual(calls, [1])

    def test_glibc_trim_function(self) -> None:
        """Under glibc the trim function is malloc_trim(0), which runs and answers 0 or 1;
        under another C library there is none."""
        trim = glibc_malloc_trim()
        if platform.libc_ver()[0] == "glibc":
            assert trim is not None
            self.assertIn(trim(), (0, 1))
        else:
            self.assertIsNone(trim)

    def test_a_site_reports_its_closed_connections(self) -> None:
        """Closed HTTP/1.1 connections of a listener's site reach the trimmer it was given."""
        clock = Clock()
        trimmer = AllocatorTrim(clock, lambda: None, after=2)
        site = HTTPListener(_Handler(), clock, [trimmer])
        for _ in range(2):
            conn = site.buildProtocol(None)
            conn.makeConnection(StringTransport())
            conn.connectionLost(Failure(ConnectionDone()))
        clock.advance(5)
        self.assertEqual(trimmer.trims, 1)
