"""HTTP/1.1 server defects found by an outside attack (issue 12: defects 3, 4, 8, 9, 10 and the
HTTP/1.1 half of 2), each in memory with a Clock unless a real socket is what matters."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import DOMAIN, start_proxy, stop_proxy
from tests.hostile.memory import build_memory_proxy
from tests.server.test_http1 import H, _connect, _Server
from trackingproxy.server.http1 import LINGER_IDLE
from trackingproxy.server.http1request import H1Request

_STATUS_LINE = re.compile(rb"HTTP/1\.1 \d{3} [^\r\n]*")


def _answers(transport: StringTransport) -> list[bytes]:
    """The status lines the connection wrote (bodies here never hold one)."""
    return _STATUS_LINE.findall(transport.value())


class HeadAccounting(SynchronousTestCase):
    def test_a_large_read_ending_mid_head_is_not_431(self) -> None:
        """Complete requests and bodies earlier in a read do not count against the head that
        the read ends in (before: any read over 40 KiB ending mid-head got 431)."""
        server = _Server()
        conn, transport = _connect(server)
        post = b"POST /f/x HTTP/1.1\r\n" + H + b"Content-Length: 20000\r\n\r\n" + b"a" * 20000
        conn.dataReceived(post * 3 + b"GET /q/last HTTP/1.1\r\nHo")
        conn.dataReceived(b"st: click.example.com\r\n\r\n")
        self.assertEqual(_answers(transport), [b"HTTP/1.1 200 OK"] * 4)
        self.assertEqual(server.handled[-1].uri, b"/q/last")

    def test_a_head_that_is_too_large_still_is(self) -> None:
        """A head with 40 KiB of unreported bytes (a header value never ending) is 431."""
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 15000)
        for _ in range(3):
            conn.dataReceived(b"a" * 15000)
        self.assertEqual(_answers(transport), [b"HTTP/1.1 431 Request Header Fields Too Large"])


class Trailers(SynchronousTestCase):
    def test_trailer_fields_are_dropped(self) -> None:
        """Fields sent as chunked trailers never join the request's fields (before:
        Authorization, Cookie, X-Forwarded-For... reached the upstream as headers)."""
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nAuthorization: Basic eA==\r\nCookie: a=b\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nContent-Type: text/evil\r\nExpect: 100-continue\r\n\r\n"
        )
        request = server.handled[0]
        self.assertEqual(request.body(), b"abc")
        names = [name for name, _ in request.headers]
        self.assertEqual(names, [b"host", b"transfer-encoding"])

    def test_trailers_are_bounded(self) -> None:
        """Trailer fields count against the header limit: 431."""
        server = _Server()
        conn, transport = _connect(server)
        trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        conn.dataReceived(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n"
            + trailers + b"\r\n"
        )
        server.clock.advance(LINGER_IDLE)
        self.assertEqual(server.handled, [])
        self.assertEqual(_answers(transport), [b"HTTP/1.1 431 Request Header Fields Too Large"])


class IdleTimeout(SynchronousTestCase):
    def test_blank_lines_do_not_keep_a_connection_open(self) -> None:
        """Bytes that start no request (CRLF, which the parser skips) do not reset the idle
        clock: the connection closes at the idle timeout, before or after a request (found
        by the resource matrix: a CRLF every 59 s held a connection for good)."""
        for first in (b"", b"GET /q/a HTTP/1.1\r\n" + H + b"\r\n"):
            with self.subTest(first=first):
                server = _Server()
                conn, transport = _connect(server)
                if first:
                    conn.dataReceived(first)
                for _ in range(130):
                    server.clock.advance(0.5)
                    conn.dataReceived(b"\r\n")
                    if transport.disconnecting:
                        break
                self.assertTrue(transport.disconnecting)
                self.assertLessEqual(server.clock.seconds(), 61)


class BodyTimeout(SynchronousTestCase):
    def test_a_slow_body_is_cut_at_the_body_timeout(self) -> None:
        """One body byte every 2 s keeps no connection beyond the body timeout: 408 and a
        close (before: every byte reset the idle timer, for days)."""
        for framing, first in (
            (b"Content-Length: 100\r\n", b"a"),
            (b"Transfer-Encoding: chunked\r\n", b"64\r\na"),
        ):
            with self.subTest(framing=framing):
                server = _Server()
                conn, transport = _connect(server)
                conn.dataReceived(b"POST /f/x HTTP/1.1\r\n" + H + framing + b"\r\n" + first)
                for _ in range(4):
                    server.clock.advance(2)
                    conn.dataReceived(b"a")
                self.assertEqual(transport.value(), b"")
                server.clock.advance(2)
                self.assertEqual(_answers(transport), [b"HTTP/1.1 408 Request Timeout"])
                server.clock.advance(LINGER_IDLE)
                self.assertTrue(transport.disconnecting)
                self.assertEqual(server.handled, [])


class Framing(SynchronousTestCase):
    def status(self, payload: bytes | list[bytes]) -> tuple[list[bytes], _Server]:
        server = _Server()
        conn, transport = _connect(server)
        for part in [payload] if isinstance(payload, bytes) else payload:
            conn.dataReceived(part)
        return _answers(transport), server

    def test_upgrade_with_a_body_is_400(self) -> None:
        """An Upgrade request with a body is refused (before: forwarded with no body)."""
        answers, server = self.status(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        self.assertEqual((answers, server.handled), ([b"HTTP/1.1 400 Bad Request"], []))

    def test_http11_without_host_is_400(self) -> None:
        """RFC 9112 3.2: no Host, in origin or absolute form: 400."""
        for target in (b"/q/x", b"http://click.example.com/q/x"):
            answers, server = self.status(b"GET " + target + b" HTTP/1.1\r\n\r\n")
            self.assertEqual((answers, server.handled), ([b"HTTP/1.1 400 Bad Request"], []))

    def test_te_other_than_chunked_is_501(self) -> None:
        """A transfer coding we do not implement is not silently dropped: 501."""
        answers, server = self.status(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
        )
        self.assertEqual((answers, server.handled), ([b"HTTP/1.1 501 Not Implemented"], []))

    def test_chunk_extension_split_across_reads_is_400(self) -> None:
        """The 1 KiB extension limit holds however the reads split it."""
        head = b"POST /f/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;x="
        answers, server = self.status([head] + [b"a" * 100] * 12)
        self.assertEqual((answers, server.handled), ([b"HTTP/1.1 400 Bad Request"], []))

    def test_expect_100_continue_is_answered(self) -> None:
        """Expect: 100-continue with a body gets 100 Continue before the body; another
        expectation gets 417."""
        server = _Server()
        conn, transport = _connect(server)
        conn.dataReceived(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.dataReceived(b"abc")
        self.assertEqual(_answers(transport), [b"HTTP/1.1 100 Continue", b"HTTP/1.1 200 OK"])
        answers, server = self.status(
            b"POST /f/x HTTP/1.1\r\n" + H + b"Expect: magic\r\nContent-Length: 3\r\n\r\nabc"
        )
        self.assertEqual((answers, server.handled), ([b"HTTP/1.1 417 Expectation Failed"], []))

    def test_fragment_is_not_part_of_the_target(self) -> None:
        """A #fragment is dropped from the request target (never forwarded)."""
        answers, server = self.status(b"GET /f/x?a=1#frag HTTP/1.1\r\n" + H + b"\r\n")
        self.assertEqual(server.handled[0].uri, b"/f/x?a=1")

    def test_304_has_no_content_length(self) -> None:
        """A streamed 304 is sent without Content-Length: 0 (it would claim the 200's size)."""
        server = _Server(answer=False)
        conn, transport = _connect(server)
        conn.dataReceived(b"GET /q/x HTTP/1.1\r\n" + H + b"\r\n")
        request: H1Request = server.handled[0]
        request.start(304, b"Not Modified", [(b"ETag", b'"x"')], 0, True)
        request.finish()
        self.assertNotIn(b"Content-Length", transport.value())
        self.assertIn(b"304 Not Modified", transport.value())


class ForwardedFields(SynchronousTestCase):
    def test_client_address_claims_are_dropped_from_untrusted_peers(self) -> None:
        """True-Client-IP, X-Client-IP, CF-Connecting-IP, X-Real-IP (also X_Real_IP),
        X-Original-URL, X-Rewrite-URL, X-HTTP-Method-Override and Expect never reach the
        upstream from an untrusted peer; from a --trusted-proxy they pass."""
        claims = (
            b"True-Client-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\n"
            b"X-Real-IP: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\n"
            b"X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n"
            b"X-HTTP-Method-Override: DELETE\r\nX-Keep: 1\r\n"
        )
        raw = b"GET /f/x HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n" + claims + b"\r\n"
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        proxy = build_memory_proxy(tmp, [[DOMAIN]], [DOMAIN], "--trusted-proxy", "10.0.0.1")
        proxy.http_exchange(raw, peer="198.51.100.7")
        names = [name for name, _ in proxy.upstream.seen[-1].headers]
        self.assertEqual(
            names, [b"x-keep", b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"]
        )
        proxy.http_exchange(raw, peer="10.0.0.1")
        names = [name for name, _ in proxy.upstream.seen[-1].headers]
        self.assertIn(b"true-client-ip", names)
        self.assertIn(b"x-real-ip", names)
        self.assertNotIn(b"x_forwarded_for", names)  # ours is the only X-Forwarded-For


def _send_then_read(port: int, payload: bytes, rcvbuf: int) -> bytes:
    """A raw blocking client (run in a thread): a small receive buffer, everything sent (or
    as much as the server takes within 2 s) before reading; what it read, and how it ended."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", port))
        s.settimeout(2)
        with contextlib.suppress(OSError):  # the server may stop taking bytes: we read anyway
            s.sendall(payload)
        s.settimeout(10)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError as e:
            return data + f" <{type(e).__name__}>".encode()
        return data


class RealSockets(TestCase):
    timeout = 60

    def start(self, *extra: str) -> Any:
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        running = start_proxy(tmp, *extra)
        self.addCleanup(stop_proxy, running)
        return running

    @inlineCallbacks
    def test_an_error_answer_survives_unread_request_bytes(self):
        """A 1 MiB answer, then a 431 and a close while request bytes keep coming, to a client
        that reads slowly: it reads all of both (lingering close; before: the close with
        unread input made the kernel reset the connection and drop what was still unsent)."""
        running = self.start()
        host = b"Host: " + DOMAIN.encode() + b"\r\n"
        payload = (
            b"GET /big HTTP/1.1\r\n" + host + b"\r\n"
            + b"GET / HTTP/1.1\r\n" + host + b"X-A: " + b"a" * 50000 + b"\r\n\r\n"
            + b"b" * 4 * 1024 * 1024
        )
        data = yield deferToThread(_send_then_read, running.http_port, payload, 4096)
        self.assertIn(b"HTTP/1.1 431 ", data[-300:], data[-300:])
        self.assertGreaterEqual(data.count(b"x"), 1024 * 1024)  # all of /big arrived

    @inlineCallbacks
    def test_pipelined_requests_whose_answers_are_not_read_stop_being_read(self):
        """A client that pipelines 100,000 requests and reads nothing: the proxy stops taking
        requests once its output to that client is full, and holds at most 64 KiB plus one
        answer for it (before: it answered them all into an ever-growing buffer, 15 MB);
        once the client reads, every one is answered."""
        running = self.start("--access-log", "off")
        running.standin.holding = False
        one = b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n\r\n"
        count = 100_000
        handled: list[int] = []
        site = None
        for child in running.service:
            if getattr(child, "option", "") == "--http-port":
                site = child.factory
        assert site is not None
        original = site.request_done

        connections = set()

        def counting(exchange: Any) -> None:
            handled.append(1)
            connections.add(exchange._conn)
            original(exchange)

        site.request_done = counting
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", running.http_port))
        s.setblocking(False)
        payload = one * count
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(payload) and time.monotonic() < deadline:
            try:
                sent += s.send(payload[sent : sent + 65536])
            except BlockingIOError:
                yield deferLater(reactor, 0.01)
        yield deferLater(reactor, 0.5)
        stalled = len(handled)
        self.assertLess(stalled, count // 2, "the proxy kept answering a client that reads nothing")
        [conn] = connections
        tcp = conn.transport
        buffered = tcp._tempDataLen + len(tcp.dataBuffer) - tcp.offset
        self.assertLessEqual(buffered, 64 * 1024 + 1024)
        pattern = b"HTTP/1.1 404 "
        tail = b""
        answers = 0
        deadline = time.monotonic() + 30
        while answers < count and time.monotonic() < deadline:
            if sent < len(payload):
                with contextlib.suppress(BlockingIOError):
                    sent += s.send(payload[sent : sent + 65536])
            try:
                chunk = s.recv(1 << 20)
            except BlockingIOError:
                yield deferLater(reactor, 0.005)
                continue
            if not chunk:
                break
            window = tail + chunk  # a status line may be split between reads
            answers += window.count(pattern)
            tail = window[-(len(pattern) - 1) :]
        s.close()
        self.assertEqual(answers, count)


def deferLater(clock: Any, seconds: float) -> Any:
    from twisted.internet.task import deferLater as _later

    return _later(clock, seconds, lambda: None)

