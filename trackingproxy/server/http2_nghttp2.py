"""The libnghttp2 HTTP/2 engine (the default): the protocol (framing, HPACK, stream states, flow
control, HTTP messaging rules) runs in C; Python sees one callback per header field, per body
chunk and per frame that matters. See `trackingproxy.server.http2` for what both engines share.

libnghttp2 checks every inbound header block (RFC 9113 8.2-8.3: pseudo-headers, connection-
specific fields, upper-case names, content-length against DATA) and resets a malformed stream
with PROTOCOL_ERROR; a field with characters no HTTP field may hold (control characters,
leading or trailing white space) resets its stream too, rather than being dropped silently, as
does a :path with a space or a control character. Its own limits stay on: a RST_STREAM rate
limit (rapid reset), at most 8 CONTINUATION frames, and at most 1000 ACKs and RST_STREAMs
queued: its output is taken (``nghttp2_session_mem_send``) only while the transport takes data,
so a client that sends PINGs or SETTINGS and reads nothing fills the library's queue, not ours,
and ``nghttp2_session_mem_recv`` fails with ``NGHTTP2_ERR_FLOODED``: GOAWAY(ENHANCE_YOUR_CALM).

Memory rules: the session is deleted in ``connectionLost`` (once the library has returned) and
every call into the library first checks it is still there; the cffi handle that lets the
callbacks (`trackingproxy.server.nghttp2`) find their connection lives exactly as long as the
session.
"""

from __future__ import annotations

from typing import Any

from attrs import Factory, define
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.server import nghttp2 as ng
from trackingproxy.server.http2 import (
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    H2ServerBase,
    Owner,
    Server,
    Unsent,
)
from trackingproxy.server.http2request import H2Request
from trackingproxy.server.limits import MAX_HEADER_BYTES, MAX_HEADER_LIST, MAX_STREAMS

log = Logger(namespace="trackingproxy.server.http2_nghttp2")

HIGH_WATER = 256 * 1024  # answer bytes queued on a stream before its producer is paused
_WRITE_CHUNK = 64 * 1024  # output written at a time: the transport may pause us in between
_HEADER_BYTES_CAP = 4 * MAX_HEADER_BYTES  # beyond this a header block is not even collected


# A header block being received: pseudo-header fields, the other fields, their size.
@define(slots=True)
class _Incoming:
    """A header block being received: its pseudo-header fields, the other fields, and the
    bytes of their names and values so far."""

    pseudo: dict[bytes, bytes] = Factory(dict)
    fields: list[tuple[bytes, bytes]] = Factory(list)
    size: int = 0


_settings: Any = None


def _bind() -> ng.Callbacks:
    """The bound library and its callbacks, and this server's SETTINGS, made once."""
    global _settings
    callbacks = ng.callbacks()
    if _settings is None:
        _settings = callbacks.ffi.new(
            "nghttp2_settings_entry[2]",
            [
                (ng.SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (ng.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            ],
        )
    return callbacks


class NativeH2Connection(H2ServerBase):
    """One HTTP/2 client connection on a libnghttp2 server session."""

    def __init__(self, server: Server, owner: Owner) -> None:
        super().__init__(server, owner)
        b = self._b = _bind()
        ffi, lib = b.ffi, b.lib
        self._handle: Any = ffi.new_handle(self)
        pp = ffi.new("nghttp2_session **")
        if lib.nghttp2_session_server_new2(pp, b.callbacks, self._handle, b.option) != 0:
            raise MemoryError("nghttp2_session_server_new2")
        self._session: Any = pp[0]
        self._out = ffi.new("const uint8_t **")
        self._incoming: dict[int, _Incoming] = {}
        self._ready: list[int] = []  # requests that ended while the input was processed
        self._drained: list[int] = []  # streams whose queued answer left in the last flush
        self._receiving = False  # inside nghttp2_session_mem_recv
        self._flushing = False  # inside nghttp2_session_mem_send
        self._lost = False  # connectionLost has run
        self._close_after_flush = False  # GOAWAY queued: send it even when paused, then close

    def _start(self) -> None:
        b = self._b
        b.lib.nghttp2_submit_settings(self._session, ng.FLAG_NONE, _settings, 2)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._lost = True
        self._incoming.clear()
        if not (self._receiving or self._flushing):
            self._delete()  # else: once the library has returned

    def _delete(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            self._b.lib.nghttp2_session_del(session)
        self._handle = None

    def dataReceived(self, data: bytes) -> None:
        session = self._session
        if self._closed or session is None or self._receiving:
            return
        self._receiving = True
        try:
            rv = self._b.lib.nghttp2_session_mem_recv(session, data, len(data))
        finally:
            self._receiving = False
        if self._connected_lost():
            return
        if rv < 0:
            if rv == ng.ERR_FLOODED:
                log.info("HTTP/2 client {peer} sends more than it reads", peer=self.peer_host())
            else:
                log.debug(
                    "HTTP/2 session error from {peer}: {error}",
                    peer=self.peer_host(),
                    error=self._b.ffi.string(self._b.lib.nghttp2_strerror(rv)).decode(),
                )
            self._goaway(ENHANCE_YOUR_CALM if rv == ng.ERR_FLOODED else PROTOCOL_ERROR)
            return
        ready, self._ready = self._ready, []
        if not self._close_after_flush:  # else GOAWAY (rapid reset): no new upstream work
            for stream_id in ready:
                self._request_ended(stream_id)
        self._flush()

    def _connected_lost(self) -> bool:
        """Whether the connection is gone (connectionLost may have run while the library was
        working: the session is deleted now)."""
        if self._lost:
            self._delete()
        return self._session is None

    def _flush(self) -> None:
        """Write what the library has queued, while the transport takes data (else the library
        keeps it, and counts it: its flood guard), or a GOAWAY before the close. Never while it
        is reading input or already writing (callbacks may ask for a flush: the running one
        picks their output up)."""
        session = self._session
        if session is None or self._receiving or self._flushing:
            return
        if self._paused and not self._close_after_flush:
            self._after_flush()
            return
        lib, ffi, out = self._b.lib, self._b.ffi, self._out
        chunks: list[bytes] = []
        size = n = 0
        self._flushing = True
        try:
            while True:
                n = lib.nghttp2_session_mem_send(session, out)
                if n <= 0:
                    break
                chunks.append(ffi.buffer(out[0], n)[:])
                size += n
                if size >= _WRITE_CHUNK:
                    self._write_out(chunks)  # the transport may pause us
                    chunks, size = [], 0
                    if self._closed or (self._paused and not self._close_after_flush):
                        break  # the rest waits in the library
        finally:
            self._flushing = False
        if self._connected_lost():
            return
        self._write_out(chunks)
        if n < 0:
            self._close()
            return
        if self._drained:
            drained, self._drained = self._drained, []
            for stream_id in drained:
                self._unblocked(stream_id)
        if self._close_after_flush or (
            self._session is not None
            and not (
                lib.nghttp2_session_want_read(session) or lib.nghttp2_session_want_write(session)
            )
        ):
            self._close()  # GOAWAY sent, or exchanged and every stream done
            return
        self._after_flush()

    def _write_out(self, chunks: list[bytes]) -> None:
        if chunks and not self._closed and self._write is not None:
            self._write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _goaway_notice(self) -> None:
        session = self._session
        if session is not None:
            lib = self._b.lib
            last = lib.nghttp2_session_get_last_proc_stream_id(session)
            lib.nghttp2_submit_goaway(session, ng.FLAG_NONE, last, ng.NO_ERROR, self._b.ffi.NULL, 0)
            self._close_after_flush = True  # sent even to a client that reads slowly
            self._flush()

    def _goaway(self, code: int) -> None:
        if self._session is not None:
            self._b.lib.nghttp2_session_terminate_session(self._session, code)
        # The flush sends it even while paused: what the library holds before it is bounded
        # (its flood guard; it sends no more DATA once terminating).
        self._close_after_flush = True
        if self._receiving or self._flushing:
            return  # the running flush sends it, then closes
        self._flush()
        self._close()

    def _refuse(self, stream_id: int, code: int) -> None:
        if self._session is not None:
            self._b.lib.nghttp2_submit_rst_stream(self._session, ng.FLAG_NONE, stream_id, code)
            if not self._receiving:
                self._flush()

    def _blocked(self, stream_id: int) -> bool:
        pending = self._queued.get(stream_id)
        return pending is not None and len(pending.data) > HIGH_WATER

    # -- sending --------------------------------------------------------------------------
    def send(
        self, request: H2Request, head: list[tuple[bytes, bytes]] | None, data: bytes, end: bool
    ) -> None:
        session = self._session
        if self._closed or session is None:
            return
        stream_id = request.stream_id
        self._progress += 1
        b = self._b
        if head is not None:
            ffi = b.ffi
            keep = [(ffi.from_buffer(n), ffi.from_buffer(v), len(n), len(v)) for n, v in head]
            nva = ffi.new("nghttp2_nv[]", [(n, v, ln, lv, 0) for n, v, ln, lv in keep])
            if end and not data:
                provider = ffi.NULL
            else:
                self._queued[stream_id] = Unsent(bytearray(data), end)
                provider = b.provider
            if b.lib.nghttp2_submit_response(session, stream_id, nva, len(keep), provider) != 0:
                self._queued.pop(stream_id, None)  # the stream is gone (reset meanwhile)
                return
            if len(data) > HIGH_WATER:
                producer = self._producers.get(stream_id)
                if producer is not None:
                    producer.pauseProducing()
        else:
            pending = self._queued.get(stream_id)
            if pending is None:
                return  # the stream is gone, or its end was sent already
            was_blocked = len(pending.data) > HIGH_WATER
            pending.data += data
            pending.end = end
            b.lib.nghttp2_session_resume_data(session, stream_id)
            if not was_blocked and len(pending.data) > HIGH_WATER:
                producer = self._producers.get(stream_id)
                if producer is not None:
                    producer.pauseProducing()
        if not self._receiving:
            self._flush()

    def on_read(self, stream_id: int, buf: Any, length: int, data_flags: Any) -> int:
        """The library asks for up to ``length`` answer bytes of ``stream_id``."""
        pending = self._queued.get(stream_id)
        if pending is None:
            data_flags[0] |= ng.DATA_FLAG_EOF
            return 0
        data = pending.data
        n = min(length, len(data))
        if n:
            self._progress += 1  # answer bytes leave: the stream is alive
            self._b.ffi.memmove(buf, data, n)
            was_blocked = len(data) > HIGH_WATER
            del data[:n]
            if was_blocked and len(data) <= HIGH_WATER:
                self._drained.append(stream_id)  # resume its producer after this flush
        if not data:
            if pending.end:
                data_flags[0] |= ng.DATA_FLAG_EOF
                del self._queued[stream_id]
                self._drained.append(stream_id)
            elif not n:
                return ng.ERR_DEFERRED
        return n

    # -- ng.SessionHandler: what the library's callbacks call ----------------------------
    def on_data_chunk(self, stream_id: int, data: bytes) -> None:
        self._body_chunk(stream_id, data)

    def on_begin_headers(self, stream_id: int) -> None:
        if stream_id not in self._streams:  # otherwise: trailers, ignored
            self._incoming[stream_id] = _Incoming()

    def on_header(self, stream_id: int, name: bytes, value: bytes) -> int:
        incoming = self._incoming.get(stream_id)
        if incoming is None:
            return 0
        if name[:1] == b":":
            incoming.pseudo[name] = value
            return 0
        incoming.size += len(name) + len(value)
        if incoming.size > _HEADER_BYTES_CAP:
            del self._incoming[stream_id]
            return ng.ERR_TEMPORAL_CALLBACK_FAILURE  # the library resets the stream
        incoming.fields.append((name, value))
        return 0

    def on_invalid_header(self, stream_id: int) -> int:
        self._incoming.pop(stream_id, None)
        if self._session is not None:
            self._b.lib.nghttp2_submit_rst_stream(
                self._session, ng.FLAG_NONE, stream_id, PROTOCOL_ERROR
            )
        return ng.ERR_TEMPORAL_CALLBACK_FAILURE

    def on_frame(self, kind: int, flags: int, stream_id: int) -> None:
        if kind == ng.HEADERS:
            incoming = self._incoming.pop(stream_id, None)
            if incoming is not None:
                pseudo, headers = incoming.pseudo, incoming.fields
                ended = bool(flags & ng.FLAG_END_STREAM)
                cookies = [v for n, v in headers if n == b"cookie"]
                if len(cookies) > 1:  # RFC 9113 8.2.3: one field for HTTP/1.1
                    headers = [(n, v) for n, v in headers if n != b"cookie"]
                    headers.append((b"cookie", b"; ".join(cookies)))
                request = self._new_request(stream_id, pseudo, headers, incoming.size, ended)
                if request is not None and ended:
                    self._ready.append(stream_id)
            elif flags & ng.FLAG_END_STREAM:  # trailers (ignored) end the request
                self._ready.append(stream_id)
        elif kind == ng.DATA and flags & ng.FLAG_END_STREAM:
            self._ready.append(stream_id)

    def on_stream_close(self, stream_id: int) -> None:
        self._incoming.pop(stream_id, None)
        request = self._streams.get(stream_id)
        if request is None:
            return
        if request.answer_sent:
            self._forget(stream_id)  # closed the normal way: both sides ended
        else:
            self._stream_reset(stream_id)
