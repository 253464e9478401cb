"""What a hostile HTTP/2 client may not get out of its streams, on both engines: PINGs alone do
not keep a connection open past the idle timeout; locally answered streams do not dilute the
rapid-reset guard; upstream work of reset streams still counts against the connection; control
characters in field values, and a :path with a space or a control character, reset the stream
(in memory, and against the real proxy over TLS: nothing reaches the upstream)."""

from __future__ import annotations

from typing import Any

import h2.events as ev
from h2.errors import ErrorCodes
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import DOMAIN, start_proxy_for
from tests.hostile.h2client import Request, exchange
from tests.server.test_http2 import _Peer, _request, _Server
from trackingproxy.server.http2 import H2ServerBase
from trackingproxy.server.http2_nghttp2 import NativeH2Connection
from trackingproxy.server.http2_python import PythonH2Connection
from trackingproxy.server.limits import MAX_STREAMS


class _LocalOrLater(_Server):
    """Answers ``/local`` paths at once with 421 (as the proxy does for an unknown host); the
    others are left for the test (upstream work)."""

    def __init__(self) -> None:
        super().__init__(answer=False)

    def handle(self, request: Any) -> None:
        self.handled.append(request)
        if request.uri.startswith(b"/local"):
            request.respond(421, [], b"misdirected")


class _Cases:
    engine: type[H2ServerBase]
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any

    def _goaway(self, peer: _Peer) -> list[Any]:
        return [e.error_code for e in peer.events if isinstance(e, ev.ConnectionTerminated)]

    def _resets(self, peer: _Peer, stream_id: int) -> list[Any]:
        return [e.error_code for e in peer.of(stream_id, ev.StreamReset)]

    # -- idle timeout ---------------------------------------------------------------------
    def test_pings_do_not_keep_an_idle_connection_open(self) -> None:
        """A client that sends only PINGs (every 10 s) once its stream is answered still gets
        GOAWAY(NO_ERROR) and a close at the idle timeout: control frames are not progress."""
        server = _Server()
        peer = _Peer(self.engine, server)
        peer.send(_request())
        for i in range(20):  # 200 s of PINGs; the idle timeout is 60 s
            peer.client.ping(b"%08d" % i)
            peer.pump()
            if peer.transport.disconnecting:
                break
            server.clock.advance(10)
        self.assertEqual(self._goaway(peer), [ErrorCodes.NO_ERROR])
        self.assertTrue(peer.transport.disconnecting)

    def test_a_request_body_trickling_in_keeps_the_connection_open(self) -> None:
        """Body bytes of an open stream, every 10 s for 200 s, are progress: no idle close."""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        sid = peer.send(_request(b"/f/slow", b"POST"), end=False)
        for _ in range(20):
            peer.client.send_data(sid, b"x")
            peer.pump()
            server.clock.advance(10)
        peer.pump()
        self.assertFalse(peer.transport.disconnecting)
        self.assertEqual(self._goaway(peer), [])

    def test_a_slow_body_is_cut_at_the_body_timeout(self) -> None:
        """A stream whose body trickles in (a byte every 2 s) is answered 408 and reset
        within 1.5 body timeouts of its headers; other streams go on (before: held forever)."""
        server = _Server(answer=False)
        server.body_timeout = 10.0
        peer = _Peer(self.engine, server)
        sid = peer.send(_request(b"/f/slow", b"POST"), end=False)
        statuses: list[Any] = []
        for _ in range(8):
            server.clock.advance(2)
            peer.pump()
            statuses = [
                dict(e.headers).get(b":status") for e in peer.of(sid, ev.ResponseReceived)
            ]
            if statuses:
                break
            peer.client.send_data(sid, b"x")
            peer.pump()
        peer.pump()
        self.assertEqual(statuses, [b"408"])
        self.assertEqual(server.handled, [])
        self.assertFalse(peer.transport.disconnecting)
        other = peer.send(_request(b"/q/next"))
        self.assertEqual(len(server.handled), 1)
        self.assertEqual(server.handled[0].stream_id, other)

    def test_304_has_no_content_length(self) -> None:
        """A streamed 304 carries no content-length: 0 (it would claim the 200's size)."""
        server = _Server(answer=False)
        peer = _Peer(self.engine, server)
        sid = peer.send(_request(b"/q/x"))
        server.handled[0].start(304, b"Not Modified", [(b"etag", b'"x"')], 0, True)
        server.handled[0].finish()
        peer.pump()
        [response] = peer.of(sid, ev.ResponseReceived)
        names = [name for name, _ in response.headers]
        self.assertEqual((dict(response.headers)[b":status"], b"content-length" in names), (b"304", False))

    # -- rapid reset ----------------------------------------------------------------------
    def test_rapid_reset_diluted_with_locally_answered_streams_gets_goaway(self) -> None:
        """Each reset stream (upstream work) follows a stream answered at once (421): the
        cheap streams do not count, so GOAWAY(ENHANCE_YOUR_CALM) still comes."""
        server = _LocalOrLater()
        peer = _Peer(self.engine, server)
        for i in range(300):
            peer.send(_request(b"/local/%d" % i))
            sid = peer.client.get_next_available_stream_id()
            peer.client.send_headers(sid, _request(b"/q/%d" % i), end_stream=True)
            peer.client.reset_stream(sid, ErrorCodes.CANCEL)
            peer.pump()
            if peer.transport.disconnecting:
                break
        self.assertEqual(self._goaway(peer), [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertTrue(peer.transport.disconnecting)

    def test_few_resets_among_streams_answered_later_are_tolerated(self) -> None:
        """A client that resets one stream in three of those waiting for the upstream (a
        browser leaving pages), 300 resets in all, keeps its connection."""
        server = _LocalOrLater()
        peer = _Peer(self.engine, server)
        for i in range(900):
            sid = peer.send(_request(b"/q/%d" % i))
            if i % 3 == 0:
                peer.client.reset_stream(sid, ErrorCodes.CANCEL)
            else:
                server.handled[-1].respond(200, [], b"later")
            peer.pump()
        self.assertEqual(self._goaway(peer), [])
        self.assertFalse(peer.transport.disconnecting)

    # -- upstream work --------------------------------------------------------------------
    def test_streams_are_refused_while_max_streams_of_upstream_work_run(self) -> None:
        """While ``MAX_STREAMS`` streams' upstream work runs (their streams may be reset
        already) a new stream gets RST_STREAM(REFUSED_STREAM) and never reaches the handler;
        once one piece of work ends, the next stream is served."""
        server = _Server()
        peer = _Peer(self.engine, server)
        for _ in range(MAX_STREAMS):
            peer.conn.upstream_changed(1)
        refused = peer.send(_request(b"/q/refused"))
        self.assertEqual(self._resets(peer, refused), [ErrorCodes.REFUSED_STREAM])
        self.assertEqual(server.handled, [])
        peer.conn.upstream_changed(-1)
        served = peer.send(_request(b"/q/served"))
        self.assertEqual(peer.response(served)[b":status"], b"200")
        self.assertEqual([r.uri for r in server.handled], [b"/q/served"])

    # -- characters -----------------------------------------------------------------------
    def test_control_characters_in_a_field_value_reset_the_stream(self) -> None:
        """A field value with a control character (not HTAB) resets its stream with
        PROTOCOL_ERROR before the handler sees it; the connection keeps serving, and a value
        with HTAB is taken."""
        for value in (b"b\x01c", b"b\x1fc", b"b\x7fc", b"b\x0bc"):
            server = _Server()
            peer = _Peer(self.engine, server, strict=False)
            sid = peer.send(_request(b"/q/ctl", b"GET", (b"x-a", value)))
            self.assertEqual(self._resets(peer, sid), [ErrorCodes.PROTOCOL_ERROR], value)
            self.assertEqual(server.handled, [], value)
            after = peer.send(_request(b"/q/after"))
            self.assertEqual(peer.response(after)[b":status"], b"200", value)
        server = _Server()
        peer = _Peer(self.engine, server, strict=False)
        sid = peer.send(_request(b"/q/tab", b"GET", (b"x-a", b"b\tc")))
        self.assertEqual(peer.response(sid)[b":status"], b"200")

    def test_control_characters_in_a_field_name_are_refused(self) -> None:
        """A field name with a control character or a space never reaches the handler (the
        stream is reset, or h2 ends the connection with GOAWAY(PROTOCOL_ERROR))."""
        for name in (b"x\x01a", b"x a", b"x\x7fa"):
            server = _Server()
            peer = _Peer(self.engine, server, strict=False)
            sid = peer.send(_request(b"/q/name", b"GET", (name, b"v")))
            refused = self._resets(peer, sid) or self._goaway(peer)
            self.assertEqual(refused, [ErrorCodes.PROTOCOL_ERROR], name)
            self.assertEqual(server.handled, [], name)

    def test_path_with_a_space_or_a_control_character_resets_the_stream(self) -> None:
        """A :path holding a space, HTAB or another control character is not a request
        target: RST_STREAM(PROTOCOL_ERROR) on both engines, never the handler."""
        for path in (b"/q/a b", b"/q/a\tb", b"/q/a\x01b", b"/q/a\x7fb", b"/q/a HTTP/1.1"):
            server = _Server()
            peer = _Peer(self.engine, server, strict=False)
            sid = peer.send(_request(path))
            self.assertEqual(self._resets(peer, sid), [ErrorCodes.PROTOCOL_ERROR], path)
            self.assertEqual(server.handled, [], path)


class NativeStreamTests(_Cases, SynchronousTestCase):
    engine = NativeH2Connection


class PythonStreamTests(_Cases, SynchronousTestCase):
    engine = PythonH2Connection


def _headers(path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", DOMAIN),
        (":path", path),
        *extra,
    ]


class _RealProxyCases:
    """The same refusals through the real proxy over TLS: nothing reaches the upstream."""

    engine: str
    timeout = 30
    mktemp: Any
    addCleanup: Any
    assertEqual: Any

    def setUp(self) -> None:
        self.running, self.ca_file = start_proxy_for(self, "--http2-engine", self.engine)

    @inlineCallbacks
    def test_bad_characters_are_reset_and_never_forwarded(self) -> Any:
        """A :path with a space or a control character and a field value with a control
        character each get RST_STREAM(PROTOCOL_ERROR) (not a 502 from the upstream leg), the
        upstream sees none of them, and a good stream next to them is answered."""
        standin = self.running.standin
        before = len(standin.seen)
        requests = [
            Request(_headers("/q/a b")),
            Request(_headers("/q/a\x01b")),
            Request(_headers("/q/ctl", ("x-a", "b\x01c"))),
            Request(_headers("/q/good")),
        ]
        outcomes = yield deferToThread(
            exchange, self.running.https_port, DOMAIN, self.ca_file, requests
        )
        self.assertEqual(
            [o.describe() for o in outcomes], ["RST_STREAM(1)"] * 3 + ["200"], outcomes
        )
        self.assertEqual([s.uri for s in standin.seen[before:]], [b"/q/good"])


class Nghttp2RealProxyTests(_RealProxyCases, TestCase):
    engine = "nghttp2"


class PythonRealProxyTests(_RealProxyCases, TestCase):
    engine = "python"
