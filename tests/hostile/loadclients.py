"""Many concurrent tracking requests from the test's own reactor: HTTP/1.1 (plain or TLS, one
keep-alive connection per request) and HTTP/2 (several streams per TLS connection, ALPN h2).

Each request ends as an `Answer` (status, headers, the whole body, whether the answer was
complete) and each connection records how it ended (a GOAWAY and its last stream id, or a close
with streams still open), so a test can say exactly which request was lost and how.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import httptools
from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer


@define(eq=False)
class Answer:
    """One request and what came back for it."""

    kind: str  # "http", "https" or "h2"
    path: str
    status: int | None = None
    headers: dict[bytes, bytes] = field(factory=dict)
    body: bytes = b""
    complete: bool = False  # the whole response (head and body, or END_STREAM) arrived
    reset: int | None = None  # HTTP/2 RST_STREAM error code
    error: str | None = None  # how it failed otherwise (connect error, closed early)

    def describe(self) -> str:
        state = "complete" if self.complete else f"incomplete ({self.error or self.reset})"
        return f"{self.kind} {self.path}: {self.status} {len(self.body)} bytes, {state}"


@define(eq=False)
class ConnectionEnd:
    """How one client connection ended."""

    closed: bool = False
    clean: bool = False  # closed politely (FIN, after close_notify on TLS), not reset
    goaway: int | None = None  # GOAWAY error code
    goaway_last_stream: int | None = None
    open_at_goaway: int = 0  # our streams still unanswered when the GOAWAY came
    open_at_close: int = 0  # requests still unanswered when the connection closed
    alpn: bytes | None = None


class _Common(Protocol):
    def __init__(self, answers: Sequence[Answer], host: str) -> None:
        self.answers = list(answers)
        self.host = host
        self.end = ConnectionEnd()
        self.done: Deferred[None] = Deferred()  # every answer complete, or the connection gone
        self.lost: Deferred[None] = Deferred()

    def _check_done(self) -> None:
        if not self.done.called and all(a.complete for a in self.answers):
            self.done.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.end.closed = True
        self.end.clean = reason.check(ConnectionDone) is not None
        unanswered = [a for a in self.answers if not a.complete]
        self.end.open_at_close = len(unanswered)
        for a in unanswered:
            a.error = a.error or f"connection closed ({reason.getErrorMessage()})"
        if not self.done.called:
            self.done.callback(None)
        self.lost.callback(None)


@implementer(IHandshakeListener)
class HTTP1Client(_Common):
    """One GET on a keep-alive HTTP/1.1 connection; the connection is left open afterwards."""

    def connectionMade(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        (answer,) = self.answers
        self.transport.write(  # type: ignore[union-attr]
            f"GET {answer.path} HTTP/1.1\r\nHost: {self.host}\r\n"
            "User-Agent: sigterm-load\r\n\r\n".encode()
        )

    def handshakeCompleted(self) -> None:
        self.end.alpn = self.transport.negotiatedProtocol  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.answers[0].error = f"bad response: {e}"
            self.transport.loseConnection()  # type: ignore[union-attr]

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[0].headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.answers[0].status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.answers[0].body += body

    def on_message_complete(self) -> None:
        self.answers[0].complete = True
        self._check_done()


@implementer(IHandshakeListener)
class HTTP2Client(_Common):
    """All its requests as concurrent streams of one HTTP/2 connection."""

    def connectionMade(self) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.streams: dict[int, Answer] = {}
        for answer in self.answers:
            sid = self.conn.get_next_available_stream_id()
            self.streams[sid] = answer
            headers = [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", self.host),
                (":path", answer.path),
                ("user-agent", "sigterm-load"),
            ]
            self.conn.send_headers(sid, headers, end_stream=True)
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.end.alpn = self.transport.negotiatedProtocol  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except Exception as e:  # a protocol error from the server's side
            for a in self.answers:
                a.error = a.error or f"h2 error: {e!r}"
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for event in events:
            self._event(event)
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        self._check_done()

    def _event(self, event: Any) -> None:
        answer = self.streams.get(getattr(event, "stream_id", None) or 0)
        if isinstance(event, h2.events.ResponseReceived) and answer is not None:
            for name, value in event.headers:
                if name == b":status":
                    answer.status = int(value)
                else:
                    answer.headers[name] = value
        elif isinstance(event, h2.events.DataReceived) and answer is not None:
            answer.body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and answer is not None:
            answer.complete = answer.status is not None
        elif isinstance(event, h2.events.StreamReset) and answer is not None:
            answer.reset = int(event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.end.goaway = int(event.error_code)
            self.end.goaway_last_stream = event.last_stream_id
            self.end.open_at_goaway = sum(not a.complete for a in self.answers)


def _factory(protocol: _Common) -> Factory:
    return Factory.forProtocol(lambda: protocol)


async def run_clients(
    reactor: Any,
    ca_pem: bytes,
    host: str,
    ports: tuple[int, int],
    plain: Sequence[str],
    tls: Sequence[str],
    h2_batches: Sequence[Sequence[str]],
    started: list[_Common],
) -> list[Answer]:
    """Open one HTTP/1.1 connection per path in ``plain`` (on ``ports`` = (HTTP port, HTTPS
    port): the first) and in ``tls`` (the second, ALPN http/1.1), and one HTTP/2 connection per batch in ``h2_batches``;
    each protocol goes into ``started`` as soon as it is created. Fires once every answer is
    complete or its connection is gone."""
    http_port, https_port = ports
    trust = Certificate.loadPEM(ca_pem)
    h1_tls = optionsForClientTLS(host, trustRoot=trust, acceptableProtocols=[b"http/1.1"])
    h2_tls = optionsForClientTLS(host, trustRoot=trust, acceptableProtocols=[b"h2"])
    waits: list[Deferred[Any]] = []
    answers: list[Answer] = []

    def launch(protocol: _Common, endpoint: Any) -> None:
        started.append(protocol)
        answers.extend(protocol.answers)
        connecting = endpoint.connect(_factory(protocol))

        def failed(reason: Failure) -> None:
            for a in protocol.answers:
                a.error = f"connect failed: {reason.getErrorMessage()}"
            if not protocol.done.called:
                protocol.done.callback(None)

        connecting.addErrback(failed)
        waits.append(protocol.done)

    def tcp(port: int) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)

    for path in plain:
        launch(HTTP1Client([Answer("http", path)], host), tcp(http_port))
    for path in tls:
        launch(HTTP1Client([Answer("https", path)], host), wrapClientTLS(h1_tls, tcp(https_port)))
    for batch in h2_batches:
        protocol = HTTP2Client([Answer("h2", p) for p in batch], host)
        launch(protocol, wrapClientTLS(h2_tls, tcp(https_port)))
    await DeferredList(waits)
    return answers
