"""The real proxy service tree, built by ``build_service`` on a ``MemoryReactorClock`` with a
recording upstream double, and driven byte by byte over in-memory transports.

Nothing listens on a socket: the HTTP site and the TLS factory are taken from the memory
reactor's listen calls, so a hypothesis example costs microseconds (plain HTTP) or one in-memory
TLS handshake (``tls_exchange``), and the parsing, routing and header handling that run are the
production ones (``site.py``, ``proxy.py``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trustme
from attrs import define, field
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from tests.certs import issue, make_ca, write_pair
from trackingproxy.config import config_from_options
from trackingproxy.logs.access import AccessLog
from trackingproxy.options import Options
from trackingproxy.proxy.challenges import ChallengeResponder
from trackingproxy.service import TrackingProxyService, build_service
from trackingproxy.upstream.http1 import UpstreamResponse


@define
class Forwarded:
    """One request as the upstream double received it from the proxy."""

    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | None

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@define
class RecordingUpstream:
    """An ``Upstream`` that records each request and never answers (the client side of the
    exchange is not what these tests look at)."""

    seen: list[Forwarded] = field(factory=list)
    pending: list[Deferred[UpstreamResponse]] = field(factory=list)

    def request(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> Deferred[UpstreamResponse]:
        self.seen.append(Forwarded(method, path, list(headers), body))
        d: Deferred[UpstreamResponse] = Deferred()
        self.pending.append(d)
        return d

    def abandon(self, response: UpstreamResponse) -> None:
        pass

    def close(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


@define(repr=False)
class MemoryProxy:
    service: TrackingProxyService
    reactor: MemoryReactorClock
    upstream: RecordingUpstream
    http: Any  # the HTTP listener's factory (a ProxySite)
    https: TLSMemoryBIOFactory
    ca: trustme.CA

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("MemoryProxy(...)")

    def http_exchange(self, raw: bytes, peer: str = "198.51.100.7") -> bytes:
        """Feed ``raw`` to a new HTTP connection from ``peer``; what the proxy wrote back."""
        proto = self.http.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        proto.makeConnection(transport)
        proto.dataReceived(raw)
        out = transport.value()
        proto.connectionLost(_DONE)
        return bytes(out)

    def tls_exchange(self, sni: str | None, raw: bytes) -> bytes:
        """A real TLS handshake in memory (server name ``sni``, or none), then ``raw``."""
        collect = _Collect()
        client_factory = Factory.forProtocol(lambda: collect)
        clock = Clock()
        client_tls = TLSMemoryBIOFactory(_NoVerify(sni), True, client_factory, clock=clock)
        addr = IPv4Address("TCP", "198.51.100.7", 40000)
        client, server, pump = connectedServerAndClient(
            lambda: self.https.buildProtocol(addr),
            lambda: client_tls.buildProtocol(addr),
            greet=False,
        )
        pump.flush()
        client.write(raw)
        for _ in range(4):  # TLS writes are coalesced until the clocks move
            clock.advance(0)
            self.reactor.advance(0)
            pump.flush()
        return collect.data


class _Collect(Protocol):
    data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@implementer(IOpenSSLClientConnectionCreator)
class _NoVerify:
    """A TLS client that sends ``sni`` (or no server name) and offers HTTP/1.1 only."""

    def __init__(self, sni: str | None) -> None:
        self._sni = sni
        self._ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._ctx.set_alpn_protos([b"http/1.1"])

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni.encode("idna"))
        conn.set_connect_state()
        return conn


class _Done(Exception):
    pass


from twisted.python.failure import Failure  # noqa: E402

_DONE = Failure(_Done("test over"))


def build_memory_proxy(
    tmp: Path,
    certificates: Sequence[Sequence[str]],
    domains: Sequence[str],
    *extra: str,
    challenges: ChallengeResponder | None = None,
    upstream: Any = None,
) -> MemoryProxy:
    """The service for ``domains``, one certificate per entry of ``certificates`` (its names);
    ``upstream``, if given, is a function of the memory reactor that makes the upstream client
    (default: a `RecordingUpstream`)."""
    ca = make_ca()
    args: list[str] = []
    for name in domains:
        args += ["--domain", name]
    for i, names in enumerate(certificates):
        cert, key = write_pair(issue(ca, *names), tmp, f"c{i}")
        args += ["--cert", str(cert), "--key", str(key)]
    args += [
        "--upstream",
        "https://127.0.0.1:9",
        "--http-port",
        "tcp:8080:interface=127.0.0.1",
        "--https-port",
        "tcp:8443:interface=127.0.0.1",
        "--admin-port",
        "none",
        "--access-log",
        "off",
        "--no-acme",
        *extra,
    ]
    opts = Options(environ={})
    opts.parseOptions(args)
    config = config_from_options(opts, datetime.datetime.now(datetime.UTC))
    reactor = MemoryReactorClock()
    if upstream is None:
        upstream = RecordingUpstream()
    elif callable(upstream):
        upstream = upstream(reactor)  # built on this reactor (its clock)
    service = build_service(
        config,
        reactor,
        upstream=upstream,  # type: ignore[arg-type]
        challenges=challenges,
        access_log=AccessLog(config.log_format, config.log_paths, write=None),
    )
    service.startService()
    factories = {port: factory for port, factory, _, _ in reactor.tcpServers}
    return MemoryProxy(service, reactor, upstream, factories[8080], factories[8443], ca)
