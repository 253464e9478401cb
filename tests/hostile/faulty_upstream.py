"""A misbehaving upstream and a DNS server for it, both real and on loopback.

`FaultyUpstream` is a TLS server (its own trustme CA) speaking just enough HTTP/1.1 to answer
the proxy; `mode` says how it answers the next request (`OK`, `STALL_BODY`, `GARBAGE`...) and
`cert` which certificate the next handshake presents (`GOOD`, `WRONG_NAME`, `EXPIRED`,
`UNTRUSTED`). It records the requests it read and knows its open connections, so a test can
check that nothing was sent twice and nothing stayed open.

`LoopbackDNS` is a twisted.names server on a UDP port of 127.0.0.1 answering A queries from a
table, or failing (`SERVFAIL`, `NXDOMAIN`) as told; `resolver()` is a twisted.names client that
asks it and nothing else.
"""

from __future__ import annotations

import datetime
from typing import Any

import trustme
from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.names import client as names_client
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSServerError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.standin import GIF

HOST = "upstream.test"

# How the next request is answered.
OK = "ok"
RESET_BEFORE_HEADERS = "reset-before-headers"
RESET_MID_BODY = "reset-mid-body"
RESET_AFTER_HEADERS = "reset-after-headers"  # a complete head, then a reset before any body
STALL_HEADERS = "stall-headers"
STALL_BODY = "stall-body"
GARBAGE = "garbage"
HUGE_HEADERS = "huge-headers"  # 1 MiB of headers in one go, then a valid end
ENDLESS_HEADERS = "endless-headers"  # headers streamed as fast as they are read, never ending
TRAILER = "chunked-with-trailer"

# Which certificate the next TLS handshake presents.
GOOD = "good"
WRONG_NAME = "wrong-name"
EXPIRED = "expired"
UNTRUSTED = "untrusted"

BIG_LENGTH = 200_000  # the announced length of a body that is then cut or stalled
PARTIAL = 20_000  # what is sent of it
FLOOD_LIMIT = 256 * 1024 * 1024  # an endless header block stops here


def ok_response(extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nCache-Control: no-cache\r\n"
        + extra
        + b"Content-Length: 44\r\n\r\n"
        + GIF
    )


@implementer(IOpenSSLServerConnectionCreator)
class _Certificates:
    """One prebuilt server context per certificate kind; the upstream's `cert` picks one."""

    def __init__(self, upstream: FaultyUpstream) -> None:
        self._upstream = upstream
        now = datetime.datetime.now(datetime.UTC)
        day = datetime.timedelta(days=1)
        ca = upstream.ca
        self._contexts = {
            GOOD: _context(ca.issue_cert(HOST)),
            WRONG_NAME: _context(ca.issue_cert("other.test")),
            EXPIRED: _context(ca.issue_cert(HOST, not_before=now - 30 * day, not_after=now - day)),
            UNTRUSTED: _context(trustme.CA().issue_cert(HOST)),
        }

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._contexts[self._upstream.cert], None)
        connection.set_app_data(tlsProtocol)
        return connection


def _context(leaf: trustme.LeafCert) -> SSL.Context:
    chain = [x509.load_pem_x509_certificate(pem.bytes()) for pem in leaf.cert_chain_pems]
    key: Any = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)
    return ctx


class _Flood:
    """A push producer writing header lines for as long as the reader takes them."""

    def __init__(self, protocol: _Conn) -> None:
        self._protocol = protocol
        self._paused = False
        self._stopped = False
        self._line = b"X-Flood: " + b"f" * 16370 + b"\r\n"

    def start(self) -> None:
        transport: Any = self._protocol.transport
        transport.registerProducer(self, True)
        transport.write(b"HTTP/1.1 200 OK\r\n")
        self._protocol.upstream.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        upstream = self._protocol.upstream
        transport: Any = self._protocol.transport
        while not (self._paused or self._stopped) and upstream.flood_written < FLOOD_LIMIT:
            transport.write(self._line)
            upstream.flood_written += len(self._line)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            self._protocol.upstream.reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self._stopped = True


class _Conn(Protocol):
    """One connection: reads request heads (no request bodies) and answers per `mode`."""

    def __init__(self, upstream: FaultyUpstream) -> None:
        self.upstream = upstream
        self._buffer = b""
        self._deaf = False  # after a fault nothing more is answered on this connection

    def connectionMade(self) -> None:
        self.upstream.connections_opened += 1
        self.upstream.open.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.upstream.open.discard(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while not self._deaf and b"\r\n\r\n" in self._buffer:
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            target = head.split(b"\r\n", 1)[0].split(b" ")[1]
            self.upstream.requests.append(target)
            self._answer(self.upstream.mode)

    def _answer(self, mode: str) -> None:
        transport: Any = self.transport
        later = self.upstream.reactor.callLater
        if mode == OK:
            transport.write(ok_response())
            return
        self._deaf = True
        if mode == RESET_BEFORE_HEADERS:
            transport.abortConnection()
        elif mode in (RESET_MID_BODY, STALL_BODY):
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            transport.write(head + b"Content-Length: %d\r\n\r\n" % BIG_LENGTH + b"x" * PARTIAL)
            if mode == RESET_MID_BODY:
                later(0.2, transport.abortConnection)  # once the part has been delivered
        elif mode == RESET_AFTER_HEADERS:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            transport.write(head + b"Content-Length: %d\r\n\r\n" % BIG_LENGTH)
            later(0.2, transport.abortConnection)
        elif mode == GARBAGE:
            transport.write(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe not http at all\r\n\r\n")
        elif mode == HUGE_HEADERS:
            pad = b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"p" * 1000) for i in range(1024))
            transport.write(b"HTTP/1.1 200 OK\r\n" + pad + b"Content-Length: 44\r\n\r\n" + GIF)
        elif mode == ENDLESS_HEADERS:
            _Flood(self).start()
        elif mode == TRAILER:
            self._deaf = False
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nTransfer-Encoding: chunked\r\n"
                b"Trailer: X-Injected\r\n\r\n2c\r\n" + GIF + b"\r\n0\r\n"
                b"X-Injected: from-the-previous-response\r\nSet-Cookie: stolen=1\r\n\r\n"
            )
        # STALL_HEADERS: nothing at all


@define(eq=False)
class FaultyUpstream:
    """See the module docstring. `start()` it; `stop()` returns a Deferred."""

    reactor: Any = _global_reactor
    interface: str = "127.0.0.1"
    ca: trustme.CA = field(factory=trustme.CA)
    mode: str = OK
    cert: str = GOOD
    requests: list[bytes] = field(factory=list)
    open: set[_Conn] = field(factory=set)
    connections_opened: int = 0
    flood_written: int = 0
    port_number: int = 0
    _port: IListeningPort | None = None
    _factory: Any = None

    def start(self, port: int = 0) -> FaultyUpstream:
        inner = Factory.forProtocol(lambda: _Conn(self))
        inner.noisy = False
        self._factory = TLSMemoryBIOFactory(_Certificates(self), False, inner)
        self._factory.noisy = False
        self._port = self.reactor.listenTCP(port, self._factory, interface=self.interface)
        self.port_number = self._port.getHost().port  # type: ignore[union-attr]
        return self

    def stop_listening(self) -> Deferred[None]:
        """Refuse new connections (the port is closed) and drop the open ones."""
        port, self._port = self._port, None
        stopped = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        return stopped.addCallback(lambda _: self.drop_connections())

    def listen_again(self) -> None:
        """Accept connections on the same port again."""
        self._port = self.reactor.listenTCP(
            self.port_number, self._factory, interface=self.interface
        )

    def drop_connections(self) -> Deferred[None]:
        """Abort every open connection; fires once they are all gone."""
        for conn in list(self.open):
            conn.transport.abortConnection()  # type: ignore[union-attr]
        return self.when_closed()

    def when_closed(self, timeout: float = 5.0) -> Deferred[None]:
        from tests.hostile.wire import poll_until

        return poll_until(lambda: not self.open, timeout, "the upstream's connections to close")

    def stop(self) -> Deferred[None]:
        return self.stop_listening()

    def write_ca(self, path: str) -> str:
        self.ca.cert_pem.write_to_path(path)
        return path


# --- DNS -------------------------------------------------------------------------------------
ANSWER = "answer"
SERVFAIL = "servfail"
NXDOMAIN = "nxdomain"


class _Authority(ResolverBase):
    def __init__(self, dns_server: LoopbackDNS) -> None:
        super().__init__()
        self._server = dns_server

    def _lookup(self, name: Any, cls: Any, type: Any, timeout: Any) -> Deferred[Any]:
        text = name.decode("ascii") if isinstance(name, bytes) else str(name)
        self._server.queries += 1
        if self._server.mode == SERVFAIL:
            return fail(DNSServerError(text))
        if self._server.mode == NXDOMAIN or text not in self._server.table:
            return fail(DNSNameError(text))
        ttl = self._server.ttl
        answers = [
            dns.RRHeader(text, dns.A, dns.IN, ttl, dns.Record_A(address, ttl))
            for address in self._server.table[text]
            if type == dns.A
        ]
        return succeed((answers, [], []))


@define(eq=False)
class LoopbackDNS:
    """A DNS server on 127.0.0.1 (UDP): A records from `table`, or the failure `mode` says."""

    table: dict[str, list[str]]
    reactor: Any = _global_reactor
    mode: str = ANSWER
    ttl: int = 1  # the proxy clamps it to its minimum (5 s)
    queries: int = 0
    _port: IListeningPort | None = None

    def start(self) -> LoopbackDNS:
        factory = server.DNSServerFactory(authorities=[_Authority(self)], verbose=0)
        factory.noisy = False
        protocol = dns.DNSDatagramProtocol(factory)
        protocol.noisy = False
        self._port = self.reactor.listenUDP(0, protocol, interface="127.0.0.1")
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._port is not None
        return ("127.0.0.1", self._port.getHost().port)  # type: ignore[attr-defined]

    def resolver(self) -> names_client.Resolver:
        """A twisted.names client that asks this server only (no resolv.conf, no hosts file)."""
        return names_client.Resolver(servers=[self.address], reactor=self.reactor)

    def stop(self) -> Deferred[None]:
        port, self._port = self._port, None
        stopped: Any = port.stopListening() if port is not None else None
        return stopped if isinstance(stopped, Deferred) else succeed(None)


__all__ = [
    "ANSWER",
    "ENDLESS_HEADERS",
    "EXPIRED",
    "GARBAGE",
    "GOOD",
    "HOST",
    "HUGE_HEADERS",
    "NXDOMAIN",
    "OK",
    "RESET_AFTER_HEADERS",
    "RESET_BEFORE_HEADERS",
    "RESET_MID_BODY",
    "SERVFAIL",
    "STALL_BODY",
    "STALL_HEADERS",
    "TRAILER",
    "UNTRUSTED",
    "WRONG_NAME",
    "FaultyUpstream",
    "LoopbackDNS",
    "ok_response",
]
