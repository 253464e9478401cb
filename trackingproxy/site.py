"""A listener's HTTP server: the lean HTTP/1.1 connection for every connection, the lean HTTP/2
connection for TLS connections whose ALPN chose ``h2``, and the hooks both call: access log,
metrics observer, in-flight request count.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime
from twisted.internet.protocol import ServerFactory

from trackingproxy.accesslog import AccessEntry, AccessLog
from trackingproxy.exchange import ClientExchange
from trackingproxy.h2server import H2ServerBase, Owner, choose_engine
from trackingproxy.http1server import MAX_HEADER_BYTES, MAX_HEADERS, HTTP1Connection
from trackingproxy.lifecycle import ActiveRequests
from trackingproxy.memory import AllocatorTrim

__all__ = [
    "HEADER_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "ProxySite",
]

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0


class Handler(Protocol):
    """The request handler (``trackingproxy.proxy.TrackingHandler``)."""

    def handle(self, exchange: ClientExchange) -> None: ...


class SiteObserver(Protocol):
    """Metric hooks of a listener (``trackingproxy.admin.metrics.SiteMetrics``)."""

    def request_done(self, request: Any) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...


class ProxySite(ServerFactory):
    """One listener: builds the connections and runs the per-request hooks."""

    def __init__(
        self,
        handler: Handler,
        access_log: AccessLog,
        scheme: str,
        reactor: IReactorTime,
        idle_timeout: float = IDLE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        active: ActiveRequests | None = None,
        observer: SiteObserver | None = None,
        h2_engine: type[H2ServerBase] | None = None,
        trimmer: AllocatorTrim | None = None,
    ) -> None:
        if h2_engine is None:
            h2_engine = choose_engine("auto")[0]
        self.h2_engine = h2_engine
        self._trimmer = trimmer
        self.clock = reactor
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self._access_log = access_log
        self._active = active
        self.observer = observer
        self._scheme = scheme

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = HTTP1Connection(self)
        protocol.factory = self
        return protocol

    def http2_connection(self, owner: Owner) -> IProtocol:
        return self.h2_engine(self, owner)

    # -- hooks ----------------------------------------------------------------------------
    def connection_opened(self) -> None:
        if self.observer is not None:
            self.observer.connection_opened()

    def connection_closed(self) -> None:
        if self.observer is not None:
            self.observer.connection_closed()
        if self._trimmer is not None:
            self._trimmer.connection_closed()

    def handle(self, exchange: ClientExchange) -> None:
        if not exchange.tp_started:
            exchange.tp_started = self.clock.seconds()
        if self._active is not None:
            self._active.started(exchange)
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
