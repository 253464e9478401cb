"""The seam between the HTTP servers and the request handler: one client request and its answer.

`ClientExchange` is what `trackingproxy.proxy.TrackingHandler` works on. Two implementations:
the HTTP/1.1 server's request (`trackingproxy.h1request.H1Request`) and the HTTP/2 server's
(`trackingproxy.h2request.H2Request`), both on `trackingproxy.serverrequest.ServerRequest`.

Header names passed in are lower case; header lists passed out are ``(name, value)`` pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.web.http import RESPONSES

# Reason phrases twisted.web does not know (RFC 9110).
_PHRASES = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    431: b"Request Header Fields Too Large",
}

__all__ = ["ClientExchange", "date_line", "http_date", "status_line"]

_DAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS = (
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
    b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
)  # fmt: skip


class ClientExchange(Protocol):
    """One request from a client and the means to answer it."""

    method: bytes
    uri: bytes
    clientproto: bytes  # b"HTTP/1.1", b"HTTP/1.0" or b"HTTP/2"
    tp_host: str
    tp_client: str | None
    tp_upstream_error: str | None
    tp_started: float

    @property
    def code(self) -> int: ...
    @property
    def sent(self) -> int: ...
    @property
    def tp_too_large(self) -> bool: ...

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


_cached_second = -1
_cached_date = b""
_cached_line = b""


def http_date(now: float | None = None) -> bytes:
    """The IMF-fixdate for ``now`` (default: the current time), formatted once per second."""
    global _cached_second, _cached_date, _cached_line
    second = int(time.time() if now is None else now)
    if second != _cached_second:
        t = time.gmtime(second)
        _cached_date = b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
            _DAYS[t.tm_wday],
            t.tm_mday,
            _MONTHS[t.tm_mon - 1],
            t.tm_year,
            t.tm_hour,
            t.tm_min,
            t.tm_sec,
        )
        _cached_line = b"Date: " + _cached_date + b"\r\n"
        _cached_second = second
    return _cached_date


def date_line(now: float | None = None) -> bytes:
    """``Date: ...\\r\\n`` for ``now``."""
    http_date(now)
    return _cached_line


_STATUS_LINES: dict[tuple[bytes, int], bytes] = {}


def status_line(version: bytes, code: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` (built once per version and code)."""
    line = _STATUS_LINES.get((version, code))
    if line is None:
        phrase = _PHRASES.get(code) or RESPONSES.get(code, b"Unknown Status")
        line = b"%s %d %s\r\n" % (version, code, phrase)
        if len(_STATUS_LINES) < 512:
            _STATUS_LINES[(version, code)] = line
    return line
