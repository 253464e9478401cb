"""What the upstream fault tests share: the proxy in front of a `FaultyUpstream` named by DNS,
a raw HTTP/1.1 client that reports exactly what reached it (status, bytes, who closed), and
the leak counters (open file descriptors, pooled connections).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IResolver
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.certs import issue, make_ca, write_pair
from tests.harness import DOMAIN, DOMAIN2
from trackingproxy.config import config_from_options
from trackingproxy.logs.access import AccessLog
from trackingproxy.options import Options
from trackingproxy.service import TrackingProxyService, build_service, build_upstream
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.pool import ConnectionPool


def open_fds() -> int:
    """File descriptors open in this process (the proxy, its upstream and the test's servers)."""
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> dict[str, str]:
    """What each open file descriptor is (for the message when a count differs)."""
    table = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used is gone
            table[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return table


@inlineCallbacks
def poll_until(done: Callable[[], bool], timeout: float = 5.0, what: str = "the condition") -> Any:
    """Fire once `done()` holds (checked every 20 ms of real time); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        yield deferLater(_global_reactor, 0.02, lambda: None)


@define
class Answer:
    """What one raw client saw: the status (None: no response head), headers, body bytes,
    whether the body is complete by its Content-Length, whether the server closed the
    connection, and how long it took."""

    status: int | None
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool
    closed_by_server: bool
    seconds: float

    @property
    def outcome(self) -> str:
        if self.status is None:
            return "connection closed, no response" if self.closed_by_server else "hang"
        if self.complete:
            return str(self.status)
        cut = "cut" if self.closed_by_server else "hang"
        return f"{self.status} headers, then {cut} after {len(self.body)} body bytes"


class RawClient(Protocol):
    """A raw client connection (the suite's one): ``data`` holds all it received; once the
    connection is over ``ended`` is True and ``closed`` fires."""

    def __init__(self) -> None:
        self.data = b""
        self.ended = False
        self.closed: Deferred[None] = Deferred()
        self.aborted_by_us = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = True
        self.closed.callback(None)


@inlineCallbacks
def fetch(port: int, path: str, wait: float = 8.0, host: str = DOMAIN) -> Any:
    """GET `path` over plain HTTP/1.1 with `Connection: close`; an `Answer`, never an error."""
    started = time.monotonic()
    proto = RawClient()
    endpoint = TCP4ClientEndpoint(_global_reactor, "127.0.0.1", port)
    yield connectProtocol(endpoint, proto)
    assert proto.transport is not None
    proto.transport.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    timer = _global_reactor.callLater(wait, _give_up, proto)
    yield proto.closed
    if timer.active():
        timer.cancel()
    return _parse(proto.data, not proto.aborted_by_us, time.monotonic() - started)


def _give_up(proto: RawClient) -> None:
    proto.aborted_by_us = True
    assert proto.transport is not None
    proto.transport.abortConnection()  # type: ignore[attr-defined]


def _parse(data: bytes, closed_by_server: bool, seconds: float) -> Answer:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 "):
        return Answer(None, {}, b"", False, closed_by_server, seconds)
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get(b"content-length")
    complete = length is not None and len(body) == int(length)
    if length is None and b"chunked" in headers.get(b"transfer-encoding", b""):
        complete = body.endswith(b"0\r\n\r\n")
    return Answer(status, headers, body, complete, closed_by_server, seconds)


@define
class FaultProxy:
    """The running proxy and handles on its upstream side."""

    service: TrackingProxyService
    upstream: UpstreamClient
    http_port: int
    log_lines: list[str] = field(factory=list)

    @property
    def pool(self) -> ConnectionPool:
        pool: ConnectionPool = self.upstream._pool  # type: ignore[assignment]
        return pool

    def stop(self) -> Deferred[None]:
        return maybeDeferred(self.service.stopService)


def start_fault_proxy(
    tmp: Path, upstream_url: str, ca_file: str, names: IResolver, *extra: str
) -> FaultProxy:
    """The real proxy (as `twistd trackingproxy` builds it) with `names` as its DNS client."""
    ca = make_ca()
    cert, key = write_pair(issue(ca, DOMAIN, DOMAIN2), tmp, "proxy")
    args = [
        "--domain", DOMAIN, "--domain", DOMAIN2,
        "--upstream", upstream_url, "--upstream-ca-bundle", ca_file,
        "--http-port", "tcp:0:interface=127.0.0.1", "--https-port", "tcp:0:interface=127.0.0.1",
        "--admin-port", "tcp:0:interface=127.0.0.1", "--no-acme",
        "--cert", str(cert), "--key", str(key), *extra,
    ]  # fmt: skip
    opts = Options(environ={})
    opts.parseOptions(args)
    config = config_from_options(opts, datetime.datetime.now(datetime.UTC))
    upstream = build_upstream(config, _global_reactor, names)
    lines: list[str] = []
    log = AccessLog(config.log_format, config.log_paths, lines.append)
    service = build_service(config, _global_reactor, access_log=log, upstream=upstream)
    service.startService()
    http_port = 0
    for child in service:
        port = getattr(child, "port", None)
        if port is not None and getattr(child, "option", "") == "--http-port":
            http_port = port.getHost().port
    return FaultProxy(service, upstream, http_port, lines)


__all__ = ["Answer", "FaultProxy", "RawClient", "fd_table", "fetch", "open_fds", "poll_until", "start_fault_proxy"]
