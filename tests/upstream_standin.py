"""A stand-in upstream for tests: a real HTTP(S) server on loopback that records every request.

`UpstreamStandIn` listens on 127.0.0.1 (or ::1) on an ephemeral port, serves TLS with a
certificate from its own trustme CA for the names it is given, and records each request it
receives (method, exact request-target bytes, headers, body) with the number of the TCP
connection it came on. How it answers is a `behaviour` (a function of the `twisted.web` request),
switchable at any time: `echo` (default), `stall`, `reset`, `big_body(n)`, `close_after`.

`MemoryConnector` is an in-memory `Connector` for pool and client logic tests on a fake clock.

`StaticDNS` is an `IResolver` answering A/AAAA queries from a dict, so a client can be pointed at
a real name ("upstream.test") whose certificate is checked, without touching real DNS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import trustme
from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from trackingproxy.upstream.pool import UpstreamProtocol

Behaviour = Callable[[Request], Any]


@define
class SeenRequest:
    """One request as the stand-in received it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, Sequence[bytes]]]
    body: bytes
    connection: int

    def header(self, name: bytes) -> list[bytes]:
        """All values of header `name` (case-insensitive)."""
        name = name.lower()
        return [v for k, values in self.headers if k.lower() == name for v in values]


def echo(request: Request) -> bytes:
    """200 with a small body naming what was asked (the default behaviour)."""
    request.setHeader(b"content-type", b"text/plain")
    request.setHeader(b"x-standin", b"echo")
    return b"seen " + request.method + b" " + request.uri


def stall(request: Request) -> object:
    """Never answer (until the connection goes away)."""
    request.notifyFinish().addErrback(lambda _: None)
    return NOT_DONE_YET


def reset(request: Request) -> object:
    """Abort the connection after the complete request was received, without any response."""
    request.notifyFinish().addErrback(lambda _: None)
    transport: Any = request.channel.transport
    transport.abortConnection()
    return NOT_DONE_YET


def close_after(request: Request) -> bytes:
    """Answer, then close the connection (Connection: close)."""
    request.setHeader(b"connection", b"close")
    return b"bye"


def big_body(size: int) -> Behaviour:
    """Answer with `size` bytes of body (with Content-Length)."""

    def respond(request: Request) -> bytes:
        return b"x" * size

    return respond


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    """A server TLS context holding a certificate from `ca` for `names`."""

    def __init__(self, ca: trustme.CA, names: Sequence[str]) -> None:
        cert = ca.issue_cert(*names)
        chain = [x509.load_pem_x509_certificate(pem.bytes()) for pem in cert.cert_chain_pems]
        key: Any = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate(chain[0])
        for extra in chain[1:]:
            self._context.add_extra_chain_cert(extra)
        self._context.use_privatekey(key)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def read_body(response: IResponse) -> Deferred[bytes]:
    """The whole body of `response` (like treq's content(), without readBody's warning)."""
    done: Deferred[bytes] = Deferred()
    chunks: list[bytes] = []

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            chunks.append(data)

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            if reason.check(ResponseDone, PotentialDataLoss):
                done.callback(b"".join(chunks))
            else:
                done.errback(reason)

    response.deliverBody(Collect())
    return done


class _Tracked(ProtocolWrapper):
    number = 0


class _TrackingFactory(WrappingFactory):
    """Numbers connections and knows which are still open."""

    protocol = _Tracked

    def __init__(self, site: Site, standin: UpstreamStandIn) -> None:
        super().__init__(site)
        self._standin = standin

    def buildProtocol(self, addr: Any) -> _Tracked:
        wrapper = cast(_Tracked, super().buildProtocol(addr))
        self._standin.connections_opened += 1
        wrapper.number = self._standin.connections_opened
        return wrapper

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self._standin._connection_gone()


class _Root(Resource):
    isLeaf = True

    def __init__(self, standin: UpstreamStandIn) -> None:
        super().__init__()
        self._standin = standin

    def render(self, request: Request) -> Any:
        wrapper = request.channel.transport
        assert request.content is not None
        self._standin.requests.append(
            SeenRequest(
                method=request.method,
                uri=request.uri,
                headers=list(request.requestHeaders.getAllRawHeaders()),
                body=request.content.read(),
                connection=getattr(wrapper, "number", 0),
            )
        )
        busy = self._standin._busy
        busy.add(wrapper)
        request.notifyFinish().addBoth(lambda _: busy.discard(wrapper))
        return self._standin.behaviour(request)


@define(eq=False)
class UpstreamStandIn:
    """The recording upstream; create with `start()`, always `stop()` it (returns a Deferred)."""

    names: tuple[str, ...] = ("upstream.test",)
    tls: bool = True
    interface: str = "127.0.0.1"
    reactor: Any = _global_reactor
    ca: trustme.CA = field(factory=trustme.CA)
    behaviour: Behaviour = echo
    requests: list[SeenRequest] = field(factory=list)
    connections_opened: int = 0
    _port: IListeningPort | None = None
    _tracking: _TrackingFactory | None = None
    _busy: set[Any] = field(factory=set)
    _waiters: list[tuple[Callable[[], bool], Deferred[None]]] = field(factory=list)

    def start(self) -> UpstreamStandIn:
        site = Site(_Root(self), reactor=self.reactor)
        site.noisy = False
        self._tracking = _TrackingFactory(site, self)
        factory: Any = self._tracking
        if self.tls:
            factory = TLSMemoryBIOFactory(_ServerTLS(self.ca, self.names), False, factory)
        factory.noisy = False
        self._port = self.reactor.listenTCP(0, factory, interface=self.interface)
        return self

    @property
    def port(self) -> int:
        assert self._port is not None
        address: Any = self._port.getHost()
        port: int = address.port
        return port

    @property
    def ca_pem(self) -> bytes:
        """The PEM of the CA that issued the stand-in's certificate."""
        return self.ca.cert_pem.bytes()

    def write_ca(self, path: str) -> str:
        """Write the CA certificate to `path` (for a `--upstream-ca-bundle`); returns `path`."""
        with open(path, "wb") as f:
            f.write(self.ca_pem)
        return path

    @property
    def open_connections(self) -> int:
        return 0 if self._tracking is None else len(self._tracking.protocols)

    def uris(self) -> list[bytes]:
        return [r.uri for r in self.requests]

    def drop_idle(self) -> Deferred[None]:
        """Close (politely) every connection with no request in progress; fires when closed."""
        assert self._tracking is not None
        protocols = self._tracking.protocols
        idle = [p for p in protocols if p not in self._busy]
        for p in idle:
            # The HTTP channel is a registered producer: only its own loseConnection closes.
            getattr(p.wrappedProtocol, "_channel", p).loseConnection()
        return self.when(lambda: not any(p in protocols for p in idle))

    def when(self, done: Callable[[], bool]) -> Deferred[None]:
        """Fire once `done()` holds; checked now and whenever a connection closes."""
        if done():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append((done, waiter))
        return waiter

    def stop(self) -> Deferred[None]:
        """Stop listening and abort every open connection; fires when all are gone."""
        stopped: Deferred[Any] = succeed(None)
        if self._port is not None:
            stopped = maybeDeferred(self._port.stopListening)
            self._port = None
        for p in list(self._tracking_set()):
            p.transport.abortConnection()
        gone = self.when(lambda: self.open_connections == 0)
        both = DeferredList([stopped, gone], fireOnOneErrback=True, consumeErrors=True)
        return both.addCallback(lambda _: None)

    def _tracking_set(self) -> Iterable[Any]:
        return () if self._tracking is None else self._tracking.protocols

    def _connection_gone(self) -> None:
        for entry in list(self._waiters):
            done, waiter = entry
            if done():
                self._waiters.remove(entry)
                waiter.callback(None)


class StaticDNS(ResolverBase):
    """An IResolver answering A and AAAA queries from `{name: [addresses]}`; others: NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]], ttl: int = 60) -> None:
        super().__init__()
        self.table = table
        self.ttl = ttl
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name: Any, cls: Any, type: Any, timeout: Any) -> Deferred[Any]:
        text = name.decode("ascii") if isinstance(name, bytes) else str(name)
        self.queries.append((text, type))
        if text not in self.table:
            return fail(DNSNameError(text))
        answers = []
        for address in self.table[text]:
            if type == dns.A and ":" not in address:
                payload: Any = dns.Record_A(address, self.ttl)
            elif type == dns.AAAA and ":" in address:
                payload = dns.Record_AAAA(address, self.ttl)
            else:
                continue
            answers.append(dns.RRHeader(text, type, dns.IN, self.ttl, payload))
        return succeed((answers, [], []))


@define(eq=False)
class Attempt:
    """One connection attempt made through a MemoryConnector."""

    address: str
    protocol: UpstreamProtocol
    deferred: Deferred[None]
    tls: bool
    transport: StringTransportWithDisconnection | None = None

    def tcp_up(self) -> StringTransportWithDisconnection:
        """The TCP connection is made (for TLS the handshake is still to come)."""
        transport = StringTransportWithDisconnection()
        transport.protocol = self.protocol
        self.transport = transport
        self.protocol.makeConnection(transport)
        self.deferred.callback(None)
        return transport

    def succeed(self) -> StringTransportWithDisconnection:
        """The connection is made and, for TLS, the handshake completed."""
        transport = self.tcp_up()
        if self.tls:
            self.protocol.handshakeCompleted()
        return transport

    def fail(self, error: Exception) -> None:
        self.deferred.errback(error)


class MemoryConnector:
    """An in-memory Connector: records attempts; the test decides how each one ends."""

    def __init__(self, tls: bool = False) -> None:
        self.tls = tls
        self.attempts: list[Attempt] = []

    def connect(self, address: str, protocol: UpstreamProtocol) -> Deferred[UpstreamProtocol]:
        d: Deferred[None] = Deferred()
        self.attempts.append(Attempt(address, protocol, d, self.tls))
        return d.addCallback(lambda _: protocol.ready)

    @property
    def last(self) -> Attempt:
        return self.attempts[-1]


class Collect(Protocol):
    """Reads a response body: ``data`` so far, and the reason it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.reason = reason


@define
class MemoryUpstream:
    """The real upstream client and pool over in-memory connections to ``upstream.test``
    (192.0.2.1): the test decides how each connection attempt ends (``connector``)."""

    clock: Any
    connector: MemoryConnector
    pool: Any  # trackingproxy.upstream.pool.ConnectionPool
    client: Any  # trackingproxy.upstream.client.UpstreamClient


def memory_upstream(clock: Any, **pool_options: Any) -> MemoryUpstream:
    """A `MemoryUpstream` on ``clock`` (response timeout 10 s; ``pool_options`` go to the
    pool, e.g. ``max_connections``)."""
    from trackingproxy.upstream.client import UpstreamClient
    from trackingproxy.upstream.dns import CachingResolver
    from trackingproxy.upstream.pool import ConnectionPool
    from trackingproxy.upstream.target import UpstreamTarget

    connector = MemoryConnector()
    target = UpstreamTarget("http", "upstream.test", 80)
    resolver = CachingResolver(StaticDNS({"upstream.test": ["192.0.2.1"]}), clock)
    pool = ConnectionPool(clock, target, resolver, connector, **pool_options)
    return MemoryUpstream(clock, connector, pool, UpstreamClient(pool, clock, response_timeout=10.0))


async def wait_until(clock: Any, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` every 10 ms of real time until it holds (or raise after `timeout`)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not reached within {timeout} s")
        await deferLater(clock, 0.01, lambda: None)
        waited += 0.01


__all__ = [
    "Attempt",
    "Collect",
    "MemoryConnector",
    "MemoryUpstream",
    "SeenRequest",
    "StaticDNS",
    "UpstreamStandIn",
    "big_body",
    "close_after",
    "echo",
    "memory_upstream",
    "read_body",
    "reset",
    "stall",
    "wait_until",
]
