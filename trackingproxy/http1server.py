"""The lean HTTP/1.1 server connection: requests parsed by httptools (llhttp, in C, strict),
answered in order (pipelining), with the limits and timeouts of the listener.

- Limits: at most ``MAX_HEADERS`` header fields and ``MAX_HEADER_BYTES`` of names and values
  (431), a request target of at most ``MAX_TARGET`` bytes (414), bodies of at most ``MAX_BODY``
  (413 and close, at once when Content-Length says so). Framing the parser refuses (obs-fold,
  bare LF, CL with TE, duplicate CL, bad chunks) and a repeated Host get 400 and a close.
- Timeouts: the request head must arrive within the header timeout (slowloris: the connection
  is aborted); an idle keep-alive connection, or one where nothing moves in either direction
  while a request is open, is closed after the idle timeout. One timer per connection, never
  re-armed per request: it wakes at most every header timeout and checks the state.
- Keep-alive: HTTP/1.1 unless ``Connection: close``; HTTP/1.0 closes after each answer; after
  a shutdown notice (SIGTERM) every answer closes the connection, and an idle one closes at once.
- TLS connections whose ALPN chose ``h2`` are handed to `trackingproxy.h2server`.
- Memory: an idle keep-alive connection keeps no parser (about 0.9 KiB with its bound callbacks;
  a new one costs ~0.3 us when the next request starts) and no copy of the last request's head.
  A closed connection drops its parser, whose callbacks point back at it: without that, every
  connection would be a reference cycle left for the (tuned, rarely running) collector.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import httptools
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.exchange import status_line
from trackingproxy.h1request import H1Request
from trackingproxy.proxy import MAX_BODY

log = Logger(namespace="trackingproxy.http1server")

MAX_HEADERS = 100
MAX_HEADER_BYTES = 16384
MAX_TARGET = 16384
MAX_QUEUED = 16  # pipelined requests waiting: beyond this the connection stops reading
_RAW_HEAD_LIMIT = MAX_HEADER_BYTES + MAX_TARGET + 8192
# A chunk-size line with a long extension (llhttp skips extensions without a limit).
_LONG_CHUNK_EXT = re.compile(rb"\n[0-9A-Fa-f]+[ \t]*;[^\r\n]{1024}")
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_TEXT = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store")]


class Server(Protocol):
    """What a connection needs from its listener (``trackingproxy.site.ProxySite``)."""

    clock: IReactorTime
    header_timeout: float
    idle_timeout: float

    def handle(self, request: H1Request) -> None: ...
    def request_done(self, request: H1Request) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def http2_connection(self, owner: HTTP1Connection) -> IProtocol: ...


class _Stop(Exception):
    """Raised from a parser callback: read nothing more from this connection."""

    def __init__(self, status: int = 0) -> None:
        self.status = status


class HTTP1Connection(TwistedProtocol):
    """One client connection; see the module docstring."""

    __slots__ = (
        "_active",
        "_body",
        "_body_size",
        "_chunked",
        "_clock",
        "_closed",
        "_connection",
        "_content_length",
        "_current",
        "_draining",
        "_error_status",
        "_h1",
        "_h2",
        "_head_raw",
        "_head_started",
        "_header_bytes",
        "_headers",
        "_idle_since",
        "_in_head",
        "_parser",
        "_peer",
        "_progress",
        "_progress_at",
        "_progress_seen",
        "_pumping",
        "_queue",
        "_reading",
        "_saw_host",
        "_server",
        "_sni",
        "_stopped",
        "_timer",
        "_url",
        "_write",
        # Protocol's own attributes, slotted too: the connection then has no __dict__ at all.
        "connected",
        "factory",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.connected = 0
        self.factory = None
        self.transport = None
        self._server = server
        self._clock = server.clock
        self._parser: Any = None
        self._h2: IProtocol | None = None
        self._h1 = False  # the client speaks HTTP/1.x (no ALPN h2): decided on the first bytes
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._content_length = b""
        self._connection = b""
        self._saw_host = False
        self._chunked = False  # a request in this read or still being read is chunked
        self._body: list[bytes] | None = None
        self._body_size = 0
        self._current: H1Request | None = None  # head complete, body still arriving
        self._draining = False  # shutdown_notice: answer what was asked, then close
        self._in_head = False
        self._head_started = 0.0
        self._head_raw = 0
        self._active: H1Request | None = None
        self._queue: list[H1Request] = []  # short: at most MAX_QUEUED
        self._pumping = False
        self._reading = True
        self._stopped = False  # no more requests are read
        self._error_status = 0
        self._closed = False
        self._timer: IDelayedCall | None = None
        self._idle_since = 0.0
        self._progress = 0
        self._progress_seen = -1
        self._progress_at = 0.0
        self._peer: str | None = None
        self._sni: str | bool | None = False
        self._write: Any = None

    # -- connection -----------------------------------------------------------------------
    def connectionMade(self) -> None:
        # The bound method, looked up once (TLS replaces ``write`` per instance with its
        # small-write aggregator, which measured faster than writing through at once).
        self._write = self.transport.write  # type: ignore[union-attr]
        self._server.connection_opened()
        self._idle_since = self._clock.seconds()
        self._arm(min(self._server.header_timeout, self._server.idle_timeout))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._parser = None  # its callbacks are bound methods of this connection: a cycle
        self._write = None
        h2, self._h2 = self._h2, None  # it holds this connection (its owner): a cycle
        if h2 is not None:
            h2.connectionLost(reason)
        active, self._active = self._active, None
        self._queue.clear()
        if active is not None:
            active.connection_lost()
        self._server.connection_closed()

    def shutdown_notice(self) -> None:
        """The server is stopping: requests already received are answered with
        ``Connection: close`` and the connection closes after them; an idle one closes now.
        HTTP/2 connections send GOAWAY (`trackingproxy.h2server`)."""
        if self._closed or self._draining:
            return
        self._draining = True
        if self._h2 is not None:
            self._h2.shutdown_notice()  # type: ignore[attr-defined]
            return
        owed = [r for r in (self._active, *self._queue) if r is not None]
        if owed:
            owed[-1].close_after()  # the earlier ones are answered first, on this connection
        elif not self._in_head and self._current is None:
            self.close()

    def peer_host(self) -> str:
        if self._peer is None:
            self._peer = str(getattr(self.transport.getPeer(), "host", None) or "-")  # type: ignore[union-attr]
        return self._peer

    def sni(self) -> str | None:
        if self._sni is False:
            name = None
            get_handle = getattr(self.transport, "getHandle", None)
            if get_handle is not None:
                name = getattr(get_handle(), "get_servername", lambda: None)()
            self._sni = name.decode("ascii", "replace").lower().rstrip(".") if name else None
        return self._sni  # type: ignore[return-value]

    def send(self, data: bytes) -> None:
        self._progress += 1
        if not self._closed:
            self._write(data)

    def upstream_changed(self, delta: int) -> None:
        pass  # one request at a time: a client that goes away takes nothing more from here

    def close(self) -> None:
        self._stopped = True
        if not self._closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def register_producer(self, producer: Any) -> None:
        self.transport.registerProducer(producer, True)  # type: ignore[union-attr]

    def unregister_producer(self) -> None:
        if not self._closed:
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    # -- reading --------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if not self._h1:
                if self._h2 is not None:
                    self._h2.dataReceived(data)
                    return
                if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                    self._switch_to_h2(data)
                    return
                self._h1 = True
            parser = self._parser = httptools.HttpRequestParser(self)
        if self._stopped:
            return
        self._progress += 1
        queued = len(self._queue)
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            self._stopped = True
            stop = e.__context__
            if not isinstance(stop, _Stop):
                log.failure("HTTP/1.1 parser callback failed", Failure(stop))
                self._error_status = 400
            elif stop.status:
                self._error_status = stop.status
        except httptools.HttpParserUpgrade:
            # CONNECT, or an Upgrade we do not do: answer what was asked, then close.
            self._stopped = True
            if self._queue:
                self._queue[-1].persistent = False
        except httptools.HttpParserError:
            self._stopped = True
            self._error_status = 400
        if self._chunked:
            self._chunked = self._current is not None
            if _LONG_CHUNK_EXT.search(data):
                while len(self._queue) > queued:
                    self._queue.pop()
                self._stopped = True
                self._error_status = 400
        if self._in_head and not self._stopped:
            self._head_raw += len(data)
            if self._head_raw > _RAW_HEAD_LIMIT:
                self._stopped = True
                self._error_status = 431
        self._pump()

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_started = self._clock.seconds()
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._content_length = b""
        self._connection = b""
        self._saw_host = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise _Stop(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        self._header_bytes += len(name) + len(value)
        if len(headers) >= MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            raise _Stop(431)
        name = name.lower()
        value = value.rstrip(b" \t")  # trailing OWS is not part of the value (RFC 9110 5.5)
        if name == b"host":
            if self._saw_host:
                raise _Stop(400)  # RFC 9112 3.2
            self._saw_host = True
        elif name == b"content-length":
            self._content_length = value
        elif name == b"transfer-encoding":
            self._chunked = True
        elif name == b"connection":
            self._connection += b"," + value.lower()
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_raw = 0
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Stop(505)
        persistent = (
            version == b"HTTP/1.1"
            and not self._draining
            and (not self._connection or b"close" not in _tokens(self._connection))
        )
        request = H1Request(
            self,
            parser.get_method(),
            self._url,
            version,
            self._headers,
            persistent,
            self._head_started,
        )
        self._current = request
        self._body = None
        self._body_size = 0
        if self._content_length and int(self._content_length) > MAX_BODY:
            self._too_large(request)

    def on_body(self, body: bytes) -> None:
        request = self._current
        if request is None:
            return
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            self._too_large(request)
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        request, self._current = self._current, None
        if request is None:
            return
        if self._body is not None:
            request.set_body(b"".join(self._body))
            self._body = None
        self._queue.append(request)
        if not request.persistent:
            raise _Stop()
        if len(self._queue) >= MAX_QUEUED and self._reading:
            self._reading = False
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _too_large(self, request: H1Request) -> None:
        self._current = None
        self._body = None
        request.tp_too_large = True
        request.persistent = False
        self._queue.append(request)
        raise _Stop()

    # -- answering in order ---------------------------------------------------------------
    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._active is None and not self._closed:
                if self._queue:
                    request = self._active = self._queue.pop(0)
                    self._dispatch(request)
                    continue
                if self._error_status:
                    self._answer_error(self._error_status)
                elif not self._reading and not self._stopped:
                    self._reading = True
                    self.transport.resumeProducing()  # type: ignore[union-attr]
                if not self._in_head:
                    self._idle_since = self._clock.seconds()
                    if self._current is None and not self._stopped:
                        # Idle between requests: the parser is between messages, so a new
                        # one (made when bytes arrive) is equivalent; the head is answered.
                        self._parser = None
                        self._url = b""
                        self._headers = []
                break
        finally:
            self._pumping = False

    def _dispatch(self, request: H1Request) -> None:
        if request.tp_too_large:
            request.respond(413, _TEXT, b"413 Content Too Large\n")
            return
        try:
            self._server.handle(request)
        except Exception:
            log.failure("request handler failed for {uri!r}", uri=request.uri)
            if request.code == 200 and not request.done:
                request.persistent = False
                request.respond(500, _TEXT, b"500 Internal Server Error\n")
            else:
                request.abort()

    def request_done(self, request: H1Request) -> None:
        """Called by the request when its answer is complete."""
        if request is not self._active:
            return
        self._active = None
        self._server.request_done(request)
        if not request.persistent:
            self._queue.clear()
            self.close()
            return
        self._pump()

    def _answer_error(self, status: int) -> None:
        self._error_status = 0
        body = status_line(b"HTTP/1.1", status)[9:]
        self.send(
            status_line(b"HTTP/1.1", status)
            + b"Connection: close\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
        )
        self.close()

    # -- timeouts -------------------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        self._timer = self._clock.callLater(max(delay, 0.01), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closed or self._h2 is not None:
            return
        server = self._server
        now = self._clock.seconds()
        header_timeout, idle_timeout = server.header_timeout, server.idle_timeout
        if self._in_head:
            left = self._head_started + header_timeout - now
            if left <= 0:
                self._closed = True
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
        elif self._active is not None or self._current is not None or self._queue:
            if self._progress != self._progress_seen:
                self._progress_seen = self._progress
                self._progress_at = now
            left = self._progress_at + idle_timeout - now
            if left <= 0:
                self.close()
                return
        else:
            left = self._idle_since + idle_timeout - now
            if left <= 0:
                self.close()
                return
        self._arm(min(left, header_timeout))

    # -- HTTP/2 ---------------------------------------------------------------------------
    def _switch_to_h2(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        h2 = self._h2 = self._server.http2_connection(self)
        transport: Any = self.transport
        h2.makeConnection(transport)
        h2.dataReceived(data)


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip() for t in value.split(b",")}
