"""The lean HTTP/2 server connection in memory, driven by a real ``h2`` client state machine:
answers, streaming and flow control, bodies and limits, refused and malformed streams, resets,
rapid reset, idle timeout (a recording handler and a Clock; no sockets)."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events as ev
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.server.http2 import H2ServerBase
from trackingproxy.server.http2_nghttp2 import NativeH2Connection
from trackingproxy.server.http2_python import PythonH2Connection
from trackingproxy.server.http2request import H2Request
from trackingproxy.server.limits import MAX_BODY, MAX_HEADERS, MAX_STREAMS

AUTHORITY = b"click.example.com"


class _Server:
    """Records each request; answers at once with method, target and body unless told not to."""

    def __init__(self, answer: bool = True) -> None:
        self.clock = Clock()
        self.idle_timeout = 60.0
        self.body_timeout = 600.0  # out of the way; tests/hostile/test_h2_streams.py sets it
        self.answer = answer
        self.handled: list[H2Request] = []
        self.done: list[H2Request] = []

    def handle(self, request: Any) -> None:
        self.handled.append(request)
        if request.too_large:
            request.respond(413, [], b"too large")
        elif self.answer:
            request.respond(
                200,
                [(b"X-Echo", b"1")],
                request.method + b" " + request.uri + b" " + request.body(),
            )

    def request_done(self, request: Any) -> None:
        self.done.append(request)


class _Owner:
    def peer_host(self) -> str:
        return "192.0.2.9"

    def sni(self) -> str | None:
        return "click.example.com"


class _Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


def _request(
    path: bytes = b"/q/abc", method: bytes = b"GET", *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", AUTHORITY),
        (b":path", path),
        *extra,
    ]


def _frames(data: bytes) -> list[Any]:
    """The HTTP/2 frames in ``data`` (hyperframe, no HPACK)."""
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


class _Peer:
    """A client: an ``h2`` client connection wired to the server connection in memory."""

    def __init__(
        self,
        engine: type[H2ServerBase],
        server: _Server,
        strict: bool = True,
        window: int | None = None,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=strict,
            normalize_outbound_headers=strict,
        )
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        if window is not None:
            self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.auto_ack = True  # acknowledge DATA as it arrives, as real clients do
        self.transport = StringTransport()
        self.conn = engine(server, _Owner())
        self.conn.makeConnection(self.transport)
        self.events: list[Any] = []
        self.pump()

    def pump(self) -> list[Any]:
        """Exchange bytes until neither side has anything to say; the client's new events."""
        new: list[Any] = []
        for _ in range(50):
            out = self.client.data_to_send()
            if out:
                self.conn.dataReceived(out)
            back = self.transport.value()
            self.transport.clear()
            if back:
                events = self.client.receive_data(back)
                if self.auto_ack:
                    self._ack(events)
                new += events
            if not out and not back:
                break
        self.events += new
        return new

    def _ack(self, events: list[Any]) -> None:
        for e in events:
            if isinstance(e, ev.DataReceived) and e.flow_controlled_length:
                self.client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)

    def send(self, headers: list[tuple[bytes, bytes]], body: bytes = b"", end: bool = True) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self.client.send_data(stream_id, body, end_stream=end)
        self.pump()
        return stream_id

    def of(self, stream_id: int, kind: type) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and getattr(e, "stream_id", None) == stream_id
        ]

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(stream_id, ev.DataReceived))

    def response(self, stream_id: int) -> dict[bytes, bytes]:
        (response,) = self.of(stream_id, ev.ResponseReceived)
        return dict(response.headers)


class _EngineCases:
    """The cases below run once per engine (the classes made at the end of this module)."""

    engine: type[H2ServerBase]
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIn: Any
    assertLess: Any
    assertIs: Any
    assertIsNone: Any


class AnswerTests(_EngineCases):
    def test_get_is_answered_with_length_and_date(self) -> None:
        """A GET reaches the handler as an HTTP/2 exchange (Host from :authority) and its
        answer arrives as one response with Content-Length and Date, then END_STREAM."""
        server = _Server()
        peer = _Peer(self.engine, server)
        sid = peer.send(_request(b"/q/abc?x=1", b"GET", (b"user-agent", b"t")))
        (request,) = server.handled
        self.assertEqual(
            (request.method, request.uri, request.clientproto), (b"GET", b"/q/abc?x=1", b"HTTP/2")
        )
        self.assertEqual(request.header(b"host"), AUTHORITY)
        self.assertEqual(request.header(b"user-agent"), b"t")
        self.assertEqual([n for n, _ in request.header_items() if n.startswith(b":")], [])
        self.assertEqual((request.peer_host(), request.sni()), ("192.0.2.9", "click.example.com"))
        headers = peer.response(sid)
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(headers[b"x-echo"], b"1")
        self.assertEqual(headers[b"content-length"], b"%d" % len(b"GET /q/abc?x=1 "))
        self.assertIn(b"date", headers)
        self.assertEqual(peer.body(sid), b"GET /q/abc?x=1 ")
        self.assertEqual(len(peer.of(sid, ev.StreamEnded)), 1)
        self.assertEqual(server.done, [request])

    def test_streamed_answer_with_known_length_ends_on_its_last_byte(self) -> None:
        """start() keeps the head until the first body byte; the DATA frame carrying the last
        byte of a known length ends the stream, and finish() sends nothing more."""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        sid = peer.send(_request())
        (request,) = server.handled
        request.start(200, b"OK", [(b"Content-Type", b"image/gif")], 6, True)
        peer.pump()
        self.assertEqual(peer.of(sid, ev.ResponseReceived), [])  # head held back
        request.write(b"abc")
        request.write(b"def")
        peer.pump()
        self.assertEqual(peer.response(sid)[b"content-type"], b"image/gif")
        self.assertEqual(peer.body(sid), b"abcdef")
        self.assertEqual(len(peer.of(sid, ev.StreamEnded)), 1)
        request.finish()
        self.assertEqual(peer.pump(), [])
        self.assertEqual(server.done, [request])

    def test_unknown_length_and_head(self) -> None:
        """An answer of unknown length ends with an empty END_STREAM DATA frame; a HEAD answer
        keeps its Content-Length and carries no body."""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        sid = peer.send(_request())
        sid_head = peer.send(_request(b"/q/h", b"HEAD"))
        get, head = server.handled
        get.start(200, b"OK", [], None, False)
        get.write(b"part")
        get.finish()
        head.start(200, b"OK", [], 44, False)
        head.write(b"x" * 44)
        head.finish()
        peer.pump()
        self.assertEqual(peer.body(sid), b"part")
        self.assertEqual(len(peer.of(sid, ev.StreamEnded)), 1)
        self.assertEqual(peer.response(sid_head)[b"content-length"], b"44")
        self.assertEqual(peer.body(sid_head), b"")
        self.assertEqual(len(peer.of(sid_head, ev.StreamEnded)), 1)

    def test_many_streams_on_one_connection(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        sids = [peer.send(_request(b"/q/%d" % i)) for i in range(30)]
        self.assertEqual([peer.body(s) for s in sids], [b"GET /q/%d " % i for i in range(30)])


class FlowControlTests(_EngineCases):
    def test_answer_larger_than_the_window_waits_and_pauses_the_producer(self) -> None:
        """A 300 KiB answer to a client with a 16 KiB window: only the window leaves, and the
        upstream producer is paused (beyond the engine's buffer); as the client acknowledges
        it is resumed once, and everything arrives in order, the end after finish()."""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server, window=16384)
        peer.auto_ack = False
        sid = peer.send(_request())
        (request,) = server.handled
        producer = _Producer()
        big = bytes(range(256)) * 1200
        request.start(200, b"OK", [], len(big) + 1000, False)
        request.register_producer(producer)
        request.write(big)
        peer.pump()
        self.assertEqual(len(peer.body(sid)), 16384)
        self.assertEqual((producer.paused, producer.resumed), (1, 0))
        peer.auto_ack = True
        peer._ack(peer.of(sid, ev.DataReceived))
        for _ in range(20):
            if not peer.pump():
                break
        self.assertEqual(peer.body(sid), big)
        self.assertEqual((producer.paused, producer.resumed), (1, 1))
        self.assertEqual(peer.of(sid, ev.StreamEnded), [])
        request.write(b"z" * 1000)
        request.finish()
        peer.pump()
        self.assertEqual(peer.body(sid), big + b"z" * 1000)
        self.assertEqual(len(peer.of(sid, ev.StreamEnded)), 1)
        self.assertEqual(server.done, [request])

    def test_transport_back_pressure_pauses_stream_producers(self) -> None:
        """The connection is its transport's producer for its whole life: a full transport
        pauses the stream's upstream body and reading, both resume with it; an unregistered
        body is left alone; the close unregisters (TLS would hold loseConnection back)."""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        peer.send(_request())
        (request,) = server.handled
        producer = _Producer()
        pusher = peer.transport.producer
        self.assertIsNotNone(pusher)
        self.assertTrue(peer.transport.streaming)
        request.register_producer(producer)
        self.assertIs(peer.transport.producer, pusher)
        pusher.pauseProducing()
        self.assertEqual((producer.paused, peer.transport.producerState), (1, "paused"))
        pusher.resumeProducing()
        self.assertEqual((producer.resumed, peer.transport.producerState), (1, "producing"))
        request.unregister_producer()
        pusher.pauseProducing()
        self.assertEqual(producer.paused, 1)
        pusher.resumeProducing()
        request.respond(200, [], b"done")
        peer.conn.shutdown_notice()  # nothing in flight: GOAWAY and close
        self.assertTrue(peer.transport.disconnecting)
        self.assertIsNone(peer.transport.producer)


class BodyAndLimitTests(_EngineCases):
    def test_post_body_is_collected(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        sid = peer.send(_request(b"/f/p", b"POST", (b"content-length", b"5")), b"hello")
        self.assertEqual(peer.body(sid), b"POST /f/p hello")

    def test_body_over_the_limit_is_answered_413_at_once_then_reset_no_error(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        stream_id = peer.client.get_next_available_stream_id()
        peer.client.send_headers(stream_id, _request(b"/f/big", b"POST"))
        chunk = b"x" * 16000
        for _ in range((MAX_BODY // len(chunk)) + 2):
            if peer.of(stream_id, ev.StreamReset):
                break
            peer.client.send_data(stream_id, chunk)
            peer.pump()
        (request,) = server.handled
        self.assertTrue(request.too_large)
        self.assertEqual(peer.response(stream_id)[b":status"], b"413")
        resets = peer.of(stream_id, ev.StreamReset)
        self.assertEqual([r.error_code for r in resets], [ErrorCodes.NO_ERROR])

    def test_content_length_over_the_limit_is_refused_before_the_body(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        sid = peer.send(
            _request(b"/f/big", b"POST", (b"content-length", b"%d" % (MAX_BODY + 1))), end=False
        )
        self.assertEqual(peer.response(sid)[b":status"], b"413")

    def test_too_many_headers_is_431_without_the_handler(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        extra = [(b"x-h%d" % i, b"v") for i in range(MAX_HEADERS + 1)]
        sid = peer.send(_request(b"/q/h", b"GET", *extra))
        self.assertEqual(peer.response(sid)[b":status"], b"431")
        self.assertEqual(server.handled, [])


class RefusedTests(_EngineCases):
    def test_connect_is_reset(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        sid = peer.send([(b":method", b"CONNECT"), (b":authority", b"evil.example:443")])
        self.assertEqual(
            [r.error_code for r in peer.of(sid, ev.StreamReset)], [ErrorCodes.PROTOCOL_ERROR]
        )
        self.assertEqual(server.handled, [])

    def test_malformed_blocks_never_reach_the_handler(self) -> None:
        """Connection-specific fields, upper-case names, CR/LF in values, :authority and Host
        that differ: a stream reset or a GOAWAY, never a request for the handler."""
        cases = [
            (b"connection", b"keep-alive"),
            (b"transfer-encoding", b"chunked"),
            (b"te", b"gzip"),
            (b"X-Upper", b"1"),
            (b"x-a", b"b\r\nx-evil: 1"),
            (b"host", b"evil.example"),
        ]
        for extra in cases:
            server = _Server()
            peer = _Peer(self.engine, server, strict=False)
            sid = peer.send(_request(b"/q/m", b"GET", extra))
            refused = peer.of(sid, ev.StreamReset) or [
                e for e in peer.events if isinstance(e, ev.ConnectionTerminated)
            ]
            self.assertTrue(refused, extra)
            self.assertEqual(server.handled, [], extra)


class ResetAndLifetimeTests(_EngineCases):
    def test_client_reset_tells_the_handler(self) -> None:
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        sid = peer.send(_request())
        (request,) = server.handled
        lost: list[bool] = []
        request.on_lost(lambda: lost.append(True))
        failed: list[Any] = []
        request.notifyFinish().addErrback(failed.append)
        peer.client.reset_stream(sid, ErrorCodes.CANCEL)
        peer.pump()
        self.assertEqual((lost, len(failed)), ([True], 1))
        request.respond(200, [], b"late")  # a late answer to a reset stream: nothing breaks
        peer.pump()
        self.assertFalse(peer.transport.disconnecting)

    def test_rapid_reset_gets_goaway(self) -> None:
        """A client that opens and resets stream after stream gets GOAWAY(ENHANCE_YOUR_CALM)."""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        for _ in range(300):
            sid = peer.client.get_next_available_stream_id()
            peer.client.send_headers(sid, _request(), end_stream=True)
            peer.client.reset_stream(sid, ErrorCodes.CANCEL)
            peer.pump()
            if peer.transport.disconnecting:
                break
        goaway = [e for e in peer.events if isinstance(e, ev.ConnectionTerminated)]
        self.assertEqual([g.error_code for g in goaway], [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertTrue(peer.transport.disconnecting)
        self.assertLess(len(server.handled), 300)

    def test_stream_limit_is_advertised(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        self.assertEqual(peer.client.remote_settings.max_concurrent_streams, MAX_STREAMS)

    def test_idle_connection_gets_goaway_and_closes(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        peer.send(_request())
        server.clock.advance(30)
        peer.pump()
        self.assertFalse(peer.transport.disconnecting)
        for _ in range(8):
            server.clock.advance(15)
        peer.pump()
        self.assertTrue(peer.transport.disconnecting)
        goaway = [e for e in peer.events if isinstance(e, ev.ConnectionTerminated)]
        self.assertEqual([g.error_code for g in goaway], [ErrorCodes.NO_ERROR])

    def test_shutdown_notice_answers_the_streams_taken_then_closes(self) -> None:
        """At shutdown the streams taken are still answered; after the last one, GOAWAY
        (NO_ERROR) naming it, and the connection closes itself. (Read as raw frames.)"""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        first = peer.send(_request(b"/q/1"))
        second = peer.send(_request(b"/q/2"))
        peer.conn.shutdown_notice()
        one, two = server.handled
        one.respond(200, [], b"one")
        self.assertFalse(peer.transport.disconnecting)
        two.respond(200, [], b"two")
        frames = _frames(peer.transport.value())
        goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual([(g.error_code, g.last_stream_id) for g in goaway], [(0, second)])
        data = {f.stream_id: f.data for f in frames if isinstance(f, DataFrame)}
        self.assertEqual(data, {first: b"one", second: b"two"})
        self.assertIs(frames[-1], goaway[0])  # after every answer
        self.assertTrue(peer.transport.disconnecting)

    def test_shutdown_notice_closes_an_idle_connection(self) -> None:
        server = _Server()
        peer = _Peer(self.engine, server)
        peer.send(_request())
        peer.conn.shutdown_notice()
        frames = _frames(peer.transport.value())
        self.assertEqual([f.error_code for f in frames if isinstance(f, GoAwayFrame)], [0])
        self.assertTrue(peer.transport.disconnecting)

    def test_connection_lost_fails_streams_in_flight(self) -> None:
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        peer.send(_request())
        (request,) = server.handled
        lost: list[bool] = []
        request.on_lost(lambda: lost.append(True))
        peer.conn.connectionLost()
        self.assertEqual(lost, [True])
        self.assertEqual(server.clock.getDelayedCalls(), [])


# Every case runs against both engines; the libnghttp2 one fails (never skips) without the library.
for _mixin in (
    AnswerTests,
    FlowControlTests,
    BodyAndLimitTests,
    RefusedTests,
    ResetAndLifetimeTests,
):
    for _engine, _label in ((PythonH2Connection, "Python"), (NativeH2Connection, "Nghttp2")):
        _name = f"{_label}{_mixin.__name__}"
        globals()[_name] = type(_name, (_mixin, SynchronousTestCase), {"engine": _engine})


class NativeCallbackFailureTests(SynchronousTestCase):
    def test_an_exception_in_a_callback_closes_that_connection_only(self) -> None:
        """A Python error inside a libnghttp2 callback is logged and fails that session (the
        connection is closed), not the process; a fresh connection still works."""

        class Broken(NativeH2Connection):
            def on_header(self, stream_id: int, name: bytes, value: bytes) -> int:
                raise RuntimeError("bug in a callback")

        server = _Server()
        peer = _Peer(Broken, server)
        peer.send(_request())
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(server.handled, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        fine = _Peer(NativeH2Connection, server)
        sid = fine.send(_request())
        self.assertEqual(fine.response(sid)[b":status"], b"200")
