"""The lean HTTP/1.1 server connection in memory: framing, keep-alive, pipelining, limits and
timeouts, with a recording handler and a Clock (no sockets)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.server.http1 import LINGER_IDLE, HTTP1Connection
from trackingproxy.server.http1request import H1Request


class _Server:
    """Answers every request at once with its method, target and body (or keeps it open)."""

    def __init__(self, answer: bool = True) -> None:
        self.clock = Clock()
        self.header_timeout = 10.0
        self.idle_timeout = 60.0
        self.body_timeout = 10.0
        self.answer = answer
        self.handled: list[H1Request] = []
        self.done: list[H1Request] = []
        self.opened = self.closed = 0

    def handle(self, request: H1Request) -> None:
        self.handled.append(request)
        if self.answer:
            request.respond(200, [], request.method + b" " + request.uri + b" " + request.body())

    def request_done(self, request: H1Request) -> None:
        self.done.append(request)

    def connection_opened(self, connection: Any) -> None:
        self.opened += 1

    def connection_closed(self, connection: Any) -> None:
        self.closed += 1

    def http2_connection(self, owner: Any) -> Any:
        raise AssertionError("no h2 on plain connections")


def _connect(server: _Server) -> tuple[HTTP1Connection, StringTransport]:
    conn = HTTP1Connection(server)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
    conn.makeConnection(transport)
    return conn, transport


H = b"Host: click.example.com\r\n"


class FramingTests(SynchronousTestCase):
    def test_one_write_per_answer_and_keep_alive(self) -> None:
        """An answer leaves in one write with Content-Length and Date; the connection stays
        open for HTTP/1.1 and the peer address is the transport's."""
        server = _Server()
        conn, transport = _connect(server)
        writes: list[bytes] = []
        transport.write = writes.append  # type: ignore[method-assign]
        conn._write = writes.append
        conn.dataReceived(b"GET /q/a HTTP/1.1\r\n" + H + b"\r\n")
        self.assertEqual(len(writes), 1)
        self.assertTrue(writes[0].startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"\r\nContent-Length: 9\r\n", writes[0])
        self.assertIn(b"\r\nDate: ", writes[0])
        self.assertNotIn(b"Connection: close", writes[0])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(server.handled[0].peer_host(), "192.0.2.9")
        self.assertEqual(server.handled[0].header(b"host"), b"click.example.com")

    def test_pipelined_requests_are_answered_in_order(self) -> None:
        """Three requests in one segment: three answers, in order, each handled only after the
        previous one is finished."""
        server = _Server(answer=False)
        conn, transport = _connect(server)
        conn.dataReceived(b"".join(b"GET /%d HTTP/1.1\r\n" % i + H + b"\r\n" for i in range(3)))
        self.assertEqual(len(server.handled), 1)
        server.handled[0].respond(200, [], b"zero")
        self.assertEqual(len(server.handled), 2)
        server.handled[1].respond(200, [], b"one")
        server.handled[2].respond(200, [], b"two")
        out = transport.value()
        self.assertLess(out.index(b"zero"), out.index(b"one"))
        self.assertLess(out.index(b"one"), out.index(b"two"))
        self.assertEqual([r.uri for r in server.done], [b"/0", b"/1", b"/2"])

    def test_connection_close_and_http10(self) -> None:
        """``Connection: close`` and HTTP/1.0 end the connection after the answer; what follows
        on the connection is not read."""
        for head in (b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n", b"GET / HTTP/1.0\r\n"):
            server = _Server()
            conn, transport = _connect(server)
            conn.dataReceived(head + b"\r\nGET /next HTTP/1.1\r\n" + H + b"\r\n")
            self.assertEqual(len(server.handled), 1)
            self.assertTrue(transport.disconnecting)

    def test_chunked_body_and_streamed_answer(self) -> None:
        """A chunked request body arrives whole; an answer of unknown length is sent chunked
        to an HTTP/1.1 client, with the head in the first write."""
        server = _Server(answer=False)
        conn, transport = _connect(server)
        conn.dataReceived(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        request = server.handled[0]
        self.assertEqual(request.body(), b"abcde")
        request.start(200, b"OK", [(b"Content-Type", b"text/plain")], None, True)
        self.assertEqual(transport.value(), b"")
        request.write(b"hello")
        request.finish()
        out = transport.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), out)

    def test_head_answer_has_no_body(self) -> None:
        """HEAD gets the headers (with the length) and no body."""
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(b"HEAD /q/a HTTP/1.1\r\n" + H + b"\r\n")
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
        self.assertIn(b"Content-Length: 10\r\n", transport.value())


class LimitTests(SynchronousTestCase):
    def status(self, payload: bytes) -> tuple[bytes, _Server, StringTransport]:
        """The status answered to ``payload``; the connection, lingering after an error
        answer, is closed once no byte came for LINGER_IDLE."""
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(payload)
        self.assertFalse(transport.disconnecting)  # lingering: still reading
        server.clock.advance(LINGER_IDLE)
        return transport.value()[9:12], server, transport

    def test_body_over_the_limit_is_refused_at_once(self) -> None:
        """A Content-Length over 64 KiB gets 413 and a close before any body arrives."""
        status, server, transport = self.status(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Content-Length: 70000\r\n\r\n"
        )
        self.assertEqual(status, b"413")
        self.assertEqual(server.handled, [])
        self.assertTrue(transport.disconnecting)

    def test_chunked_body_over_the_limit(self) -> None:
        """A chunked body that grows over 64 KiB gets 413 too."""
        chunk = b"%x\r\n%s\r\n" % (40000, b"a" * 40000)
        status, server, _ = self.status(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2
        )
        self.assertEqual(status, b"413")
        self.assertEqual(server.handled, [])

    def test_header_limits(self) -> None:
        """101 header fields, 16 KiB of header values, or a 70,000-byte target: 4xx and close,
        nothing handled."""
        many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        for payload, expected in (
            (b"GET / HTTP/1.1\r\n" + H + many + b"\r\n", b"431"),
            (b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
            (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n" + H + b"\r\n", b"414"),
            (b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", b"400"),
            (b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", b"400"),
        ):
            status, server, transport = self.status(payload)
            self.assertEqual(status, expected, payload[:60])
            self.assertEqual(server.handled, [])
            self.assertTrue(transport.disconnecting)


class TimeoutTests(SynchronousTestCase):
    def test_slow_headers_are_aborted(self) -> None:
        """A request head still incomplete after the header timeout is aborted, even though
        bytes keep arriving."""
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(9):
            server.clock.advance(1)
            conn.dataReceived(b"X-A: b\r\n")
        self.assertFalse(transport.disconnected)
        server.clock.advance(1.5)
        self.assertTrue(transport.disconnected)

    def test_idle_keep_alive_is_closed(self) -> None:
        """After an answer, a connection that says nothing is closed after the idle timeout,
        not before; a request in between restarts the wait."""
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        server.clock.advance(50)
        conn.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        for _ in range(11):
            server.clock.advance(5)
        self.assertFalse(transport.disconnecting)
        server.clock.advance(6)
        self.assertTrue(transport.disconnecting)

    def test_client_gone_mid_answer(self) -> None:
        """A client that goes away while its request is open: the handler hears of it, the
        request is not logged as done, the timer is gone."""
        server = _Server(answer=False)
        conn, _ = _connect(server)
        conn.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        lost: list[bool] = []
        server.handled[0].on_lost(lambda: lost.append(True))
        finished = server.handled[0].notifyFinish()
        conn.connectionLost()
        self.assertEqual(lost, [True])
        self.failureResultOf(finished)
        self.assertEqual(server.done, [])
        self.assertEqual((server.opened, server.closed), (1, 1))
        self.assertEqual(server.clock.getDelayedCalls(), [])


class ShutdownNoticeTests(SynchronousTestCase):
    def test_idle_connection_closes_at_once(self) -> None:
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        self.assertFalse(transport.disconnecting)
        conn.shutdown_notice()
        self.assertTrue(transport.disconnecting)

    def test_answers_owed_close_the_connection_after_them(self) -> None:
        """A request in flight and one pipelined behind it are both answered, the last with
        ``Connection: close``, then the connection closes."""
        server = _Server(answer=False)
        conn, transport = _connect(server)
        conn.dataReceived(
            b"GET /a HTTP/1.1\r\n" + H + b"\r\n" + b"GET /b HTTP/1.1\r\n" + H + b"\r\n"
        )
        conn.shutdown_notice()
        server.handled[0].respond(200, [], b"a")
        self.assertNotIn(b"Connection: close", transport.value())
        self.assertFalse(transport.disconnecting)
        self.assertEqual([r.uri for r in server.handled], [b"/a", b"/b"])
        server.handled[1].respond(200, [], b"b")
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_request_after_the_notice_gets_connection_close(self) -> None:
        server = _Server(answer=False)
        conn, transport = _connect(server)
        conn.dataReceived(b"GET / HTTP/1.1\r\n" + H)  # head not complete yet: not closed
        conn.shutdown_notice()
        self.assertFalse(transport.disconnecting)
        conn.dataReceived(b"\r\n")
        server.handled[0].respond(200, [], b"ok")
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)
