"""One HTTP/1.1 request on the server connection, and the writer of its answer.

The answer's status line and headers are kept until the first body bytes (or the end), so a
small answer leaves in one ``transport.write``. Bodies of unknown length are sent chunked to
HTTP/1.1 clients and delimited by closing the connection for HTTP/1.0 clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trackingproxy.server.request import DONE, NEW, STARTED, ServerRequest
from trackingproxy.server.wire import date_line, status_line

if TYPE_CHECKING:
    from trackingproxy.server.http1 import HTTP1Connection

_CLOSE = b"Connection: close\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"


class H1Request(ServerRequest):
    """A parsed request (see `trackingproxy.server.exchange.ClientExchange`)."""

    __slots__ = ("_body", "_chunked", "_head", "_no_body", "persistent")
    _conn: HTTP1Connection

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
        super().__init__(conn, method, uri, clientproto, headers, started)
        self.persistent = persistent
        self._body = b""
        self._head = b""
        self._chunked = False
        self._no_body = False

    def body(self) -> bytes:
        return self._body

    def set_body(self, body: bytes) -> None:
        self._body = body

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
            # Not for 1xx, 204 (RFC 9110 8.6), nor 304, whose length would be the 200's.
            if code >= 200 and code not in (204, 304):
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
