"""A hostile upstream behind the whole proxy, pipelining clients in front (issue 12).

The real service tree (`build_service`: listener, HTTP/1.1 server, request handler, upstream
client, pool, HTTP/1.1 client) runs on a memory reactor; upstream connections are in-memory
transports whose bytes the test writes. Hypothesis picks, for every request, how the upstream
answers it: well framed, chunked with a trailer claiming another request's id, followed by a
complete response for another request, a 204 or 304 with a body, a body longer than its
Content-Length, a 101, an interim 100, garbage, a body delimited by the close. Each answer
names its request (``X-Id``, and the body), and every poison names another request.

Property: every answer a client receives is for the request it sent at that position, or the
proxy's own 502/504; never another request's; and no upstream connection is left pooled after
a response with bytes after it. (A traceback in the log fails it too: tests/conftest.py.)

Bounded for the suite; ``TP_PROPERTY_SCALE=N`` multiplies the examples (``make soak``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tests.hostile.memory import MemoryProxy, build_memory_proxy
from tests.upstream_standin import MemoryConnector, memory_upstream
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.pool import ConnectionPool

SCALE = max(1, int(os.environ.get("TP_PROPERTY_SCALE", "1")))
DOMAIN = "click.example.com"
KINDS = (
    "ok", "chunked-trailer", "then-another", "204-body", "304-body", "longer-than-length",
    "101", "interim", "garbage", "close-delimited", "split-head",
)  # fmt: skip
_REQUEST_LINE = re.compile(rb"(GET|HEAD) /f/(\d+) HTTP/1\.1\r\n")


def _poison(other: int) -> bytes:
    body = b"id=%d" % other
    return b"HTTP/1.1 200 OK\r\nX-Id: %d\r\nContent-Length: %d\r\n\r\n%s" % (other, len(body), body)


def _answer(kind: str, rid: int, other: int) -> list[bytes]:
    """The upstream's bytes for request ``rid`` (a list: the reads they arrive in)."""
    body = b"id=%d" % rid
    ok = b"HTTP/1.1 200 OK\r\nX-Id: %d\r\nContent-Length: %d\r\n\r\n%s" % (rid, len(body), body)
    if kind == "ok":
        return [ok]
    if kind == "chunked-trailer":
        return [
            b"HTTP/1.1 200 OK\r\nX-Id: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % rid
            + b"%x\r\n%s\r\n0\r\nX-Id: %d\r\n\r\n" % (len(body), body, other)
        ]
    if kind == "then-another":
        return [ok + _poison(other)]
    if kind in ("204-body", "304-body"):
        code = b"204 No Content" if kind == "204-body" else b"304 Not Modified"
        return [b"HTTP/1.1 %s\r\nX-Id: %d\r\n\r\n" % (code, rid) + _poison(other)]
    if kind == "longer-than-length":
        return [ok[: -len(body)] + body + _poison(other)]
    if kind == "101":
        return [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
                + _poison(other)]  # fmt: skip
    if kind == "interim":
        return [b"HTTP/1.1 100 Continue\r\n\r\n", ok]
    if kind == "garbage":
        return [b"\x16\x03\x01 not http at all " + _poison(other)]
    if kind == "close-delimited":
        return [b"HTTP/1.1 200 OK\r\nX-Id: %d\r\n\r\n%s" % (rid, body), b""]  # b"": close
    if kind == "split-head":
        return [ok[:7], ok[7:30], ok[30:]]
    raise AssertionError(kind)


class _Responses:
    """Parses what a client received: (status, X-Id, body) per complete response."""

    def __init__(self, data: bytes) -> None:
        self.found: list[tuple[int, bytes | None, bytes]] = []
        self._id: bytes | None = None
        self._body = b""
        self._parser = httptools.HttpResponseParser(self)
        self.error = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.error = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-id":
            self._id = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.found.append((self._parser.get_status_code(), self._id, self._body))
        self._id, self._body = None, b""


class _Swappable:
    """The proxy's upstream client, replaced by a fresh one (pool, connections) per example."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.connector = MemoryConnector()
        self.pool: ConnectionPool
        self.client: UpstreamClient
        self.fresh()

    def fresh(self) -> None:
        upstream = memory_upstream(self.reactor)
        self.connector, self.pool, self.client = upstream.connector, upstream.pool, upstream.client

    def request(self, *args: Any) -> Any:
        return self.client.request(*args)

    def abandon(self, response: Any) -> None:
        self.client.abandon(response)

    def close(self) -> Any:
        return self.client.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> MemoryProxy:
    return build_memory_proxy(
        tmp_path_factory.mktemp("hostile-upstream"), [[DOMAIN]], [DOMAIN], upstream=_Swappable
    )


def _serve(
    connector: MemoryConnector, plan: dict[int, tuple[str, int]], answered: dict[int, int]
) -> None:
    """Play the upstream until nothing is left to answer: connect what is connecting, answer
    each request written on a connection with the plan's bytes for its id (``answered``:
    attempt index -> requests answered on it so far)."""
    progress = True
    while progress:
        progress = False
        for index, attempt in enumerate(connector.attempts):
            if attempt.transport is None:
                attempt.succeed()
                progress = True
            wire = attempt.transport
            if wire is None or not wire.connected:
                continue
            requests = _REQUEST_LINE.findall(wire.value())
            done = answered.get(index, 0)
            if len(requests) <= done:
                continue
            answered[index] = done + 1
            progress = True
            rid = int(requests[done][1])
            kind, other = plan[rid]
            for part in _answer(kind, rid, other):
                if not wire.connected:
                    break
                if part == b"":
                    wire.loseConnection()
                else:
                    wire.protocol.dataReceived(part)


@st.composite
def _plans(draw: Any) -> tuple[list[int], dict[int, tuple[str, int]]]:
    clients = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))  # requests per client
    total = sum(clients)
    plan = {}
    for rid in range(total):
        others = [o for o in range(total) if o != rid] or [rid + 1000]
        plan[rid] = (draw(st.sampled_from(KINDS)), draw(st.sampled_from(others)))
    return clients, plan


@settings(
    max_examples=150 * SCALE,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(_plans(), st.booleans())
def test_no_answer_reaches_another_request(
    proxy: MemoryProxy,
    case: tuple[list[int], dict[int, tuple[str, int]]],
    split: bool,
) -> None:
    """Whatever the upstream sends, each client gets, in order, its own answers or 502/504;
    never another request's; no traceback; no connection kept after surplus bytes."""
    clients, plan = case
    upstream: _Swappable = proxy.upstream  # type: ignore[assignment]
    upstream.fresh()
    connector, pool = upstream.connector, upstream.pool
    answered: dict[int, int] = {}
    transports = []
    rid = 0
    for count in clients:
        conn = proxy.http.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 40000))
        conn.makeConnection(transport)
        ids = list(range(rid, rid + count))
        rid += count
        raw = b"".join(b"GET /f/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, DOMAIN.encode()) for i in ids)
        if split:
            for i in range(0, len(raw), 17):
                conn.dataReceived(raw[i : i + 17])
        else:
            conn.dataReceived(raw)
        transports.append((conn, transport, ids))
        _serve(connector, plan, answered)
    for _ in range(3):
        _serve(connector, plan, answered)
        proxy.reactor.advance(0)
    for _conn, transport, ids in transports:
        got = _Responses(transport.value())
        assert not got.error, transport.value()
        assert len(got.found) <= len(ids)
        for (status, xid, body), expected in zip(got.found, ids, strict=False):
            if status in (502, 504):
                assert xid is None
                continue
            assert xid == b"%d" % expected, (plan, transport.value())
            if body:
                assert body == b"id=%d" % expected
        if len(got.found) < len(ids):  # cut: only after an answer whose body was cut
            kinds = [plan[i][0] for i in ids[len(got.found) :]]
            assert kinds[0] in ("close-delimited", "garbage", "101"), (plan, transport.value())
    for conn in list(pool._idle):
        wire = conn.protocol.transport
        assert wire is not None and wire.connected
