"""Differential tests of both HTTP/1.1 legs against an independent parser, ``h11``.

Hypothesis generates byte streams (pipelined, chunked with trailers, odd and hostile framings)
and splits them into reads at random points. The same bytes go to the proxy's parser and to
``h11``:

- Client leg (`trackingproxy.server.http1`): every request the proxy hands to its handler must
  be, in order, a request ``h11`` reads from the same bytes (same method, target, fields and
  body); the proxy may refuse earlier than ``h11`` (it is stricter), never later, and never
  reads one message as two or hands on a request ``h11`` does not see.
- Upstream leg (`trackingproxy.upstream.http1`): the response the client delivers is the first
  one ``h11`` reads (status, fields, body); the connection goes back to the pool only when
  ``h11`` finds exactly that response and nothing after it (but empty lines, which carry
  nothing and which llhttp skips, as RFC 9112 2.2 lets a recipient), with keep-alive allowed.

Bounded for the suite; ``TP_PROPERTY_SCALE=N`` multiplies the examples (``make soak``).
"""

from __future__ import annotations

import os
from typing import Any

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tests.server.test_http1 import _connect, _Server
from tests.upstream_standin import Collect, memory_upstream

SCALE = max(1, int(os.environ.get("TP_PROPERTY_SCALE", "1")))
HOST = b"click.example.com"


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (as reads arrive)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(data[last:p])
        last = p
    parts.append(data[last:])
    return [p for p in parts if p]


# -- generated requests ---------------------------------------------------------------------
_token = st.sampled_from([b"x-a", b"X-B", b"accept", b"user-agent", b"cookie", b"x-tok"])
_value = st.sampled_from([b"1", b"a b", b"", b"  spaced  ", b"\tx", b"a,b", b"\x80\xff", b"x" * 300])
FRAMINGS = (
    "none", "cl", "chunked", "chunked-trailers", "cl-te", "two-cl", "te-gzip",
    "bad-cl", "chunk-ext", "bare-lf", "obs-fold", "space-colon", "bad-chunk",
)  # fmt: skip
_path = st.sampled_from([b"/q/a", b"/f/b?x=1&y=2", b"/f/c%2F", b"/q/d#frag", b"*", b"/"])


@st.composite
def _request(draw: Any) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT"]))
    target = draw(_path)
    lines = [method + b" " + target + b" HTTP/1.1"]
    fields = draw(st.lists(st.tuples(_token, _value), max_size=4))
    if draw(st.booleans()) or not fields:
        lines.append(b"Host: " + HOST)
    lines += [n + b": " + v for n, v in fields]
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(FRAMINGS))
    tail = b""
    if framing == "cl" or (framing == "none" and body and method == b"POST"):
        lines.append(b"Content-Length: %d" % len(body))
        tail = body
    elif framing in ("chunked", "chunked-trailers", "chunk-ext", "bad-chunk"):
        lines.append(b"Transfer-Encoding: chunked")
        ext = b";name=value" if framing == "chunk-ext" else b""
        size = b"zz" if framing == "bad-chunk" else b"%x" % len(body)
        tail = (size + ext + b"\r\n" + body + b"\r\n" if body else b"") + b"0\r\n"
        if framing == "chunked-trailers":
            tail += b"X-Forwarded-For: 6.6.6.6\r\nAuthorization: x\r\n"
        tail += b"\r\n"
    elif framing == "cl-te":
        lines += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
        tail = body
    elif framing == "two-cl":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
        tail = body
    elif framing == "te-gzip":
        lines.append(b"Transfer-Encoding: gzip, chunked")
        tail = b"0\r\n\r\n"
    elif framing == "bad-cl":
        lines.append(b"Content-Length: +%d" % len(body))
        tail = body
    elif framing == "obs-fold":
        lines.append(b"X-Fold: a\r\n  b")
    elif framing == "space-colon":
        lines.append(b"X-Space : a")
    sep = b"\n" if framing == "bare-lf" else b"\r\n"
    return sep.join(lines) + sep + sep + tail


def _h11_requests(data: bytes) -> list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]:
    """What h11 reads as a server from ``data``: (method, target, fields, body) per complete
    request, up to the first error."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    conn.receive_data(data)
    conn.receive_data(b"")
    found = []
    current: list[Any] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            if event is h11.PAUSED and conn.our_state is h11.SEND_RESPONSE:
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
                continue
            break
        if isinstance(event, h11.Request):
            fields = [(bytes(n).lower(), bytes(v)) for n, v in event.headers.raw_items()]
            current = [bytes(event.method), bytes(event.target), fields, b""]
        elif isinstance(event, h11.Data):
            current[3] += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            found.append(tuple(current))
    return found  # type: ignore[return-value]


@_settings(300)
@given(st.lists(_request(), min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=6))
def test_client_leg_reads_what_h11_reads(requests: list[bytes], cuts: list[int]) -> None:
    """Each request the proxy handles is the next one h11 reads from the same bytes; the proxy
    may stop earlier (refusal), never later, never splits or merges messages."""
    data = b"".join(requests)
    server = _Server()
    conn, transport = _connect(server)
    for part in _split(data, cuts):
        conn.dataReceived(part)
    expected = _h11_requests(data)
    handled = server.handled
    assert len(handled) <= len(expected), (data, [r.uri for r in handled], expected)
    for got, (method, target, fields, body) in zip(handled, expected, strict=False):
        assert got.method == method
        assert got.uri == target.partition(b"#")[0]
        assert got.body() == body
        head_fields = [(n, v.strip(b" \t")) for n, v in fields]
        assert [(n, v.strip(b" \t")) for n, v in got.headers] == head_fields[: len(got.headers)]
        assert len(got.headers) == len(head_fields)  # trailers never added


# -- generated upstream responses ----------------------------------------------------------
@st.composite
def _response(draw: Any) -> tuple[bytes, bytes]:
    """(request method, the upstream's bytes for it)."""
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD"]))
    code = draw(st.sampled_from([200, 302, 204, 304, 404, 101, 100]))
    body = draw(st.binary(max_size=30))
    lines = [b"HTTP/1.1 %d X" % code, b"Server: up"]
    framing = draw(st.sampled_from(["cl", "chunked", "close", "cl-short", "cl-long"]))
    interim = draw(st.booleans())
    payload = body
    if framing == "cl":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "cl-short":
        lines.append(b"Content-Length: %d" % (len(body) + 5))
    elif framing == "cl-long":
        lines.append(b"Content-Length: %d" % max(0, len(body) - 3))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\nX-T: 1\r\n\r\n"
    if draw(st.booleans()):
        lines.append(b"Connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if interim:
        head = b"HTTP/1.1 100 Continue\r\n\r\n" + head
    after = draw(
        st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL", b"junk", b"\r\n"])
    )
    return method, head + payload + after




def _h11_response(method: bytes, data: bytes, closed: bool) -> tuple[Any, bool]:
    """h11's reading, as the client of ``method``: ((status, fields, body, complete) or None,
    whether exactly one complete response and nothing else came with keep-alive allowed)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if closed:
        conn.receive_data(b"")
    status, fields, body, complete = None, [], b"", False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break
        if isinstance(event, h11.InformationalResponse):
            continue  # an interim 1xx: the real response follows
        if isinstance(event, h11.Response):
            status = event.status_code
            fields = [(bytes(n).lower(), bytes(v)) for n, v in event.headers.raw_items()]
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            complete = True
            break
        else:
            break
    reusable = (
        complete
        and conn.their_state is h11.DONE
        and conn.our_state is h11.DONE
        and not bytes(conn.trailing_data[0]).strip(b"\r\n")  # a stray CRLF carries nothing
    )
    return (None if status is None else (status, fields, body, complete)), reusable


@_settings(400)
@given(_response(), st.lists(st.integers(0, 10_000), max_size=5))
def test_upstream_leg_reads_what_h11_reads(exchange: tuple[bytes, bytes], cuts: list[int]) -> None:
    """The delivered response is h11's first response; the connection is pooled only when
    h11 sees that one response, complete, with nothing after it and keep-alive allowed."""
    method, data = exchange
    upstream = memory_upstream(Clock())
    connector, pool, client = upstream.connector, upstream.pool, upstream.client
    d = client.request(method, b"/", [(b"host", HOST)], None)
    wire = connector.last.succeed()
    results: list[Any] = []
    d.addBoth(results.append)
    body = Collect()
    for part in _split(data, cuts):
        if wire.connected:
            wire.protocol.dataReceived(part)
        delivered = results and not isinstance(results[0], Failure)
        if delivered and body.reason is None and not getattr(results[0], "_protocol", None):
            results[0].deliverBody(body)
    pooled = pool.idle_count == 1
    if wire.connected and not pooled:
        wire.loseConnection()  # the upstream closes: a read-until-close body ends here
    expected, reusable = _h11_response(method, data, closed=not pooled)
    if results and not isinstance(results[0], Failure):
        response = results[0]
        if not getattr(response, "_protocol", None):
            response.deliverBody(body)
        assert expected is not None, data
        status, fields, h11_body, _ = expected
        assert response.code == status
        assert [(n.lower(), v) for n, v in response.raw_headers] == fields
        if method != b"HEAD":
            assert h11_body.startswith(body.data) or body.data == h11_body, (data, body.data)
    if pooled:
        assert reusable, data
