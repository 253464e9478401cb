"""The HTTP/2 server connection: what both engines share, and the choice between them.

Two engines speak the protocol: `trackingproxy.server.http2_nghttp2` (libnghttp2 through cffi, the
default when the library loads) and `trackingproxy.server.http2_python` (the pure-Python ``h2``
state machine). Both validate every inbound header block (connection-specific fields, pseudo-header
rules, CR/LF/NUL, content-length against the DATA received) and hand each complete request to the
request handler as an `trackingproxy.server.http2request.H2Request`. What this module adds on top:

- Streams that are not tracking requests are refused with RST_STREAM(PROTOCOL_ERROR): CONNECT,
  a :path that is neither origin-form nor ``*`` or holds a space or a control character (both
  engines reset those, never answer 400: libnghttp2 refuses them before we see them), a Host
  that differs from :authority. More than ``MAX_HEADERS`` fields or ``MAX_HEADER_BYTES`` of
  names and values: 431. Bodies over ``MAX_BODY``: 413 at once, then RST_STREAM(NO_ERROR).
- At most ``MAX_STREAMS`` concurrent streams (SETTINGS), and a stream's upstream work counts
  until it ends, even once the client reset the stream: while ``MAX_STREAMS`` of them run, new
  streams are refused with RST_STREAM(REFUSED_STREAM).
- Rapid reset (CVE-2023-44487): the client's resets of streams whose answer was not complete
  are compared with the streams it opened that were not answered at once. Streams refused or
  answered before the handler returned (a 421 for an unknown host, 400, 413, 431) cost no
  upstream work and are left out, so they cannot dilute the ratio: more than
  ``RAPID_RESET_MIN`` such resets, over half of those streams: GOAWAY(ENHANCE_YOUR_CALM).
- Back-pressure: the connection is its transport's push producer for its whole life. When the
  transport's buffer is full (the client does not read what it is sent) the connection stops
  reading from the client and stops moving the engine's output to the transport, and the
  upstream bodies being copied are paused; so are those of a stream whose flow-control window
  is exhausted. The engine keeps what is held back and bounds it: answers to PING, SETTINGS
  and refused streams piling up while paused are a flood (RFC 9113 10.5): GOAWAY
  (ENHANCE_YOUR_CALM) and close. A registered producer holds TLS's loseConnection back, so
  every close (`_close`) unregisters first.
- A request body must arrive within the body timeout of its headers (slow-body attack): else
  the stream is answered 408 and reset (checked every half body timeout).
- The connection is closed (GOAWAY) when no stream has moved for the idle timeout (request
  headers or data received, answer bytes sent; PING and other control frames do not count):
  one timer per connection. A closed connection whose client takes none of what is left to
  send is aborted after the idle timeout.
- Shutdown (`shutdown_notice`, at SIGTERM): the streams taken are answered; then GOAWAY(NO_ERROR)
  naming the last one, so the client sends new requests elsewhere, and the connection closes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from attrs import define
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.server.backpressure import ConnectionProducer
from trackingproxy.server.exchange import ClientExchange
from trackingproxy.server.http2request import H2Request
from trackingproxy.server.limits import (
    MAX_BODY,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_STREAMS,
    RAPID_RESET_MIN,
)
from trackingproxy.server.registry import SHUTDOWN, ShutdownNotice

log = Logger(namespace="trackingproxy.server.http2")

__all__ = ["H2ServerBase", "Owner", "Server", "Unsent"]

# Error codes (RFC 9113 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x2, 0xB
REFUSED_STREAM = 0x7
# A :path with a space or a control character: not a request target (RFC 9112 3.2).
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
TEXT = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]


class Server(Protocol):
    """What a connection needs from its listener (``trackingproxy.server.listener.ProxySite``)."""

    clock: IReactorTime
    idle_timeout: float
    body_timeout: float

    def handle(self, exchange: ClientExchange) -> None: ...
    def request_done(self, exchange: ClientExchange) -> None: ...


class Owner(Protocol):
    """The TLS connection this HTTP/2 connection runs on (its HTTP/1.1 protocol object)."""

    def peer_host(self) -> str: ...
    def sni(self) -> str | None: ...


@define(slots=True)
class Unsent:
    """A stream's answer bytes the engine could not send yet (flow control), and whether
    END_STREAM follows them."""

    data: bytearray
    end: bool


class H2ServerBase(TwistedProtocol):
    """One HTTP/2 client connection (see the module docstring); the engine subclasses fill in
    the protocol. Also the IPushProducer the TLS transport pauses when its buffer is full
    (through `ConnectionProducer`, registered from connectionMade until `_close`)."""

    def __init__(self, server: Server, owner: Owner) -> None:
        self._server = server
        self._owner = owner
        self._clock = server.clock
        self._streams: dict[int, H2Request] = {}
        self._producers: dict[int, Any] = {}
        # stream -> [answer bytes the engine has not sent yet (flow control), END_STREAM after]
        self._queued: dict[int, Unsent] = {}
        self._paused = False  # the transport's buffer is full: not reading, output held
        self._pusher: ConnectionProducer | None = None  # registered with the transport
        self._closed = False
        self._opened = 0  # streams taken (not refused at once)
        self._local = 0  # of those, answered before the handler returned
        self._resets = 0  # of those, reset by the client before their answer was complete
        self._progress = 0
        self._progress_seen = -1
        self._progress_at = 0.0
        self._timer: IDelayedCall | None = None
        self._write: Callable[[bytes], None] | None = None
        self._draining = False  # shutdown_notice: GOAWAY sent, close when the streams are done
        self._upstream_busy = 0  # streams (reset ones too) whose upstream work has not ended

    # -- what an engine provides ----------------------------------------------------------
    def _start(self) -> None:
        """Queue the server's connection preface (SETTINGS)."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Write what the engine has queued."""
        raise NotImplementedError

    def _goaway(self, code: int) -> None:
        """Send GOAWAY with ``code`` and close."""
        raise NotImplementedError

    def _refuse(self, stream_id: int, code: int) -> None:
        """RST_STREAM ``stream_id`` with ``code``."""
        raise NotImplementedError

    def _blocked(self, stream_id: int) -> bool:
        """Whether the stream has answer bytes waiting for flow-control window."""
        raise NotImplementedError

    def send(
        self, request: H2Request, head: list[tuple[bytes, bytes]] | None, data: bytes, end: bool
    ) -> None:
        """Send the answer's head (if given), ``data``, and END_STREAM if ``end``."""
        raise NotImplementedError

    def _goaway_notice(self) -> None:
        """Send GOAWAY(NO_ERROR) with the last stream taken."""
        raise NotImplementedError

    # -- shutdown -------------------------------------------------------------------------
    def shutdown_notice(self, notice: ShutdownNotice = SHUTDOWN) -> None:
        """The server is stopping: once no stream is in flight, GOAWAY(NO_ERROR) naming the
        last stream taken, then close. Not earlier: a GOAWAY with streams in flight is legal,
        but some clients (the Python ``h2`` library) stop reading at it and lose the answers."""
        if self._draining or self._closed:
            return
        self._draining = True
        self._flush()  # the engines' flush ends in _after_flush

    def _after_flush(self) -> None:
        """Called by the engines' ``_flush`` once queued bytes are written."""
        if self._draining and not self._streams and not self._closed:
            self._draining = False
            self._goaway_notice()
            self._close()

    # -- connection -----------------------------------------------------------------------
    def connectionMade(self) -> None:
        transport: Any = self.transport
        self._write = transport.write
        self._pusher = ConnectionProducer(self)
        transport.registerProducer(self._pusher, True)  # for good: see _close
        self._start()
        self._flush()
        self._progress_at = self._clock.seconds()
        self._progress_seen = self._progress  # the preface is not activity to count later
        self._arm(min(self._server.idle_timeout, self._server.body_timeout / 2))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._pusher is not None:
            self._pusher.conn = None  # the transport is gone: nothing to unregister from
            self._pusher = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        streams, self._streams = self._streams, {}
        self._producers.clear()
        self._queued.clear()
        for request in streams.values():
            request.connection_lost()

    def peer_host(self) -> str:
        return self._owner.peer_host()

    def sni(self) -> str | None:
        return self._owner.sni()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport: Any = self.transport
        pusher, self._pusher = self._pusher, None
        if pusher is not None:
            pusher.conn = None
            transport.unregisterProducer()  # else TLS holds the loseConnection back for good
        # What is buffered still leaves; a client that takes none of it (one that never
        # reads) does not keep the connection: aborted after the idle timeout (_tick).
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._arm(self._server.idle_timeout)
        transport.loseConnection()

    # -- requests -------------------------------------------------------------------------
    def _new_request(
        self,
        stream_id: int,
        pseudo: dict[bytes, bytes],
        headers: list[tuple[bytes, bytes]],
        size: int,
        ended: bool,
    ) -> H2Request | None:
        """A request whose header block is complete, or None if its stream was refused. Too
        large ones are answered at once (431, 413)."""
        self._progress += 1
        if self._upstream_busy >= MAX_STREAMS:
            # Reset streams whose upstream work still runs count: no new work until some ends.
            self._refuse(stream_id, REFUSED_STREAM)
            return None
        method = pseudo.get(b":method")
        path = pseudo.get(b":path")
        authority = pseudo.get(b":authority")
        host = None
        for name, value in headers:
            if name == b"host":
                if host is not None:
                    host = b""  # two Host fields: malformed
                    break
                host = value
        origin_form = (
            path is not None
            and (path[:1] == b"/" or path == b"*")
            and _BAD_TARGET.search(path) is None
        )
        if (
            method is None
            or method == b"CONNECT"
            or not origin_form
            or host == b""
            or (authority is not None and host is not None and host != authority)
        ):
            self._refuse(stream_id, PROTOCOL_ERROR)
            return None
        if authority is not None and host is None:
            headers.insert(0, (b"host", authority))
        assert path is not None
        self._opened += 1
        request = H2Request(self, stream_id, method, path, headers, self._clock.seconds())
        request.remote_ended = ended
        self._streams[stream_id] = request
        if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
            request.dispatched = True
            self._local += 1
            request.respond(431, TEXT, b"431 Request Header Fields Too Large\n")
            return None
        length = request.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            self._too_large(request)
            return None
        return request

    def _body_chunk(self, stream_id: int, data: bytes) -> None:
        request = self._streams.get(stream_id)
        if request is None or request.dispatched:
            return
        self._progress += 1
        request.body_size += len(data)
        if request.body_size > MAX_BODY:
            self._too_large(request)
            return
        request.body_parts.append(data)

    def _request_ended(self, stream_id: int) -> None:
        request = self._streams.get(stream_id)
        if request is not None:
            self._progress += 1
            request.remote_ended = True
            if not request.dispatched:
                self._dispatch(request)

    def _stream_reset(self, stream_id: int) -> None:
        """The client reset the stream (or it closed) before its answer was complete. Rapid
        reset: such resets against the streams taken that were not answered at once (see the
        module docstring); locally answered streams cannot dilute it."""
        request = self._forget(stream_id)
        if request is None or request.done:
            return
        self._resets += 1
        request.connection_lost()
        if self._resets > RAPID_RESET_MIN and self._resets * 2 > self._opened - self._local:
            log.info("HTTP/2 client {peer} resets most of its streams", peer=self.peer_host())
            self._goaway(ENHANCE_YOUR_CALM)

    def _dispatch(self, request: H2Request) -> None:
        request.dispatched = True
        try:
            self._server.handle(request)
        except Exception:
            log.failure("request handler failed for {uri!r}", uri=request.uri)
            if request.code == 200 and not request.done:
                request.respond(500, TEXT, b"500 Internal Server Error\n")
            else:
                request.abort()
        if request.done:
            self._local += 1  # answered at once (421, 413...): no upstream work to reset

    def _too_large(self, request: H2Request) -> None:
        request.too_large = True
        request.body_parts = []
        self._dispatch(request)  # the handler answers 413 at once

    def _forget(self, stream_id: int) -> H2Request | None:
        self._queued.pop(stream_id, None)
        self._producers.pop(stream_id, None)
        return self._streams.pop(stream_id, None)

    def request_done(self, request: H2Request) -> None:
        """Called by the request when its answer is complete (possibly still being sent)."""
        self._server.request_done(request)
        if request.stream_id not in self._queued:
            self._retire(request)  # else once the queued bytes have left (_unblocked)
        if self._draining and not self._streams:
            self._flush()  # then closes (see _after_flush)

    def _retire(self, request: H2Request) -> None:
        """The answer has left: forget the stream; RST_STREAM(NO_ERROR) if the client is
        still sending (an early answer such as 413), RFC 9113 8.1."""
        self._forget(request.stream_id)
        if not request.remote_ended:
            self._refuse(request.stream_id, NO_ERROR)

    def reset(self, request: H2Request) -> None:
        """Give up on an answer: RST_STREAM(INTERNAL_ERROR)."""
        self._forget(request.stream_id)
        self._refuse(request.stream_id, INTERNAL_ERROR)

    def upstream_changed(self, delta: int) -> None:
        """A stream's upstream work began (+1) or ended (-1); it counts until it ends, even
        after the client reset the stream."""
        self._upstream_busy += delta

    # -- back-pressure --------------------------------------------------------------------
    def register_producer(self, request: H2Request, producer: Any) -> None:
        """A stream's upstream body: paused with the transport (the connection is its
        producer) or while the stream's window is exhausted."""
        self._producers[request.stream_id] = producer
        if self._paused or self._blocked(request.stream_id):
            producer.pauseProducing()

    def unregister_producer(self, request: H2Request) -> None:
        self._producers.pop(request.stream_id, None)

    def _unblocked(self, stream_id: int) -> None:
        """The stream's queued bytes have left: resume its producer or retire it."""
        request = self._streams.get(stream_id)
        if request is not None and request.done:
            self._retire(request)
            return
        producer = self._producers.get(stream_id)
        if producer is not None and not self._paused:
            producer.resumeProducing()

    def pauseProducing(self) -> None:
        """The transport's buffer is full: read nothing more from this client (its requests
        and control frames only add answers it does not take), hold the engine's output back
        (`_flush`), pause the upstream bodies."""
        if self._paused or self._closed:
            return
        self._paused = True
        self.transport.pauseProducing()  # type: ignore[union-attr]
        for producer in list(self._producers.values()):
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused or self._closed:
            return
        self._paused = False
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self._flush()  # what the engine held back
        if self._paused or self._closed:
            return  # that filled the buffer again
        for stream_id, producer in list(self._producers.items()):
            if not self._blocked(stream_id):
                producer.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the transport is closing: connectionLost follows

    # -- idle timeout ---------------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        self._timer = self._clock.callLater(max(delay, 0.01), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            # Closed (_close) an idle timeout ago and the client has not taken the rest.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        now = self._clock.seconds()
        if self._progress != self._progress_seen:
            self._progress_seen = self._progress
            self._progress_at = now
        left = self._progress_at + self._server.idle_timeout - now
        if left <= 0:
            self._goaway(NO_ERROR)
            return
        body_timeout = self._server.body_timeout
        for request in list(self._streams.values()):
            if not request.dispatched and now - request.started >= body_timeout:
                # Its body did not arrive in time (slow-body attack): 408, then RST_STREAM.
                request.dispatched = True
                self._local += 1
                request.respond(408, TEXT, b"408 Request Timeout: the body came too slowly\n")
        self._arm(min(left, self._server.idle_timeout / 4, body_timeout / 2))
