"""A raw HTTP/2 client (the ``h2`` library over TLS with ALPN h2) that sends exactly what a test
asks, including what a well-behaved client never would: connection-specific headers, bodies that
disagree with content-length, foreign ``:authority`` values, odd ``:path`` values.

Blocking; tests run it in a thread (``deferToThread``) while the proxy runs in the reactor.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
from attrs import define, field

Header = tuple[str, str]


@define
class StreamOutcome:
    """What became of one stream: a response status, a reset, a GOAWAY, or nothing."""

    status: int | None = None
    reset: int | None = None  # RST_STREAM error code
    goaway: int | None = None  # GOAWAY error code (the connection ended)
    body: bytes = b""
    ended: bool = False

    def describe(self) -> str:
        if self.status is not None:
            return f"{self.status}"
        if self.reset is not None:
            return f"RST_STREAM({self.reset})"
        if self.goaway is not None:
            return f"GOAWAY({self.goaway})"
        return "no answer"


@define
class Request:
    headers: Sequence[Header]
    body: bytes = b""
    outcome: StreamOutcome = field(factory=StreamOutcome)


def exchange(
    port: int,
    server_name: str,
    ca_file: str,
    requests: Sequence[Request],
    timeout: float = 5.0,
) -> list[StreamOutcome]:
    """Send ``requests`` as streams 1, 3, 5... of one HTTP/2 connection; wait for each outcome."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock = ctx.wrap_socket(raw, server_hostname=server_name)
    try:
        if sock.selected_alpn_protocol() != "h2":
            raise AssertionError(f"ALPN chose {sock.selected_alpn_protocol()!r}, not h2")
        config = h2.config.H2Configuration(
            client_side=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        streams: dict[int, StreamOutcome] = {}
        for request in requests:
            sid = conn.get_next_available_stream_id()
            streams[sid] = request.outcome
            conn.send_headers(sid, list(request.headers), end_stream=not request.body)
            if request.body:
                conn.send_data(sid, request.body, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
            s.ended or s.reset is not None or s.goaway is not None for s in streams.values()
        ):
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not data:
                for s in streams.values():
                    if not s.ended and s.reset is None and s.goaway is None:
                        s.goaway = -1  # closed without GOAWAY
                break
            for event in conn.receive_data(data):
                _apply(event, streams, conn)
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
        return [r.outcome for r in requests]
    finally:
        sock.close()


def _apply(
    event: h2.events.Event, streams: dict[int, StreamOutcome], conn: h2.connection.H2Connection
) -> None:
    sid = getattr(event, "stream_id", None)
    outcome = streams.get(sid) if sid is not None else None
    if isinstance(event, h2.events.ResponseReceived) and outcome is not None:
        for name, value in event.headers:
            if name in (b":status", ":status"):
                outcome.status = int(value)
    elif isinstance(event, h2.events.DataReceived) and outcome is not None:
        outcome.body += event.data
        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    elif isinstance(event, h2.events.StreamEnded) and outcome is not None:
        outcome.ended = True
    elif isinstance(event, h2.events.StreamReset) and outcome is not None:
        outcome.reset = int(event.error_code)
    elif isinstance(event, h2.events.ConnectionTerminated):
        last = event.last_stream_id or 0
        for stream_id, s in streams.items():
            if (stream_id > last or not s.ended) and not s.ended and s.reset is None:
                s.goaway = int(event.error_code)
