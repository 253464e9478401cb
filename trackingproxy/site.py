"""The HTTP server side: request limits, slowloris timeouts and access logging (twisted.web Site).

HTTP/1.1 and HTTP/2 (negotiated by ALPN on TLS listeners) share one Site per listener.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol, datetimeToString
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from trackingproxy.accesslog import AccessEntry, AccessLog
from trackingproxy.lifecycle import ActiveRequests
from trackingproxy.proxy import MAX_BODY

HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16384

_TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 22\r\n\r\n413 Content Too Large\n"
)


class ProxyRequest(Request):
    """A Request that keeps at most MAX_BODY bytes of body, in memory (never a temp file)."""

    tp_too_large = False
    tp_host = "-"
    tp_client: str | None = None
    tp_upstream_error: str | None = None

    tp_started = 0.0
    _tp_received = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # Bodies are forwarded as bytes: never parse form posts into request.args.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(channel, *args, **kwargs)

    def process(self) -> None:
        """twisted.web's Request.process without the ``Server: TwistedWeb/<version>`` header,
        the per-request path splitting (our root resource is a leaf) and the special answer to
        ``OPTIONS *`` (which is not a tracking request: 400)."""
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.setHeader(b"date", datetimeToString())
        self.prepath = []
        self.postpath = []
        if self.path == b"*":
            self.setResponseCode(400)
            self.setHeader(b"content-length", b"0")
            self.finish()
            return
        try:
            self.render(self.site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > MAX_BODY:
            self._reject_body()

    def handleContentChunk(self, data: bytes) -> None:
        if self.tp_too_large:
            return
        self._tp_received += len(data)
        if self._tp_received > MAX_BODY:
            self._reject_body()
            return
        assert self.content is not None
        self.content.write(data)

    def _reject_body(self) -> None:
        """Answer 413 and close at once on HTTP/1.1; on HTTP/2 drop the body and answer later."""
        self.tp_too_large = True
        self.content = BytesIO()
        channel = self.channel
        if isinstance(channel, HTTPChannel) and channel.transport is not None:
            self.tp_too_large_closed = True
            channel.transport.write(_TOO_LARGE)
            channel.transport.loseConnection()


class LimitedHTTPChannel(HTTPChannel):
    """HTTPChannel with a deadline for receiving a request's headers (slowloris) and tighter
    header limits. The idle keep-alive timeout is the Site's ``timeout``."""

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    header_timeout = HEADER_TIMEOUT
    _header_deadline: IDelayedCall | None = None
    _awaiting_headers = False
    _local_address: Any = None

    def getHost(self) -> Any:
        # Every Request asks for it; once per connection is enough (it is a getsockname call).
        if self._local_address is None:
            self._local_address = super().getHost()
        return self._local_address

    def dataReceived(self, data: bytes) -> None:
        if not self._awaiting_headers:
            self._awaiting_headers = True
            self._header_deadline = self.callLater(self.header_timeout, self._headers_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # obs-fold (a header line starting with white space) is refused, not merged (RFC 9112
        # 5.2): intermediaries disagree on how to unfold, which is what smuggling feeds on.
        if line[:1] in (b" ", b"\t"):
            self._respondToBadRequestAndDisconnect()
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._awaiting_headers_done()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        super().allContentReceived()
        self._awaiting_headers = False

    def _awaiting_headers_done(self) -> None:
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._awaiting_headers_done()
        super().connectionLost(reason)


class SiteObserver(Protocol):
    """Metric hooks of a listener (``trackingproxy.admin.metrics.SiteMetrics``)."""

    def request_done(self, request: Any) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...


class _ObservedChannelProtocol(_GenericHTTPChannelProtocol):
    """Tells the observer when a client connection opens and closes (HTTP/1.1 or HTTP/2)."""

    observer: SiteObserver

    def makeConnection(self, transport: Any) -> None:
        self.observer.connection_opened()
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.observer.connection_closed()
        super().connectionLost(reason)


def _protocol_factory(site: http.HTTPFactory) -> _GenericHTTPChannelProtocol:
    channel = LimitedHTTPChannel()
    channel.header_timeout = getattr(site, "header_timeout", HEADER_TIMEOUT)
    observer = getattr(site, "observer", None)
    if observer is None:
        return _GenericHTTPChannelProtocol(channel)
    protocol = _ObservedChannelProtocol(channel)
    protocol.observer = observer
    return protocol


class ProxySite(Site):
    """One listener's Site: our Request class, limits, and our access log."""

    requestFactory = ProxyRequest
    protocol = _protocol_factory

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
        self.header_timeout = header_timeout
        self._access_log = access_log
        self._active = active
        self.observer = observer
        self._scheme = scheme
        self.displayTracebacks = False

    def getResourceFor(self, request: Request) -> IResource:
        request.tp_started = self.reactor.seconds()  # type: ignore[attr-defined]
        if self._active is not None:
            self._active.started(request)
        return super().getResourceFor(request)  # type: ignore[no-any-return]

    def log(self, request: http.Request) -> None:
        if self.observer is not None:
            self.observer.request_done(request)
        if not self._access_log.enabled:
            return
        addr = request.getClientAddress()
        client = str(getattr(request, "tp_client", None) or getattr(addr, "host", "-"))
        version = request.clientproto.decode("latin-1") if request.clientproto else "-"
        self._access_log.log(
            AccessEntry(
                when=self.reactor.seconds(),
                client=client,
                host=getattr(request, "tp_host", "-"),
                method=request.method.decode("latin-1"),
                target=request.uri,
                protocol=version,
                status=request.code,
                sent=request.sentLength,
                referer=(request.getHeader(b"referer") or b"").decode("latin-1"),
                user_agent=(request.getHeader(b"user-agent") or b"").decode("latin-1"),
                duration=self.reactor.seconds() - getattr(request, "tp_started", 0.0),
                scheme=self._scheme,
            )
        )
