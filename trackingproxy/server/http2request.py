"""One HTTP/2 request (a stream on the HTTP/2 server connection) and the writer of its answer.

Like the HTTP/1.1 request (`trackingproxy.server.http1request`), the answer's headers are kept
until the first body bytes (or the end), so an upstream that fails before its body still lets the
proxy answer 502/504. When the length is known, the last DATA frame carries END_STREAM: a pixel or a
redirect leaves as one HEADERS and one DATA frame, in one write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trackingproxy.server.request import DONE, NEW, STARTED, ServerRequest
from trackingproxy.server.wire import http_date

if TYPE_CHECKING:
    from trackingproxy.server.http2 import H2ServerBase

_STATUS = {code: b"%d" % code for code in range(100, 600)}


def _head(code: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``:status`` and the answer's fields, names lower case (HTTP/2 requires it)."""
    head = [(b":status", _STATUS.get(code) or b"%d" % code)]
    head += [(name.lower(), value) for name, value in headers]
    return head


class H2Request(ServerRequest):
    """A complete request received on one stream (see
    `trackingproxy.server.exchange.ClientExchange`)."""

    __slots__ = (
        "_ended",
        "_head",
        "_length",
        "_no_body",
        "body_parts",
        "body_size",
        "dispatched",
        "remote_ended",
        "stream_id",
    )
    _conn: H2ServerBase

    def __init__(
        self,
        conn: H2ServerBase,
        stream_id: int,
        method: bytes,
        uri: bytes,
        headers: list[tuple[bytes, bytes]],
        started: float,
    ) -> None:
        super().__init__(conn, method, uri, b"HTTP/2", headers, started)
        self.stream_id = stream_id
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.dispatched = False
        self.remote_ended = False
        self._head: list[tuple[bytes, bytes]] | None = None
        self._length: int | None = None
        self._no_body = False
        self._ended = False  # END_STREAM has been sent

    def body(self) -> bytes:
        return b"".join(self.body_parts)

    @property
    def answer_sent(self) -> bool:
        """END_STREAM has been handed to the connection."""
        return self._ended

    # -- the answer -----------------------------------------------------------------------
    def respond(self, code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self._state != NEW:
            return
        self.code = code
        head = _head(code, headers)
        head.append((b"content-length", b"%d" % len(body)))
        head.append((b"date", http_date()))
        if self.method == b"HEAD":
            body = b""
        self.sent = len(body)
        self._ended = True
        self._conn.send(self, head, body, True)
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
        head = _head(code, headers)
        no_body = self.method == b"HEAD" or code in (204, 304) or code < 200
        if length is not None and code >= 200 and code not in (204, 304):
            # Not for 204 (RFC 9110 8.6), nor 304, whose length would be the 200's.
            head.append((b"content-length", b"%d" % length))
        if add_date:
            head.append((b"date", http_date()))
        self._head = head
        self._length = None if no_body else length
        self._no_body = no_body

    def write(self, data: bytes) -> None:
        if self._state != STARTED or self._no_body or not data:
            return
        self.sent += len(data)
        head, self._head = self._head, None
        if self._length is not None and self.sent >= self._length:
            self._ended = self._no_body = True  # all of it: this DATA frame ends the stream
        self._conn.send(self, head, data, self._ended)

    def finish(self) -> None:
        if self._state != STARTED:
            return
        self._state = DONE
        head, self._head = self._head, None
        if not self._ended:
            self._ended = True
            self._conn.send(self, head, b"", True)
        self._done()

    def close_after(self) -> None:
        pass  # an HTTP/2 connection outlives its streams

    def abort(self) -> None:
        if self._state == DONE:
            return
        self._conn.reset(self)
        self.connection_lost()

    def register_producer(self, producer: Any) -> None:
        if self._state != DONE:
            self._conn.register_producer(self, producer)

    def unregister_producer(self) -> None:
        self._conn.unregister_producer(self)
