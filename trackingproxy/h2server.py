"""The lean HTTP/2 server connection: the ``h2`` state machine driven directly, each complete
request handed to the request handler as an `trackingproxy.h2request.H2Request`.

It replaces twisted.web's H2Connection (which built a full twisted.web ``Request`` per stream,
and cost about half of the proxy's CPU per HTTP/2 request). What it keeps from the protocol:

- Validation by ``h2`` of every inbound header block (connection-specific fields, pseudo-header
  order, CR/LF/NUL, :authority against Host, content-length against the DATA received): a
  malformed block ends the connection with GOAWAY, as RFC 9113 8.1.1 allows.
- Streams that are not tracking requests are refused with RST_STREAM: CONNECT, and a :path that
  is neither origin-form nor ``*``. More than ``MAX_HEADERS`` fields or ``MAX_HEADER_BYTES`` of
  names and values: 431. Bodies over ``MAX_BODY``: 413 at once, then RST_STREAM(NO_ERROR).
- At most ``MAX_STREAMS`` concurrent streams (SETTINGS). A client that resets most of the
  streams it opens ("rapid reset", CVE-2023-44487) gets GOAWAY(ENHANCE_YOUR_CALM).
- Flow control both ways: received DATA is acknowledged as it is buffered; answers larger than
  the peer's window wait for WINDOW_UPDATE, pausing the upstream body meanwhile.
- The connection is closed (GOAWAY) when nothing has moved in either direction for the idle
  timeout; one timer per connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import h2.events as ev
import h2.exceptions
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.exchange import ClientExchange
from trackingproxy.h2request import H2Request
from trackingproxy.http1server import MAX_HEADER_BYTES, MAX_HEADERS
from trackingproxy.proxy import MAX_BODY

log = Logger(namespace="trackingproxy.h2server")

MAX_STREAMS = 100
RAPID_RESET_MIN = 200  # resets tolerated before the ratio below is looked at
_TEXT = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
# Inbound blocks are validated; what we send is built here, already lower case and clean.
_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=True,
    normalize_inbound_headers=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)
_SETTINGS = {
    SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    # RFC 9113 6.5.2 counts 32 bytes per field on top of its name and value.
    SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES + 32 * MAX_HEADERS + 4096,
}


class Server(Protocol):
    """What a connection needs from its listener (``trackingproxy.site.ProxySite``)."""

    clock: IReactorTime
    idle_timeout: float

    def handle(self, exchange: ClientExchange) -> None: ...
    def request_done(self, exchange: ClientExchange) -> None: ...


class Owner(Protocol):
    """The TLS connection this HTTP/2 connection runs on (its HTTP/1.1 protocol object)."""

    def peer_host(self) -> str: ...
    def sni(self) -> str | None: ...


class H2ServerConnection(TwistedProtocol):
    """One HTTP/2 client connection; see the module docstring. Also the IPushProducer the TLS
    transport pauses when its buffer is full: the streams' upstream bodies are paused with it."""

    def __init__(self, server: Server, owner: Owner) -> None:
        self._server = server
        self._owner = owner
        self._clock = server.clock
        self._h2 = H2Connection(_CONFIG)
        self._h2.local_settings = Settings(client=False, initial_values=_SETTINGS)
        self._streams: dict[int, H2Request] = {}
        self._blocked: dict[int, list[Any]] = {}  # stream -> [data waiting for window, end]
        self._producers: dict[int, Any] = {}
        self._paused = False
        self._closed = False
        self._receiving = False  # events are being handled: one flush at the end
        self._opened = 0
        self._resets = 0
        self._progress = 0
        self._progress_seen = -1
        self._progress_at = 0.0
        self._timer: IDelayedCall | None = None
        self._write: Callable[[bytes], None] | None = None

    # -- connection -----------------------------------------------------------------------
    def connectionMade(self) -> None:
        self._write = self.transport.write  # type: ignore[union-attr]
        self._h2.initiate_connection()
        self._flush()
        self._progress_at = self._clock.seconds()
        self._arm(self._server.idle_timeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        streams, self._streams = self._streams, {}
        self._blocked.clear()
        self._producers.clear()
        for request in streams.values():
            request.connection_lost()

    def peer_host(self) -> str:
        return self._owner.peer_host()

    def sni(self) -> str | None:
        return self._owner.sni()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._progress += 1
        self._receiving = True
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has queued a GOAWAY naming the error: send it, then close.
            log.debug("HTTP/2 protocol error from {peer}: {error}", peer=self.peer_host(), error=e)
            self._receiving = False
            self._flush()
            self._close()
            return
        try:
            for event in events:
                handler = _EVENTS.get(type(event))
                if handler is not None:
                    handler(self, event)
        finally:
            self._receiving = False
        self._flush()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and not self._closed and self._write is not None:
            self._write(data)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _goaway(self, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.close_connection(error_code=code)
        self._flush()
        self._close()

    # -- events ---------------------------------------------------------------------------
    def _on_request(self, event: ev.RequestReceived) -> None:
        stream_id = event.stream_id
        self._opened += 1
        method = path = authority = None
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        has_host = False
        for name, value in event.headers or ():  # bytes: header_encoding is None
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            size += len(name) + len(value)
            if name == b"host":
                has_host = True
            headers.append((name, value))
        origin_form = path is not None and (path[:1] == b"/" or path == b"*")
        if method is None or method == b"CONNECT" or path is None or not origin_form:
            self._refuse(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        if authority is not None and not has_host:
            headers.insert(0, (b"host", authority))
        request = H2Request(self, stream_id, method, path, headers, self._clock.seconds())
        request.remote_ended = event.stream_ended is not None
        self._streams[stream_id] = request
        if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
            request.dispatched = True
            request.respond(431, _TEXT, b"431 Request Header Fields Too Large\n")
            return
        length = request.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            self._too_large(request)

    def _on_data(self, event: ev.DataReceived) -> None:
        stream_id = event.stream_id
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
        request = self._streams.get(stream_id)
        if request is None or request.dispatched:
            return
        data = event.data or b""
        request.body_size += len(data)
        if request.body_size > MAX_BODY:
            self._too_large(request)
            return
        request.body_parts.append(data)

    def _on_end(self, event: ev.StreamEnded) -> None:
        request = self._streams.get(event.stream_id)
        if request is not None:
            request.remote_ended = True
            if not request.dispatched:
                self._dispatch(request)

    def _on_reset(self, event: ev.StreamReset) -> None:
        stream_id: int = event.stream_id
        self._resets += 1
        request = self._forget(stream_id)
        if request is not None:
            request.connection_lost()
        if self._resets > RAPID_RESET_MIN and self._resets * 2 > self._opened:
            log.info("HTTP/2 client {peer} resets most of its streams", peer=self.peer_host())
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _on_window(self, event: ev.WindowUpdated) -> None:
        if event.stream_id:
            self._push(event.stream_id)
        else:
            for stream_id in list(self._blocked):
                self._push(stream_id)

    def _on_terminated(self, event: ev.ConnectionTerminated) -> None:
        self._close()  # the client's GOAWAY: it reads nothing more from this connection

    # -- requests -------------------------------------------------------------------------
    def _dispatch(self, request: H2Request) -> None:
        request.dispatched = True
        try:
            self._server.handle(request)
        except Exception:
            log.failure("request handler failed for {uri!r}", uri=request.uri)
            if request.code == 200 and not request.done:
                request.respond(500, _TEXT, b"500 Internal Server Error\n")
            else:
                request.abort()

    def _too_large(self, request: H2Request) -> None:
        request.tp_too_large = True
        request.body_parts = []
        self._dispatch(request)  # the handler answers 413 at once

    def _refuse(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, error_code=code)
        if not self._receiving:
            self._flush()

    def _forget(self, stream_id: int) -> H2Request | None:
        self._blocked.pop(stream_id, None)
        self._producers.pop(stream_id, None)
        return self._streams.pop(stream_id, None)

    def request_done(self, request: H2Request) -> None:
        """Called by the request when its answer is complete (possibly still being sent)."""
        self._server.request_done(request)
        if request.stream_id not in self._blocked:
            self._retire(request)

    def _retire(self, request: H2Request) -> None:
        self._forget(request.stream_id)
        if not request.remote_ended:  # answered before the request ended (413, 431)
            self._refuse(request.stream_id, ErrorCodes.NO_ERROR)

    def reset(self, request: H2Request) -> None:
        """Give up on an answer: RST_STREAM(INTERNAL_ERROR)."""
        self._forget(request.stream_id)
        self._refuse(request.stream_id, ErrorCodes.INTERNAL_ERROR)

    # -- sending --------------------------------------------------------------------------
    def send(
        self, request: H2Request, head: list[tuple[bytes, bytes]] | None, data: bytes, end: bool
    ) -> None:
        if self._closed:
            return
        stream_id = request.stream_id
        self._progress += 1
        try:
            if head is not None:
                self._h2.send_headers(stream_id, head, end_stream=end and not data)
            if data:
                blocked = self._blocked.get(stream_id)
                if blocked is not None:
                    blocked[0] += data
                    blocked[1] = end
                else:
                    self._send_data(stream_id, data, end)
            elif end and head is None:
                blocked = self._blocked.get(stream_id)
                if blocked is not None:
                    blocked[1] = True
                else:
                    self._h2.end_stream(stream_id)
        except h2.exceptions.H2Error:  # the stream was reset meanwhile
            return
        if not self._receiving:
            self._flush()

    def _send_data(self, stream_id: int, data: bytes, end: bool, paused: bool = False) -> None:
        """Send what the windows allow; keep the rest until WINDOW_UPDATE (and pause the
        stream's producer meanwhile, unless it is ``paused`` already)."""
        h2c = self._h2
        window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
        if len(data) <= window:
            h2c.send_data(stream_id, data, end_stream=end)
            return
        while data and window > 0:
            chunk, data = data[:window], data[window:]
            h2c.send_data(stream_id, chunk, end_stream=end and not data)
            window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
        if data:
            self._blocked[stream_id] = [data, end]
            producer = self._producers.get(stream_id)
            if producer is not None and not paused:
                producer.pauseProducing()

    def _push(self, stream_id: int) -> None:
        blocked = self._blocked.pop(stream_id, None)
        if blocked is None:
            return
        try:
            self._send_data(stream_id, blocked[0], blocked[1], paused=True)
        except h2.exceptions.H2Error:
            return
        if stream_id in self._blocked:
            return
        request = self._streams.get(stream_id)
        if request is not None and request.done:
            self._retire(request)
            return
        producer = self._producers.get(stream_id)
        if producer is not None and not self._paused:
            producer.resumeProducing()

    def register_producer(self, request: H2Request, producer: Any) -> None:
        self._producers[request.stream_id] = producer
        if self._paused or request.stream_id in self._blocked:
            producer.pauseProducing()

    def unregister_producer(self, request: H2Request) -> None:
        self._producers.pop(request.stream_id, None)

    # -- IPushProducer (for the TLS transport) --------------------------------------------
    def pauseProducing(self) -> None:
        self._paused = True
        for producer in list(self._producers.values()):
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        for stream_id, producer in list(self._producers.items()):
            if stream_id not in self._blocked:
                producer.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the transport is closing: connectionLost follows

    # -- idle timeout ---------------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        self._timer = self._clock.callLater(max(delay, 0.01), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._clock.seconds()
        if self._progress != self._progress_seen:
            self._progress_seen = self._progress
            self._progress_at = now
        left = self._progress_at + self._server.idle_timeout - now
        if left <= 0:
            self._goaway(ErrorCodes.NO_ERROR)
            return
        self._arm(min(left, self._server.idle_timeout / 4))


_EVENTS: dict[type, Callable[[H2ServerConnection, Any], None]] = {
    ev.RequestReceived: H2ServerConnection._on_request,
    ev.DataReceived: H2ServerConnection._on_data,
    ev.StreamEnded: H2ServerConnection._on_end,
    ev.StreamReset: H2ServerConnection._on_reset,
    ev.WindowUpdated: H2ServerConnection._on_window,
    ev.ConnectionTerminated: H2ServerConnection._on_terminated,
}
