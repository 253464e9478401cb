"""The HTTP/1.1 server connection: requests parsed by httptools (llhttp, in C, strict),
answered in order (pipelining), with the limits and timeouts of the listener.

- Limits: at most ``MAX_HEADERS`` header fields and ``MAX_HEADER_BYTES`` of names and values
  (431), a request target of at most ``MAX_TARGET`` bytes (414), bodies of at most ``MAX_BODY``
  (413 and close, at once when Content-Length says so). Framing the parser refuses (obs-fold,
  bare LF, CL with TE, duplicate CL, bad chunks) and a repeated Host get 400 and a close.
- Timeouts: the request head must arrive within the header timeout (slowloris: the connection
  is aborted), and its body within the body timeout after the head (408, then a lingering
  close); an idle keep-alive connection, or one where nothing moves in either direction
  while a request is open, is closed after the idle timeout. One timer per connection, never
  re-armed per request: it wakes at most every header timeout and checks the state.
- Raw bytes the parser has not yet reported (a head still arriving, a header value, a chunk-
  size line) are counted per slice of at most ``_SLICE`` bytes fed, from the slice where the
  head began, so complete requests and bodies earlier in the same read never count against
  the next head (``_RAW_HEAD_LIMIT``: 431). A chunk extension longer than 1 KiB is refused
  (400) however the reads split it. Chunked trailer fields are read (within the header
  limits) and dropped, never merged into the request's fields (RFC 9110 6.5.1).
- Framing refused: ``Transfer-Encoding`` other than exactly ``chunked`` (501), an HTTP/1.1
  request without Host (400), an Upgrade request with a body (400), an ``Expect`` other than
  ``100-continue`` (417). ``Expect: 100-continue`` with a body gets ``100 Continue`` when no
  earlier answer is pending on the connection (the body is read here, never forwarded as such).
- Output back-pressure: the connection is its transport's streaming producer for its whole
  life; when the client does not read its answers (pipelining, a large body), the transport
  pauses it: no further request is dispatched or read until the output drains, and the body
  being streamed is paused. (Closing unregisters first: TLS holds a close back while a producer
  is registered.)
- Error answers (400, 408, 413, 414, 431, 501, 505) end with a lingering close (as nginx's
  ``lingering_close``): no more requests are parsed, the write side is shut down (plain TCP),
  and input is read and dropped for up to ``LINGER_SECONDS`` (``LINGER_IDLE`` without bytes),
  so the kernel does not answer unread bytes with a reset that could destroy the answer.
- Keep-alive: HTTP/1.1 unless ``Connection: close``; HTTP/1.0 closes after each answer; after
  a shutdown notice (SIGTERM) every answer closes the connection, and an idle one closes at once.
- TLS connections whose ALPN chose ``h2`` are handed to `trackingproxy.server.http2`.
- Memory: an idle keep-alive connection keeps no parser (a new one is cheap to make when the
  next request starts) and no copy of the last request's head.
  A closed connection drops its parser, whose callbacks point back at it: without that, every
  connection would be a reference cycle left for the (tuned, rarely running) collector.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import httptools
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.server.backpressure import ConnectionProducer
from trackingproxy.server.http1request import H1Request
from trackingproxy.server.http2 import H2ServerBase
from trackingproxy.server.limits import (
    MAX_BODY,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_QUEUED,
    MAX_TARGET,
)
from trackingproxy.server.registry import SHUTDOWN, ShutdownNotice
from trackingproxy.server.wire import status_line

log = Logger(namespace="trackingproxy.server.http1")

LINGER_SECONDS = 5.0  # a lingering close reads and drops input for at most this long
LINGER_IDLE = 2.0  # ... or until no byte came for this long
_SLICE = 4096  # reads are fed in slices of at most this: the unit of raw-byte accounting
_RAW_HEAD_LIMIT = MAX_HEADER_BYTES + MAX_TARGET + 8192
# A chunk-size line with a long extension (llhttp skips extensions without a limit).
_LONG_CHUNK_EXT = re.compile(rb"\n[0-9A-Fa-f]+[ \t]*;[^\r\n]{1024}")
_CHUNK_TAIL = 2048  # bytes of the previous reads kept to find an extension split across them
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_TEXT = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store")]


class Server(Protocol):
    """What a connection needs from its listener (``trackingproxy.server.listener.ProxySite``)."""

    clock: IReactorTime
    header_timeout: float
    idle_timeout: float
    body_timeout: float

    def handle(self, request: H1Request) -> None: ...
    def request_done(self, request: H1Request) -> None: ...
    def connection_opened(self, connection: HTTP1Connection) -> None: ...
    def connection_closed(self, connection: HTTP1Connection) -> None: ...
    def http2_connection(self, owner: HTTP1Connection) -> H2ServerBase: ...


class _Stop(Exception):
    """Raised from a parser callback: read nothing more from this connection."""

    def __init__(self, status: int = 0) -> None:
        self.status = status


class HTTP1Connection(TwistedProtocol):
    """One client connection; see the module docstring."""

    __slots__ = (
        "_active",
        "_body",
        "_body_producer",
        "_body_size",
        "_body_started",
        "_chunk_tail",
        "_chunked",
        "_clock",
        "_closed",
        "_connection",
        "_content_length",
        "_current",
        "_draining",
        "_error_status",
        "_expect",
        "_h1",
        "_h2",
        "_head_raw",
        "_head_started",
        "_header_bytes",
        "_headers",
        "_idle_since",
        "_in_head",
        "_linger_deadline",
        "_lingering",
        "_output_paused",
        "_parser",
        "_peer",
        "_progress",
        "_progress_at",
        "_progress_seen",
        "_pumping",
        "_pusher",
        "_queue",
        "_reading",
        "_saw_host",
        "_server",
        "_sni",
        "_stopped",
        "_te_ok",
        "_timer",
        "_trailer_bytes",
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
        self._h2: H2ServerBase | None = None
        self._h1 = False  # the client speaks HTTP/1.x (no ALPN h2): decided on the first bytes
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._content_length = b""
        self._connection = b""
        self._saw_host = False
        self._chunked = False  # a request in this read or still being read is chunked
        self._chunk_tail = b""  # the end of earlier reads of a chunked body (extension check)
        self._te_ok = True  # Transfer-Encoding, if any, is exactly "chunked"
        self._expect = b""
        self._trailer_bytes = 0
        self._body: list[bytes] | None = None
        self._body_size = 0
        self._body_started = 0.0
        self._body_producer: Any = None  # the streamed answer's producer (the upstream body)
        self._output_paused = False  # the transport's buffer is full: the client is not reading
        self._pusher: ConnectionProducer | None = None  # registered with the transport
        self._lingering = False
        self._linger_deadline = 0.0
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
        # small-write aggregator).
        self._write = self.transport.write  # type: ignore[union-attr]
        self._pusher = ConnectionProducer(self)
        self.transport.registerProducer(self._pusher, True)  # type: ignore[union-attr]
        self._server.connection_opened(self)
        self._idle_since = self._clock.seconds()
        self._arm(min(self._server.header_timeout, self._server.idle_timeout))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._pusher is not None:
            self._pusher.conn = None  # the transport is gone: nothing to unregister from
            self._pusher = None
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
        self._server.connection_closed(self)

    def shutdown_notice(self, notice: ShutdownNotice = SHUTDOWN) -> None:
        """The server is stopping: requests already received are answered with
        ``Connection: close`` and the connection closes after them; an idle one closes now.
        HTTP/2 connections send GOAWAY (`trackingproxy.server.http2`)."""
        if self._closed or self._draining:
            return
        self._draining = True
        if self._h2 is not None:
            self._h2.shutdown_notice(notice)
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
            self._unregister()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Drop the connection now (what is left at the end of a shutdown's grace period)."""
        self._stopped = True
        if not self._closed:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _unregister(self) -> None:
        """Stop being the transport's producer (TLS holds a close back while one is)."""
        pusher, self._pusher = self._pusher, None
        if pusher is not None:
            pusher.conn = None
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def register_producer(self, producer: Any) -> None:
        self._body_producer = producer
        if self._output_paused:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self._body_producer = None

    # -- output back-pressure (IPushProducer of the transport) ----------------------------
    def pauseProducing(self) -> None:
        """The client is not reading: stop taking requests, pause the streamed answer."""
        self._output_paused = True
        if self._body_producer is not None:
            self._body_producer.pauseProducing()
        self._update_reading()

    def resumeProducing(self) -> None:
        self._output_paused = False
        if self._body_producer is not None:
            self._body_producer.resumeProducing()
        self._update_reading()
        if not self._closed:
            self._pump()

    def stopProducing(self) -> None:
        pass  # the transport is going away: connectionLost follows

    def _update_reading(self) -> None:
        want = (
            not self._closed
            and (self._lingering or (len(self._queue) < MAX_QUEUED and not self._output_paused))
        )
        if want != self._reading and self.transport is not None:
            self._reading = want
            if want:
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            else:
                self.transport.pauseProducing()  # type: ignore[attr-defined]

    # -- lingering close ------------------------------------------------------------------
    def _linger(self) -> None:
        """Close after an error answer without losing it to a reset: parse nothing more, shut
        down writing (plain TCP), read and drop input for a bounded time, then close."""
        self._stopped = True
        if self._closed or self._lingering:
            return
        self._lingering = True
        self._parser = None
        self._queue.clear()
        self._current = None
        self._body = None
        self._unregister()
        self._body_producer = None
        transport: Any = self.transport
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()  # the client reads our answer, then EOF
        now = self._clock.seconds()
        self._linger_deadline = now + LINGER_SECONDS
        self._idle_since = now
        self._update_reading()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._arm(LINGER_IDLE)

    # -- reading --------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._lingering:
            self._idle_since = self._clock.seconds()  # dropped: a lingering close reads only
            return
        parser = self._parser
        if parser is None:
            if not self._h1:
                if self._h2 is not None:
                    self._h2.dataReceived(data)
                    return
                if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                    name_connection(self.transport, "h2")
                    self._switch_to_h2(data)
                    return
                self._h1 = True
                name_connection(self.transport, "h1")
            parser = self._parser = httptools.HttpRequestParser(self)
        if self._stopped:
            return
        self._progress += 1
        queued = len(self._queue)
        if len(data) <= _SLICE:
            self._feed(parser, data)
        else:
            view = memoryview(data)
            for start in range(0, len(data), _SLICE):
                self._feed(parser, view[start : start + _SLICE])
                if self._stopped:
                    break
        if self._chunked:
            # The end of earlier reads is searched too: an extension split across reads.
            window = self._chunk_tail + data
            if _LONG_CHUNK_EXT.search(window):
                del self._queue[queued:]
                self._stopped = True
                self._error_status = 400
            elif self._current is None:
                self._chunked = False
                self._chunk_tail = b""
            else:
                self._chunk_tail = window[-_CHUNK_TAIL:]
        self._pump()

    def _feed(self, parser: Any, data: bytes | memoryview) -> None:
        """Feed one slice; a head in progress counts it whole, from the slice it began in."""
        began = self._in_head
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
            return
        except httptools.HttpParserUpgrade:
            # CONNECT, or an Upgrade we do not do: answer what was asked, then close.
            self._stopped = True
            if self._queue:
                self._queue[-1].persistent = False
            return
        except httptools.HttpParserError:
            self._stopped = True
            self._error_status = 400
            return
        if self._in_head:
            self._head_raw = self._head_raw + len(data) if began else len(data)
            if self._head_raw > _RAW_HEAD_LIMIT:
                self._stopped = True
                self._error_status = 431

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_started = self._clock.seconds()
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._content_length = b""
        self._connection = b""
        self._saw_host = False
        self._te_ok = True
        self._expect = b""
        self._trailer_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise _Stop(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A chunked trailer field: bounded like the head, then dropped (RFC 9110 6.5.1).
            self._trailer_bytes += len(name) + len(value)
            if self._trailer_bytes > MAX_HEADER_BYTES:
                raise _Stop(431)
            return
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
            # Only "chunked" is understood; llhttp accepts e.g. "gzip, chunked" and would
            # drop the gzip coding silently (RFC 9112 6.1: 501).
            self._te_ok = self._te_ok and value.lower() == b"chunked"
        elif name == b"expect":
            self._expect = value.lower()
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
        if not self._te_ok:
            raise _Stop(501)
        if version == b"HTTP/1.1" and not self._saw_host:
            raise _Stop(400)  # RFC 9112 3.2
        has_body = self._chunked or self._content_length not in (b"", b"0")
        if has_body and parser.should_upgrade():
            raise _Stop(400)  # its body would be read as another protocol's bytes
        url = self._url
        if b"#" in url:
            url = url.partition(b"#")[0]  # a fragment is not part of a request target
        persistent = (
            version == b"HTTP/1.1"
            and not self._draining
            and (not self._connection or b"close" not in _tokens(self._connection))
        )
        request = H1Request(
            self,
            parser.get_method(),
            url,
            version,
            self._headers,
            persistent,
            self._head_started,
        )
        self._current = request
        self._body = None
        self._body_size = 0
        self._body_started = self._clock.seconds()
        if self._content_length and int(self._content_length) > MAX_BODY:
            self._too_large(request)
        if self._expect and version == b"HTTP/1.1":
            if self._expect != b"100-continue":
                raise _Stop(417)
            if has_body and self._active is None and not self._queue:
                self.send(_CONTINUE)  # nothing answered before it is pending: safe to send

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
        if len(self._queue) >= MAX_QUEUED:
            self._update_reading()

    def _too_large(self, request: H1Request) -> None:
        self._current = None
        self._body = None
        request.too_large = True
        request.persistent = False
        self._queue.append(request)
        raise _Stop()

    # -- answering in order ---------------------------------------------------------------
    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._active is None and not self._closed and not self._output_paused:
                if self._queue:
                    request = self._active = self._queue.pop(0)
                    self._dispatch(request)
                    continue
                if self._error_status:
                    self._answer_error(self._error_status)
                    break
                if not self._reading and not self._stopped:
                    self._update_reading()
                # (The idle clock is not reset here: bytes that start no request, such as
                # blank lines, must not keep a connection open. request_done resets it.)
                if not self._in_head and self._current is None and not self._stopped:
                    # Idle between requests: the parser is between messages, so a new one
                    # (made when bytes arrive) is equivalent; the head is answered.
                    self._parser = None
                    self._url = b""
                    self._headers = []
                break
        finally:
            self._pumping = False

    def _dispatch(self, request: H1Request) -> None:
        if request.too_large:
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
        self._idle_since = self._clock.seconds()  # idle from the end of the last answer
        self._server.request_done(request)
        if not request.persistent:
            self._queue.clear()
            if request.too_large:
                self._linger()  # the rest of the body may still be on its way
            else:
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
        self._linger()

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
        if self._lingering:
            left = min(self._linger_deadline, self._idle_since + LINGER_IDLE) - now
            if left <= 0:
                self._closed = True
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._arm(left)
            return
        if self._in_head:
            left = self._head_started + header_timeout - now
            if left <= 0:
                self._closed = True
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
        elif self._current is not None and (
            now - self._body_started >= server.body_timeout
        ):
            self._body_timed_out()
            return
        elif self._active is not None or self._current is not None or self._queue:
            if self._progress != self._progress_seen:
                self._progress_seen = self._progress
                self._progress_at = now
            left = self._progress_at + idle_timeout - now
            if self._current is not None:
                left = min(left, self._body_started + server.body_timeout - now)
            if left <= 0:
                self.close()
                return
        else:
            left = self._idle_since + idle_timeout - now
            if left <= 0:
                self.close()
                return
        self._arm(min(left, header_timeout))

    def _body_timed_out(self) -> None:
        """The body did not arrive within the body timeout (a slow-body attack, or a client
        that announced more than it sends): 408 after the answers owed, then close."""
        self._current = None
        self._body = None
        self._stopped = True
        self._error_status = 408
        self._pump()
        if not self._closed and not self._lingering:
            self._arm(min(self._server.header_timeout, self._server.idle_timeout))

    # -- HTTP/2 ---------------------------------------------------------------------------
    def _switch_to_h2(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        h2 = self._h2 = self._server.http2_connection(self)
        self._unregister()  # the HTTP/2 connection does its own back-pressure
        transport: Any = self.transport
        h2.makeConnection(transport)
        h2.dataReceived(data)


def name_connection(transport: Any, protocol: str) -> None:
    """Name the connection in the log by what it speaks: ``h2 TLS,4,198.51.100.7`` instead of
    ``HTTP1Connection (TLSServerProtocol),4,198.51.100.7`` (the TCP transport's log prefix,
    fixed when it was accepted, before TLS and ALPN said what the client speaks)."""
    secure = ISSLTransport.providedBy(transport)
    tcp = transport
    while tcp is not None and not hasattr(tcp, "logstr"):
        tcp = getattr(tcp, "transport", None)
    if tcp is None or not isinstance(tcp.logstr, str):
        return
    _, _, rest = tcp.logstr.partition(",")
    tcp.logstr = f"{protocol} {'TLS' if secure else 'plain'}," + rest


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip() for t in value.split(b",")}
