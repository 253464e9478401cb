"""A listener's HTTP server: the lean HTTP/1.1 connection for every connection, twisted.web's
H2Connection (with our Request) for TLS connections whose ALPN chose ``h2``, and the hooks both
call: access log, metrics observer, in-flight request count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from io import BytesIO
from typing import Any, Protocol

import h2.exceptions as h2_exceptions
from h2.errors import ErrorCodes
from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from twisted.web.http import datetimeToString
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from trackingproxy.accesslog import AccessEntry, AccessLog
from trackingproxy.exchange import ClientExchange
from trackingproxy.http1server import MAX_HEADER_BYTES, MAX_HEADERS, HTTP1Connection
from trackingproxy.lifecycle import ActiveRequests
from trackingproxy.proxy import MAX_BODY, sni_name

__all__ = [
    "HEADER_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "ProxyRequest",
    "ProxySite",
    "TwistedExchange",
]

HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0


class Handler(Protocol):
    """The request handler (``trackingproxy.proxy.TrackingResource``)."""

    def handle(self, exchange: ClientExchange) -> None: ...


class SiteObserver(Protocol):
    """Metric hooks of a listener (``trackingproxy.admin.metrics.SiteMetrics``)."""

    def request_done(self, request: Any) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...


class ProxyRequest(Request):
    """twisted.web's Request for HTTP/2 streams: at most MAX_BODY bytes of body, in memory."""

    tp_too_large = False
    _tp_received = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # Bodies are forwarded as bytes: never parse form posts into request.args.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(channel, *args, **kwargs)

    def process(self) -> None:
        """Hand the request to the site's handler through `TwistedExchange` (no resource
        traversal, no ``Server`` header; ``OPTIONS *`` is not a tracking request: 400)."""
        site: ProxySite = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        self.setHeader(b"date", datetimeToString())
        exchange = TwistedExchange(self)
        if self.path == b"*":
            exchange.respond(400, [], b"")
            return
        try:
            site.handle(exchange)
        except BaseException:
            self.processingFailed(Failure())

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > MAX_BODY:
            self.tp_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.tp_too_large:
            return
        self._tp_received += len(data)
        if self._tp_received > MAX_BODY:
            self.tp_too_large = True  # the body is dropped; the answer is 413
            self.content = BytesIO()
            return
        assert self.content is not None
        self.content.write(data)


class TwistedExchange:
    """`ClientExchange` over a twisted.web Request (the HTTP/2 path)."""

    def __init__(self, request: ProxyRequest) -> None:
        self._request = request
        self.method: bytes = request.method
        self.uri: bytes = request.uri
        self.clientproto: bytes = request.clientproto
        self.tp_host = "-"
        self.tp_client: str | None = None
        self.tp_upstream_error: str | None = None
        self.tp_started = 0.0
        request.tp_exchange = self  # type: ignore[attr-defined]

    @property
    def code(self) -> int:
        return int(self._request.code)

    @property
    def sent(self) -> int:
        return int(self._request.sentLength)

    @property
    def tp_too_large(self) -> bool:
        return self._request.tp_too_large

    def header(self, name: bytes) -> bytes | None:
        return self._request.getHeader(name)

    def header_values(self, name: bytes) -> list[bytes]:
        return list(self._request.requestHeaders.getRawHeaders(name) or ())

    def header_items(self) -> Iterable[tuple[bytes, bytes]]:
        for name, values in self._request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            for value in values:
                yield lower, value

    def body(self) -> bytes:
        content = self._request.content
        return content.getvalue() if isinstance(content, BytesIO) else b""

    def peer_host(self) -> str:
        return str(getattr(self._request.getClientAddress(), "host", None) or "-")

    def sni(self) -> str | None:
        return sni_name(self._request)

    def respond(self, code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        request = self._request
        request.setResponseCode(code)
        for name, value in headers:
            request.setHeader(name, value)
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD" and body:
            request.write(body)
        request.finish()

    def start(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        add_date: bool,
    ) -> None:
        request = self._request
        request.setResponseCode(code, phrase)
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            grouped.setdefault(name, []).append(value)
        for name, values in grouped.items():
            request.responseHeaders.setRawHeaders(name, values)
        if length is not None:
            request.setHeader(b"content-length", b"%d" % length)

    def write(self, data: bytes) -> None:
        self._request.write(data)

    def finish(self) -> None:
        self._request.finish()

    def close_after(self) -> None:
        pass

    def abort(self) -> None:
        self._request.loseConnection()

    def register_producer(self, producer: Any) -> None:
        self._request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        self._request.unregisterProducer()

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._request.notifyFinish().addErrback(lambda _: callback())

    def notifyFinish(self) -> Any:
        return self._request.notifyFinish()


class _H2Connection(H2Connection):
    """twisted.web's HTTP/2 connection, refusing streams it cannot handle: CONNECT and requests
    without a ``:path`` (twisted's H2Stream would fail on them with an unhandled error)."""

    def _requestReceived(self, event: Any) -> None:
        pseudo = {name: value for name, value in event.headers if name[:1] == b":"}
        path = pseudo.get(b":path")
        if pseudo.get(b":method") == b"CONNECT" or not path or path[:1] not in (b"/", b"*"):
            self.conn.reset_stream(event.stream_id, error_code=ErrorCodes.PROTOCOL_ERROR)
            transport: Any = self.transport
            transport.write(self.conn.data_to_send())
            return  # later events of this stream find no H2Stream: see the handlers below
        super()._requestReceived(event)

    def _requestDataReceived(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestDataReceived(event)
        else:  # a refused stream: give the flow-control window back, drop the data
            with contextlib.suppress(h2_exceptions.H2Error):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def _requestEnded(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestAborted(event)


class ProxySite(Site):
    """One listener: builds the connections and runs the per-request hooks."""

    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: IResource,
        access_log: AccessLog,
        scheme: str,
        reactor: IReactorTime,
        idle_timeout: float = IDLE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        active: ActiveRequests | None = None,
        observer: SiteObserver | None = None,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        self.clock = reactor
        self.handler: Handler = resource  # type: ignore[assignment]
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self._access_log = access_log
        self._active = active
        self.observer = observer
        self._scheme = scheme
        self.displayTracebacks = False

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = HTTP1Connection(self)
        protocol.factory = self
        return protocol

    def http2_connection(self) -> IProtocol:
        connection: Any = _H2Connection(self.reactor)
        connection.requestFactory = self.requestFactory
        connection.site = self
        connection.factory = self
        connection.timeOut = self.timeOut
        connection.callLater = self.reactor.callLater
        return connection  # type: ignore[no-any-return]

    # -- hooks ----------------------------------------------------------------------------
    def connection_opened(self) -> None:
        if self.observer is not None:
            self.observer.connection_opened()

    def connection_closed(self) -> None:
        if self.observer is not None:
            self.observer.connection_closed()

    def handle(self, exchange: ClientExchange) -> None:
        if not exchange.tp_started:
            exchange.tp_started = self.clock.seconds()
        if self._active is not None:
            self._active.started(exchange)  # type: ignore[arg-type]
        self.handler.handle(exchange)

    def request_done(self, exchange: ClientExchange) -> None:
        if self.observer is not None:
            self.observer.request_done(exchange)
        if not self._access_log.enabled:
            return
        now = self.clock.seconds()
        self._access_log.log(
            AccessEntry(
                when=now,
                client=exchange.tp_client or exchange.peer_host(),
                host=exchange.tp_host,
                method=exchange.method.decode("latin-1"),
                target=exchange.uri,
                protocol=exchange.clientproto.decode("latin-1") or "-",
                status=exchange.code,
                sent=exchange.sent,
                referer=(exchange.header(b"referer") or b"").decode("latin-1"),
                user_agent=(exchange.header(b"user-agent") or b"").decode("latin-1"),
                duration=now - exchange.tp_started,
                scheme=self._scheme,
            )
        )

    def log(self, request: Any) -> None:
        """twisted.web's hook when an HTTP/2 request finishes."""
        exchange = getattr(request, "tp_exchange", None)
        if exchange is not None:
            self.request_done(exchange)
