"""A listening port's HTTP server (`HTTPListener`): an HTTP/1.1 connection for every connection
(handed to an HTTP/2 connection when TLS's ALPN chose ``h2``), the request handler, the
timeouts, and the `ListenerObserver`s that hear of connections and requests: the access log
(`trackingproxy.logs.access`), the metrics (`trackingproxy.admin.metrics`), the in-flight count
(`trackingproxy.ops.lifecycle`) and the allocator trim (`trackingproxy.ops.malloctrim`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory

from trackingproxy.server.engines import choose_engine
from trackingproxy.server.exchange import ClientExchange
from trackingproxy.server.http1 import HTTP1Connection
from trackingproxy.server.http2 import H2ServerBase, Owner
from trackingproxy.server.limits import BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT
from trackingproxy.server.registry import ConnectionRegistry

__all__ = ["HTTPListener", "Handler", "ListenerObserver"]


class Handler(Protocol):
    """The request handler (`trackingproxy.proxy.handler.TrackingHandler`)."""

    def handle(self, exchange: ClientExchange) -> None: ...


class ListenerObserver:
    """What hears of a listener's connections and requests; each hook does nothing unless
    overridden. ``request_done`` runs once the answer is complete (``exchange.outcome`` then
    holds what the handler found out)."""

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def request_started(self, exchange: ClientExchange) -> None:
        pass

    def request_done(self, exchange: ClientExchange) -> None:
        pass


class HTTPListener(ServerFactory):
    """One listening port: builds the connections and tells the observers."""

    def __init__(
        self,
        handler: Handler,
        clock: IReactorTime,
        observers: Sequence[ListenerObserver] = (),
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        h2_engine: type[H2ServerBase] | None = None,
    ) -> None:
        if h2_engine is None:
            h2_engine = choose_engine("auto")[0]
        self.h2_engine = h2_engine
        self.clock = clock
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.observers = tuple(observers)
        self.connections = ConnectionRegistry()  # open now (shutdown reaches them through it)
        # Each hook calls only the observers that implement it (this runs per request).
        self._opened = _hooks(self.observers, "connection_opened")
        self._closed = _hooks(self.observers, "connection_closed")
        self._started = _hooks(self.observers, "request_started")
        self._done = _hooks(self.observers, "request_done")

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = HTTP1Connection(self)
        protocol.factory = self
        return protocol

    def http2_connection(self, owner: Owner) -> H2ServerBase:
        return self.h2_engine(self, owner)

    # -- what the connections call --------------------------------------------------------
    def connection_opened(self, connection: HTTP1Connection) -> None:
        self.connections.add(connection)
        for hook in self._opened:
            hook()

    def connection_closed(self, connection: HTTP1Connection) -> None:
        self.connections.discard(connection)
        for hook in self._closed:
            hook()

    def handle(self, exchange: ClientExchange) -> None:
        if not exchange.started:
            exchange.started = self.clock.seconds()
        for hook in self._started:
            hook(exchange)
        self.handler.handle(exchange)

    def request_done(self, exchange: ClientExchange) -> None:
        for hook in self._done:
            hook(exchange)


def _hooks(observers: Sequence[ListenerObserver], name: str) -> tuple[Any, ...]:
    """The bound ``name`` methods of the observers that override ListenerObserver's."""
    default = getattr(ListenerObserver, name)
    return tuple(getattr(o, name) for o in observers if getattr(type(o), name) is not default)
