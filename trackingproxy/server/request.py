"""What the HTTP/1.1 and HTTP/2 requests share (`trackingproxy.server.http1request`,
`trackingproxy.server.http2request`): the parsed request's fields and header lookups, and the end
of an exchange: finished (the connection hears of it, ``notifyFinish`` fires) or lost (the handler's
``on_lost`` callback runs, ``notifyFinish`` fails). The answer itself is protocol-specific.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from trackingproxy.server.exchange import Outcome

NEW, STARTED, DONE = 0, 1, 2

__all__ = ["DONE", "NEW", "STARTED", "ServerRequest"]


class _Connection(Protocol):
    def request_done(self, request: Any) -> None: ...  # the connection's own request type
    def peer_host(self) -> str: ...
    def sni(self) -> str | None: ...
    def upstream_changed(self, delta: int) -> None: ...


class ServerRequest:
    """A request received from a client (see `trackingproxy.server.exchange.ClientExchange`)."""

    __slots__ = (
        "_conn",
        "_finished",
        "_lost_callback",
        "_state",
        "clientproto",
        "code",
        "headers",
        "method",
        "outcome",
        "sent",
        "started",
        "too_large",
        "uri",
    )

    def __init__(
        self,
        conn: _Connection,
        method: bytes,
        uri: bytes,
        clientproto: bytes,
        headers: list[tuple[bytes, bytes]],
        started: float,
    ) -> None:
        self._conn = conn
        self.method = method
        self.uri = uri
        self.clientproto = clientproto
        self.headers = headers
        self.started = started  # when its head began to arrive
        self.too_large = False  # its body is over MAX_BODY: answered 413, never read
        self.outcome = Outcome()
        self.code = 200
        self.sent = 0
        self._state = NEW
        self._lost_callback: Callable[[], None] | None = None
        self._finished: Deferred[None] | None = None

    # -- the request ----------------------------------------------------------------------
    def header(self, name: bytes) -> bytes | None:
        for n, v in reversed(self.headers):
            if n == name:
                return v
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def header_items(self) -> Iterable[tuple[bytes, bytes]]:
        return self.headers

    def peer_host(self) -> str:
        return self._conn.peer_host()

    def sni(self) -> str | None:
        return self._conn.sni()

    def upstream_started(self) -> None:
        """Work upstream began for this exchange: it counts against the client connection
        until `upstream_ended`, even when the client goes away first."""
        self._conn.upstream_changed(1)

    def upstream_ended(self) -> None:
        """The upstream work of this exchange is over (answered, failed or dropped)."""
        self._conn.upstream_changed(-1)

    @property
    def done(self) -> bool:
        return self._state == DONE

    # -- the end of the exchange ----------------------------------------------------------
    def on_lost(self, callback: Callable[[], None]) -> None:
        self._lost_callback = callback

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the answer is finished, fails if the client goes away first."""
        if self._finished is None:
            self._finished = Deferred()
        return self._finished

    def _done(self) -> None:
        self._state = DONE
        self._lost_callback = None  # it refers back to us: no cycle left for the collector
        self._conn.request_done(self)
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.callback(None)

    def connection_lost(self) -> None:
        """The client went away (or reset the stream) before the answer was finished."""
        if self._state == DONE:
            return
        self._state = DONE
        callback, self._lost_callback = self._lost_callback, None
        if callback is not None:
            callback()
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.errback(Failure(ConnectionDone("the client went away")))
