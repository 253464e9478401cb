"""One HTTP/1.1 request on the lean server connection, and the writer of its answer.

The answer's status line and headers are kept until the first body bytes (or the end), so a
small answer leaves in one ``transport.write``. Bodies of unknown length are sent chunked to
HTTP/1.1 clients and delimited by closing the connection for HTTP/1.0 clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from trackingproxy.exchange import date_line, status_line

if TYPE_CHECKING:
    from trackingproxy.http1server import HTTP1Connection

NEW, STARTED, DONE = 0, 1, 2
_CLOSE = b"Connection: close\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"


class H1Request:
    """A parsed request (see `trackingproxy.exchange.ClientExchange`)."""

    __slots__ = (
        "_body",
        "_chunked",
        "_conn",
        "_finished",
        "_head",
        "_lost_callback",
        "_no_body",
        "_state",
        "clientproto",
        "code",
        "headers",
        "method",
        "persistent",
        "sent",
        "tp_client",
        "tp_host",
        "tp_started",
        "tp_too_large",
        "tp_upstream_error",
        "uri",
    )

    def __init__(
        self,
        conn: HTTP1Connection,
        method: bytes,
        uri: bytes,
        clientproto: bytes,
        headers: list[tuple[bytes, bytes]],
        persistent: bool,
        started: float,
    ) -> None:
        self._conn = conn
        self.method = method
        self.uri = uri
        self.clientproto = clientproto
        self.headers = headers
        self.persistent = persistent
        self.tp_started = started
        self.tp_host = "-"
        self.tp_client: str | None = None
        self.tp_upstream_error: str | None = None
        self.tp_too_large = False
        self.code = 200
        self.sent = 0
        self._body = b""
        self._state = NEW
        self._head = b""
        self._chunked = False
        self._no_body = False
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

    def body(self) -> bytes:
        return self._body

    def set_body(self, body: bytes) -> None:
        self._body = body

    def peer_host(self) -> str:
        return self._conn.peer_host()

    def sni(self) -> str | None:
        return self._conn.sni()

    @property
    def done(self) -> bool:
        return self._state == DONE

    # -- the answer -----------------------------------------------------------------------
    def respond(self, code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self._state != NEW:
            return
        self.code = code
        parts = [status_line(self.clientproto, code)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(date_line())
        if not self.persistent:
            parts.append(_CLOSE)
        parts.append(b"\r\n")
        if self.method != b"HEAD":
            parts.append(body)
            self.sent = len(body)
        self._conn.send(b"".join(parts))
        self._done()

    def start(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        add_date: bool,
    ) -> None:
        if self._state != NEW:
            return
        self._state = STARTED
        self.code = code
        parts = [self.clientproto, b" %d " % code, phrase, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        no_body = self.method == b"HEAD" or code in (204, 304) or code < 200
        if length is not None:
            if code != 204 and code >= 200:
                parts.append(b"Content-Length: %d\r\n" % length)
        elif not no_body:
            if self.clientproto == b"HTTP/1.1":
                parts.append(_CHUNKED)
                self._chunked = True
            else:
                self.persistent = False  # the end of the body is the end of the connection
        if add_date:
            parts.append(date_line())
        if not self.persistent:
            parts.append(_CLOSE)
        parts.append(b"\r\n")
        self._head = b"".join(parts)
        self._no_body = no_body

    def write(self, data: bytes) -> None:
        if self._state != STARTED or self._no_body or not data:
            return
        self.sent += len(data)
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self._head:
            data = self._head + data
            self._head = b""
        self._conn.send(data)

    def finish(self) -> None:
        if self._state != STARTED:
            return
        out = self._head
        self._head = b""
        if self._chunked:
            out += b"0\r\n\r\n"
        if out:
            self._conn.send(out)
        self._done()

    def close_after(self) -> None:
        self.persistent = False

    def abort(self) -> None:
        if self._state == DONE:
            return
        self.persistent = False
        self._conn.close()

    def register_producer(self, producer: Any) -> None:
        if self._state != DONE:
            self._conn.register_producer(producer)

    def unregister_producer(self) -> None:
        self._conn.unregister_producer()

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._lost_callback = callback

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the answer is finished, fails if the client goes away first."""
        if self._finished is None:
            self._finished = Deferred()
        return self._finished

    # -- the connection's side ------------------------------------------------------------
    def _done(self) -> None:
        self._state = DONE
        self._lost_callback = None  # it refers back to us: no cycle left for the collector
        self._conn.request_done(self)
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.callback(None)

    def connection_lost(self) -> None:
        """The client went away before the answer was finished."""
        if self._state == DONE:
            return
        self._state = DONE
        callback, self._lost_callback = self._lost_callback, None
        if callback is not None:
            callback()
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.errback(Failure(ConnectionDone("the client went away")))
