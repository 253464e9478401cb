"""The pure-Python HTTP/2 engine: the ``h2`` state machine driven directly (used when libnghttp2
cannot be loaded, or with ``--http2-engine python``). See `trackingproxy.server.http2`.

``h2`` validates every inbound header block; a malformed one ends the connection with GOAWAY,
as RFC 9113 8.1.1 allows (field names with control characters among them). It lets control
characters other than CR, LF and NUL through in field values: a stream carrying one is reset
with PROTOCOL_ERROR here, as libnghttp2 does. Received DATA is acknowledged as it is buffered;
answer bytes beyond the peer's window wait for WINDOW_UPDATE.

While the transport is paused (its buffer full) the output stays in h2's buffer. The ACKs of
PING and SETTINGS and the RST_STREAMs queued meanwhile are counted: past ``MAX_HELD_ACKS`` (as
libnghttp2's default) the client is flooding (RFC 9113 10.5): GOAWAY(ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import h2.events as ev
import h2.exceptions
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.logger import Logger

from trackingproxy.server.http2 import (
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    H2ServerBase,
    Owner,
    Server,
    Unsent,
)
from trackingproxy.server.http2request import H2Request
from trackingproxy.server.limits import MAX_HEADER_LIST, MAX_STREAMS

log = Logger(namespace="trackingproxy.server.http2_python")

MAX_HELD_ACKS = 1000  # ACKs and RST_STREAMs queued while paused before it is a flood
# Control characters a field value may not hold (RFC 9110 5.5; HTAB is allowed).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Inbound blocks are validated; what we send is built here, already lower case and clean.
_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=True,
    normalize_inbound_headers=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)
_SETTINGS = {
    SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
}


class PythonH2Connection(H2ServerBase):
    """One HTTP/2 client connection on the ``h2`` state machine."""

    def __init__(self, server: Server, owner: Owner) -> None:
        super().__init__(server, owner)
        self._h2 = H2Connection(_CONFIG)
        self._h2.local_settings = Settings(client=False, initial_values=_SETTINGS)
        self._receiving = False  # events are being handled: one flush at the end
        self._held_acks = 0  # ACKs and RST_STREAMs queued while paused (flood guard)

    def _start(self) -> None:
        self._h2.initiate_connection()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._receiving = True
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has queued a GOAWAY naming the error: send it, then close.
            log.debug("HTTP/2 protocol error from {peer}: {error}", peer=self.peer_host(), error=e)
            self._receiving = False
            self._send()
            self._close()
            return
        try:
            for event in events:
                handler = _EVENTS.get(type(event))
                if handler is not None:
                    handler(self, event)
                    if self._closed:
                        break  # GOAWAY sent (flood, rapid reset): the rest is not taken
        finally:
            self._receiving = False
        self._flush()

    def _flush(self) -> None:
        if not self._paused:  # else it waits in h2's buffer (see the module docstring)
            self._held_acks = 0
            self._send()
        self._after_flush()

    def _send(self) -> None:
        data = self._h2.data_to_send()
        if data and not self._closed and self._write is not None:
            self._write(data)

    def _held_ack(self) -> None:
        """h2 queued an ACK or a RST_STREAM: while paused, count it (flood guard)."""
        if self._paused:
            self._held_acks += 1
            if self._held_acks > MAX_HELD_ACKS and not self._closed:
                log.info("HTTP/2 client {peer} sends more than it reads", peer=self.peer_host())
                self._goaway(ENHANCE_YOUR_CALM)

    def _goaway_notice(self) -> None:
        # A raw frame: h2's close_connection() would also refuse the rest of this connection.
        frame = GoAwayFrame(0, last_stream_id=self._h2.highest_inbound_stream_id, error_code=0)
        if not self._closed and self._write is not None:
            self._write(self._h2.data_to_send() + frame.serialize())

    def _goaway(self, code: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.close_connection(error_code=code)
        self._send()  # even while paused: what waits before it is bounded (_held_ack)
        self._close()

    def _refuse(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, error_code=code)
        self._held_ack()
        if not self._receiving:
            self._flush()

    def _blocked(self, stream_id: int) -> bool:
        return stream_id in self._queued

    # -- events ---------------------------------------------------------------------------
    def _on_request(self, event: ev.RequestReceived) -> None:
        pseudo: dict[bytes, bytes] = {}
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        stream_id: int = event.stream_id
        for name, value in event.headers or ():  # bytes: header_encoding is None
            if _CTL.search(value) is not None:
                self._refuse(stream_id, PROTOCOL_ERROR)  # as libnghttp2 does
                return
            if name[:1] == b":":
                pseudo[name] = value
                continue
            size += len(name) + len(value)
            headers.append((name, value))
        self._new_request(stream_id, pseudo, headers, size, event.stream_ended is not None)

    def _on_data(self, event: ev.DataReceived) -> None:
        stream_id: int = event.stream_id
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
        self._body_chunk(stream_id, event.data or b"")

    def _on_end(self, event: ev.StreamEnded) -> None:
        self._request_ended(event.stream_id)

    def _on_reset(self, event: ev.StreamReset) -> None:
        self._stream_reset(event.stream_id)

    def _on_window(self, event: ev.WindowUpdated) -> None:
        if event.stream_id:
            self._push(event.stream_id)
        else:
            for stream_id in list(self._queued):
                self._push(stream_id)

    def _on_control(self, event: ev.PingReceived | ev.RemoteSettingsChanged) -> None:
        self._held_ack()  # h2 queued the ACK

    def _on_terminated(self, event: ev.ConnectionTerminated) -> None:
        self._close()  # the client's GOAWAY: it reads nothing more from this connection

    # -- sending --------------------------------------------------------------------------
    def send(
        self, request: H2Request, head: list[tuple[bytes, bytes]] | None, data: bytes, end: bool
    ) -> None:
        if self._closed:
            return
        stream_id = request.stream_id
        self._progress += 1
        try:
            if head is not None:
                self._h2.send_headers(stream_id, head, end_stream=end and not data)
            queued = self._queued.get(stream_id)
            if queued is not None:
                queued.data += data
                queued.end = end
            elif data:
                self._send_data(stream_id, data, end)
            elif end and head is None:
                self._h2.end_stream(stream_id)
        except h2.exceptions.H2Error:  # the stream was reset meanwhile
            return
        if not self._receiving:
            self._flush()

    def _send_data(self, stream_id: int, data: bytes, end: bool, paused: bool = False) -> None:
        """Send what the windows allow; queue the rest until WINDOW_UPDATE (and pause the
        stream's producer meanwhile, unless it is ``paused`` already)."""
        h2c = self._h2
        window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
        if len(data) <= window:
            h2c.send_data(stream_id, data, end_stream=end)
            return
        while data and window > 0:
            chunk, data = data[:window], data[window:]
            h2c.send_data(stream_id, chunk, end_stream=end and not data)
            window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
        if data:
            self._queued[stream_id] = Unsent(bytearray(data), end)
            producer = self._producers.get(stream_id)
            if producer is not None and not paused:
                producer.pauseProducing()

    def _push(self, stream_id: int) -> None:
        queued = self._queued.pop(stream_id, None)
        if queued is None:
            return
        try:
            self._send_data(stream_id, bytes(queued.data), queued.end, paused=True)
        except h2.exceptions.H2Error:
            return
        self._progress += 1  # answer bytes leave: the stream is alive
        if stream_id not in self._queued:
            self._unblocked(stream_id)


_EVENTS: dict[type, Callable[[PythonH2Connection, Any], None]] = {
    ev.RequestReceived: PythonH2Connection._on_request,
    ev.DataReceived: PythonH2Connection._on_data,
    ev.StreamEnded: PythonH2Connection._on_end,
    ev.StreamReset: PythonH2Connection._on_reset,
    ev.WindowUpdated: PythonH2Connection._on_window,
    ev.PingReceived: PythonH2Connection._on_control,
    ev.RemoteSettingsChanged: PythonH2Connection._on_control,
    ev.ConnectionTerminated: PythonH2Connection._on_terminated,
}
