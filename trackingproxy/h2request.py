"""One HTTP/2 request (a stream on the lean HTTP/2 server connection) and the writer of its answer.

Like the HTTP/1.1 request (`trackingproxy.h1request`), the answer's headers are kept until the
first body bytes (or the end), so an upstream that fails before its body still lets the proxy
answer 502/504. When the length is known, the last DATA frame carries END_STREAM: a pixel or a
redirect leaves as one HEADERS and one DATA frame, in one write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from trackingproxy.exchange import http_date

if TYPE_CHECKING:
    from trackingproxy.h2server import H2ServerBase

NEW, STARTED, DONE = 0, 1, 2
_STATUS = {code: b"%d" % code for code in range(100, 600)}


class H2Request:
    """A complete request received on one stream (see `trackingproxy.exchange.ClientExchange`)."""

    __slots__ = (
        "_conn",
        "_ended",
        "_finished",
        "_head",
        "_length",
        "_lost_callback",
        "_no_body",
        "_state",
        "body_parts",
        "body_size",
        "clientproto",
        "code",
        "dispatched",
        "headers",
        "method",
        "remote_ended",
        "sent",
        "stream_id",
        "tp_client",
        "tp_host",
        "tp_started",
        "tp_too_large",
        "tp_upstream_error",
        "uri",
    )

    def __init__(
        self,
        conn: H2ServerBase,
        stream_id: int,
        method: bytes,
        uri: bytes,
        headers: list[tuple[bytes, bytes]],
        started: float,
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.method = method
        self.uri = uri
        self.clientproto = b"HTTP/2"
        self.headers = headers
        self.tp_started = started
        self.tp_host = "-"
        self.tp_client: str | None = None
        self.tp_upstream_error: str | None = None
        self.tp_too_large = False
        self.code = 200
        self.sent = 0
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.dispatched = False
        self.remote_ended = False
        self._state = NEW
        self._head: list[tuple[bytes, bytes]] | None = None
        self._length: int | None = None
        self._no_body = False
        self._ended = False  # END_STREAM has been sent
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
        return b"".join(self.body_parts)

    def peer_host(self) -> str:
        return self._conn.peer_host()

    def sni(self) -> str | None:
        return self._conn.sni()

    @property
    def done(self) -> bool:
        return self._state == DONE

    @property
    def answer_sent(self) -> bool:
        """END_STREAM has been handed to the connection."""
        return self._ended

    # -- the answer -----------------------------------------------------------------------
    def respond(self, code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self._state != NEW:
            return
        self.code = code
        head = [(b":status", _STATUS.get(code) or b"%d" % code)]
        head += [(name.lower(), value) for name, value in headers]
        head.append((b"content-length", b"%d" % len(body)))
        head.append((b"date", http_date()))
        if self.method == b"HEAD":
            body = b""
        self.sent = len(body)
        self._state = DONE
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
        head = [(b":status", _STATUS.get(code) or b"%d" % code)]
        head += [(name.lower(), value) for name, value in headers]
        no_body = self.method == b"HEAD" or code in (204, 304) or code < 200
        if length is not None and code != 204 and code >= 200:
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

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._lost_callback = callback

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the answer is finished, fails if the stream is reset first."""
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
        """The stream was reset, or the connection closed, before the answer was finished."""
        if self._state == DONE:
            return
        self._state = DONE
        callback, self._lost_callback = self._lost_callback, None
        if callback is not None:
            callback()
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.errback(Failure(ConnectionDone("the client went away")))
