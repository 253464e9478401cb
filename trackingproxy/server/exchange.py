"""The seam between the HTTP servers and the request handler: one client request and its answer.

`ClientExchange` is what `trackingproxy.proxy.handler.TrackingHandler` works on. Two
implementations: the HTTP/1.1 server's request (`trackingproxy.server.http1request.H1Request`) and
the HTTP/2 server's (`trackingproxy.server.http2request.H2Request`), both on
`trackingproxy.server.request.ServerRequest`.

Header names passed in are lower case; header lists passed out are ``(name, value)`` pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from attrs import define
from twisted.internet.defer import Deferred

__all__ = ["ClientExchange", "Outcome"]

@define(slots=True)
class Outcome:
    """What handling a request found out, written by the handler and read by the access log
    and the metrics once the answer is done: the configured domain it was for (``-`` when
    none), the client address it stands for (X-Forwarded-For from a trusted proxy; None: the
    peer), and the cause of an upstream failure (a metrics label; None: none)."""

    host: str = "-"
    client: str | None = None
    upstream_error: str | None = None


class ClientExchange(Protocol):
    """One request from a client and the means to answer it."""

    method: bytes
    uri: bytes
    clientproto: bytes  # b"HTTP/1.1", b"HTTP/1.0" or b"HTTP/2"
    started: float  # when the request's head began to arrive (the listener's clock)
    outcome: Outcome  # what handling it found out, for the access log and the metrics

    @property
    def code(self) -> int: ...
    @property
    def sent(self) -> int: ...
    @property
    def too_large(self) -> bool:
        """The body is over the limit: the handler answers 413 (the server read none of it)."""

    # -- the request ----------------------------------------------------------------------
    def header(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (lower case), or None."""

    def header_values(self, name: bytes) -> list[bytes]: ...

    def header_items(self) -> Iterable[tuple[bytes, bytes]]:
        """Every request header as (lower-case name, value), in order."""

    def body(self) -> bytes: ...

    def peer_host(self) -> str:
        """The TCP (or PROXY protocol) peer's address, ``-`` if unknown."""

    def sni(self) -> str | None:
        """The TLS server name of the connection, lower case, if any."""

    # -- the answer -----------------------------------------------------------------------
    def respond(self, code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A complete answer (Content-Length and Date added; no body sent for HEAD)."""

    def start(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        add_date: bool,
    ) -> None:
        """Begin a streamed answer of ``length`` bytes (None: unknown)."""

    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...

    def close_after(self) -> None:
        """Close the client connection after this answer (HTTP/1.x; nothing on HTTP/2)."""

    def abort(self) -> None:
        """Give up on an answer that cannot be completed: the client connection is closed."""

    def register_producer(self, producer: Any) -> None:
        """Let the client connection pause ``producer`` (an IPushProducer) when it is full."""

    def unregister_producer(self) -> None: ...

    def upstream_started(self) -> None:
        """Work upstream began: it counts against the client connection until
        `upstream_ended`, even when the client goes away first."""

    def upstream_ended(self) -> None:
        """The upstream work of this exchange is over (answered, failed or dropped)."""

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the client goes away before the answer is finished."""

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the answer is finished, fails if the client goes away first."""
