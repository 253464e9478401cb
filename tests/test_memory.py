"""Memory per connection: what an idle or closed HTTP/1.1 connection keeps."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.test_http1server import H, _connect, _Server


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
