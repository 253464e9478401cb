"""The HTTP/1.1 client connection for the upstream leg: one request at a time, the response
parsed by httptools (llhttp, in C), the request written in one ``write``.

It is a drop-in for the subset of ``twisted.web._newclient.HTTP11ClientProtocol`` the pool and
the client use: ``request(UpstreamRequest) -> Deferred[UpstreamResponse]``, the ``state`` attribute
(``QUIESCENT`` when reusable), the quiescent callback, and the same failure types
(``RequestNotSent``, ``ResponseNeverReceived``, ``ResponseFailed`` with a ``ParseError`` for
garbage), so the retry rule of ``client.py`` keeps its meaning. What it saves per request:
Twisted's line-by-line Python parser, the per-response pause/resume of the transport, several
Deferred hops, and twisted.web's ``Headers`` both ways (the request's header block is built and
checked once, when the `UpstreamRequest` is made; the response's fields stay the list the parser
produced, ``raw_headers``, and ``headers`` is only built if someone asks for it).

Limits against a misbehaving upstream: a response head (status line, headers, interim 1xx
responses) or a chunked trailer section larger than ``MAX_HEAD_BYTES`` is a protocol error
(llhttp itself has no size limit and httptools buffers a header value until it ends); trailers
are read and dropped, never attached to the next response; and, once the user has set
``clock`` and ``body_timeout``, a body that makes no progress for that long (while its reader
is not pausing it) fails with an ``UpstreamTimeout`` and the connection is aborted.

Reuse (RFC 9112 6.3, 9.3): a connection goes back to the pool only once the parser has returned
from the read that completed its response, and only if nothing followed that response in the
read (a second message, a body longer than its Content-Length, a 204 or 304 with a body): such
bytes can only be a broken or hostile upstream, and handed to the next request they would
answer it. Then the connection is aborted instead. A 101 (or any upgrade) answer, a response
with no request outstanding, and bytes on an idle connection are protocol errors: the
connection is aborted and the request fails with ``ResponseFailed(ParseError)`` (the proxy
answers 502), never an unhandled exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

import httptools
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from trackingproxy.internals.twisted_private import (
    ParseError,
    ProxyProducer,
    RequestNotSent,
    ResponseFailed,
    ResponseNeverReceived,
    ensure_valid_method,
    ensure_valid_uri,
)
from trackingproxy.upstream.errors import UpstreamTimeout

log = Logger(namespace="trackingproxy.upstream")

MAX_HEAD_BYTES: Final = 64 * 1024

QUIESCENT = "QUIESCENT"
WAITING = "WAITING"
CONNECTION_LOST = "CONNECTION_LOST"

_HTTP11 = (b"HTTP", 1, 1)


_DONE = Failure(ResponseDone())  # shared: making a Failure per response is not free
# RFC 9110 5.6.2 tchar: what a field name may hold (bytes.translate deletes them; left over: bad).
_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class UpstreamRequest:
    """One request as it goes on the wire, built and checked once (a retry sends it again).

    ``headers`` are sent as given, in order, names as spelled (they must include Host; framing
    is ours: no Connection, Content-Length or Transfer-Encoding). Raises ``ValueError`` for a
    method, target, field name or value that cannot go on the wire unchanged: a name that is not
    an RFC 9110 token, or CR, LF or NUL anywhere (so nothing can split the request).
    """

    __slots__ = ("method", "persistent", "uri", "wire")

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | None,
        persistent: bool = True,
    ) -> None:
        self.method: bytes = ensure_valid_method(method)
        self.uri: bytes = ensure_valid_uri(uri)
        self.persistent = persistent
        lines = [method, b" ", uri, b" HTTP/1.1\r\n"]
        names = []
        for name, value in headers:
            names.append(name)
            lines += (name, b": ", value, b"\r\n")
        if not persistent:
            lines.append(b"Connection: close\r\n")
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        head = b"".join(lines)
        line_ends = 2 + len(names) + (not persistent) + (body is not None)
        if (
            head.count(b"\n") != line_ends
            or head.count(b"\r") != line_ends
            or b"\x00" in head
            or not all(names)
            or b"".join(names).translate(None, _TCHAR)
        ):
            raise ValueError("a header field name is not a token, or a field holds CR, LF or NUL")
        self.wire = head if body is None else head + body


class _HeadDone(Exception):
    """Raised from the parser callback to end a HEAD response at its headers."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep


class _Surplus(Exception):
    """Raised from the parser callback when a message begins after a complete response."""


class _Refused(Exception):
    """Raised from a parser callback: the response is a protocol error (``message``)."""

    def __init__(self, message: str) -> None:
        self.message = message


@implementer(IResponse)
class UpstreamResponse:
    """The response handed to the proxy: status, header fields (``raw_headers``: (name, value)
    pairs as the upstream sent them, in order), and the body on ``deliverBody``."""

    previousResponse = None

    def __init__(
        self,
        code: int,
        phrase: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        length: int | object,
        transport: ProxyProducer,
        request: UpstreamRequest,
    ) -> None:
        self.version = _HTTP11
        self.code = code
        self.phrase = phrase
        self.raw_headers = raw_headers
        self.length = length
        self.request = request
        self._transport = transport
        self._protocol: Protocol | None = None
        self._buffer: list[bytes] = []
        self._end: Failure | None = None
        self._headers: Headers | None = None

    @property
    def connection_transport(self) -> Any:
        """The upstream connection's transport while the body is being read, else None."""
        return self._transport.proxied

    @property
    def headers(self) -> Headers:
        """``raw_headers`` as twisted.web's ``Headers`` (IResponse), made on first use."""
        if self._headers is None:
            self._headers = Headers()
            for name, value in self.raw_headers:
                self._headers.addRawHeader(name, value)
        return self._headers

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body of this response is already being delivered")
        self._protocol = protocol
        protocol.makeConnection(self._transport)
        for chunk in self._buffer:
            protocol.dataReceived(chunk)
        self._buffer = []
        if self._end is not None:
            self._transport.stopProxying()
            protocol.connectionLost(self._end)

    def _body(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._buffer.append(data)

    def _finish(self, reason: Failure) -> None:
        if self._end is not None:
            return
        self._end = reason
        if self._protocol is not None:
            self._transport.stopProxying()
            self._protocol.connectionLost(reason)


class _BodyProducer(ProxyProducer):
    """The transport as the body reader sees it; pausing it also suspends the body timeout."""

    def __init__(self, transport: Any, owner: HTTP11ClientConnection) -> None:
        super().__init__(transport)
        self._owner = owner

    def pauseProducing(self) -> None:
        if self.proxied is not None:
            self.proxied.pauseProducing()
            self._owner._body_paused(True)

    def resumeProducing(self) -> None:
        if self.proxied is not None:
            self.proxied.resumeProducing()
            self._owner._body_paused(False)


class HTTP11ClientConnection(Protocol):
    """One persistent upstream connection; see the module docstring."""

    def __init__(self, quiescentCallback: Callable[[Any], None] = lambda _: None) -> None:
        self._quiescent = quiescentCallback
        self.state = QUIESCENT
        self._parser = httptools.HttpResponseParser(self)
        self._request: UpstreamRequest | None = None
        self._result: Deferred[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._header_list: list[tuple[bytes, bytes]] = []
        self._phrase = b""
        self._received = False
        self._unparsed = 0  # bytes fed since the parser last produced headers or body
        self._interim = 0  # interim (1xx) heads of the current response
        self._head_bytes = bytearray()  # what was read of a HEAD's answer, until its head ends
        self._completed: UpstreamResponse | None = None  # complete, in the read being parsed
        self._keep = False  # ... and its connection may be reused
        self._surplus = False  # ... and bytes followed it in that read
        # Set by the user before a request: with both, a stalled body fails after body_timeout.
        self.clock: IReactorTime | None = None
        self.body_timeout: float | None = None
        self._body_timer: IDelayedCall | None = None
        self._paused = False

    # -- sending --------------------------------------------------------------------------
    def request(self, request: UpstreamRequest) -> Deferred[UpstreamResponse]:
        transport = self.transport
        if self.state != QUIESCENT or transport is None:
            return fail(RequestNotSent())
        self.state = WAITING
        self._request = request
        self._received = False
        self._unparsed = 0
        self._interim = 0
        self._head_bytes = bytearray()
        self._surplus = False
        self._paused = False
        self._result = Deferred(self._cancel)
        transport.write(request.wire)
        return self._result

    def _cancel(self, _: Deferred[UpstreamResponse]) -> None:
        self._result = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- receiving ------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.state != WAITING:
            # Bytes nobody asked for (an idle connection): the connection is unusable.
            self.state = CONNECTION_LOST
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._received = True
        self._unparsed += len(data)
        request = self._request
        if request is not None and request.method == b"HEAD" and self._response is None:
            self._head_bytes += data  # bounded: a head over MAX_HEAD_BYTES is refused below
        error: str | None = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            stop = e.__context__
            if isinstance(stop, _HeadDone):
                self._parser = httptools.HttpResponseParser(self)
                self._message_done(stop.keep and self._head_ends_read())
            elif isinstance(stop, _Surplus):
                pass  # a message after a complete response: _settle aborts the connection
            elif isinstance(stop, _Refused):
                error = stop.message
            else:
                log.failure("upstream response callback failed", Failure(stop))
                error = "the response could not be handled"
        except httptools.HttpParserUpgrade:
            error = "a 101 (protocol switch) or upgrade answer to a request that asked for none"
        except httptools.HttpParserError as e:
            if self._completed is None:
                error = str(e)
            else:
                self._surplus = True  # garbage after a complete response
        if error is not None:
            self._completed = None
            self._protocol_error(error)
            return
        if self._completed is not None:
            self._settle()
            return
        if self.state != WAITING:
            return
        if self._unparsed > MAX_HEAD_BYTES:
            what = "header block" if self._response is None else "trailer section"
            self._protocol_error(f"the response {what} is larger than {MAX_HEAD_BYTES} bytes")
        elif self._response is not None:
            self._arm_body_timer()

    def _head_ends_read(self) -> bool:
        """Whether the answer to a HEAD ended exactly where the bytes read so far end: then
        nothing follows it. (The parser stops at a HEAD answer's head and cannot say where.)
        Each head, interim ones included, ends at its first empty line; CR and LF before a
        status line are skipped, as the parser skips them. A miscount only closes."""
        data, self._head_bytes = self._head_bytes, bytearray()
        end = 0
        for _ in range(self._interim + 1):
            while end < len(data) and data[end] in b"\r\n":
                end += 1
            found = data.find(b"\r\n\r\n", end)
            if found < 0:
                return False
            end = found + 4
        return end == len(data)

    def _protocol_error(self, message: str) -> None:
        reason = Failure(ResponseFailed([Failure(ParseError(message, b""))]))
        self._fail(reason)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        if self._completed is not None:
            self._surplus = True
            raise _Surplus()  # a second message in the same read: never reuse this connection

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is None:  # else a chunked trailer: dropped
            self._header_list.append((name, value))

    def on_headers_complete(self) -> None:
        self._unparsed = 0
        code = self._parser.get_status_code()
        header_list, self._header_list = self._header_list, []
        phrase, self._phrase = self._phrase, b""
        request = self._request
        if request is None:
            raise _Refused("a response arrived with no request outstanding")
        if 100 <= code < 200:
            self._interim += 1
            return  # an interim response: the real one follows
        length: int | object = UNKNOWN_LENGTH
        for name, value in header_list:
            if name.lower() == b"content-length" and value.isdigit():
                length = int(value)
        if code in (204, 304):
            length = 0
        # A HEAD response keeps the length its GET would have (RFC 9110 9.3.2); it has no
        # body either way: the message ends at its head (see _HeadDone).
        response = UpstreamResponse(
            code, phrase, header_list, length, _BodyProducer(self.transport, self), request
        )
        self._response = response
        result, self._result = self._result, None
        if result is not None:
            result.callback(response)
        if request.method == b"HEAD":
            # Asked now: the parser has the head's framing (a fresh one would not).
            raise _HeadDone(self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self._unparsed = 0
        if self._response is not None:
            self._response._body(body)

    def on_message_complete(self) -> None:
        self._unparsed = 0
        if self._response is None:
            return  # the end of an interim (1xx) response
        self._message_done(self._parser.should_keep_alive())

    def _message_done(self, keep_alive: bool) -> None:
        """The response is complete; what becomes of the connection is decided once the
        parser has returned (`_settle`), when it is known whether bytes followed it."""
        response, self._response = self._response, None
        self._stop_body_timer()
        request, self._request = self._request, None
        self._keep = keep_alive and request is not None and request.persistent
        self._completed = response

    def _settle(self) -> None:
        """After the read that completed a response: back to the pool only if nothing
        followed it in that read (RFC 9112 9.3: a response never answers a later request),
        and only now that the parser has returned; then the reader hears of the end."""
        response, self._completed = self._completed, None
        assert response is not None
        surplus, self._surplus = self._surplus, False
        if self._keep and not surplus:
            # Back to the pool before the reader hears of the end (as HTTP11ClientProtocol
            # does), and detached from this response so its reader cannot pause the next one.
            self.state = QUIESCENT
            response._transport.stopProxying()
            if self._paused:
                # Its reader paused the transport while the last bytes were delivered: a
                # pooled connection must read again, or the next answer would never arrive.
                self._paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self._quiescent(self)
        else:
            self.state = CONNECTION_LOST
            if self.transport is not None:
                if surplus:
                    self.transport.abortConnection()  # type: ignore[attr-defined]
                else:
                    self.transport.loseConnection()
        response._finish(_DONE)

    # -- body timeout ---------------------------------------------------------------------
    def _arm_body_timer(self) -> None:
        """(Re)start the body idle timer: called after each read that left a body unfinished."""
        timer, seconds, clock = self._body_timer, self.body_timeout, self.clock
        if self._paused or seconds is None or clock is None:
            return
        if timer is None or not timer.active():
            self._body_timer = clock.callLater(seconds, self._body_timed_out)
        else:
            timer.reset(seconds)

    def _stop_body_timer(self) -> None:
        timer, self._body_timer = self._body_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _body_paused(self, paused: bool) -> None:
        """The body's reader paused (back-pressure: not the upstream's fault) or resumed."""
        self._paused = paused
        if paused:
            self._stop_body_timer()
        elif self._response is not None:
            self._arm_body_timer()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self._response is None or self.state != WAITING:
            return
        seconds = self.body_timeout
        error = UpstreamTimeout(f"no response body bytes from the upstream for {seconds:g} s")
        self._fail(Failure(ResponseFailed([Failure(error)])))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- failure --------------------------------------------------------------------------
    def _fail(self, reason: Failure) -> None:
        self._stop_body_timer()
        result, self._result = self._result, None
        if result is not None:
            result.errback(reason)
        response, self._response = self._response, None
        if response is not None:
            response._finish(reason)
        self.state = CONNECTION_LOST

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_body_timer()
        if self.state == WAITING:
            if self._result is not None:
                error = ResponseFailed if self._received else ResponseNeverReceived
                self._fail(Failure(error([reason])))
            elif self._response is not None:
                response = self._response
                self._response = None
                if response.length is UNKNOWN_LENGTH and not any(
                    name.lower() == b"transfer-encoding" for name, _ in response.raw_headers
                ):
                    response._finish(Failure(PotentialDataLoss()))  # read until close: done
                else:
                    response._finish(Failure(ResponseFailed([reason])))
        self.state = CONNECTION_LOST
