"""Connections to the one upstream: how they are made (TCP, verified TLS) and kept (the pool).

`EndpointConnector` makes one connection to one resolved address: TCP, then TLS with SNI set to
the upstream host name and the certificate verified (chain against the trust root, name with
service_identity; there is no unverified fallback). Its Deferred fires only once the handshake
is complete, so a TLS failure is a connect-phase failure and no request bytes were ever sent.

`ConnectionPool` hands out `PooledConnection`s: the most recently used idle connection if there
is one (LIFO, so surplus connections idle out), otherwise a new one to the next resolved address
(round robin, failing over to the other addresses when a TCP connect fails). A connection comes
back when its protocol goes quiescent, and is closed instead when it is older than `max_age` (so
DNS changes are followed) or the pool already holds `max_idle`. Idle connections are closed
after `idle_timeout`, below the keep-alive timeout of common servers (60-75 s), which keeps the
window for "the server closed it just as we reused it" small.

Bounds: at most `max_connections` connections exist at once (open, opening or closing). A
request that finds none idle and none allowed waits, first come first served, for one to come
back or go away; after `queue_timeout`, or at once when `max_waiting` requests already wait, it
fails with `UpstreamBusy` (the proxy answers 503) without anything having been sent. A waiter
that is cancelled (its client went away) leaves the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from attrs import frozen
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.python.failure import Failure
from zope.interface import implementer

from trackingproxy.errors import ConfigError
from trackingproxy.internals.twisted_private import IOpenSSLTrustRoot
from trackingproxy.upstream.dns import CachingResolver
from trackingproxy.upstream.errors import (
    DNSLookupFailed,
    UpstreamBusy,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamTLSFailed,
)
from trackingproxy.upstream.http1 import HTTP11ClientConnection
from trackingproxy.upstream.target import UpstreamTarget

MAX_IDLE: Final = 64
MAX_CONNECTIONS: Final = 1024  # as Envoy's default circuit breaker
QUEUE_TIMEOUT: Final = 5.0
IDLE_TIMEOUT: Final = 50.0
MAX_AGE: Final = 120.0
CONNECT_TIMEOUT: Final = 5.0
CLOSE_GRACE: Final = 5.0  # a polite close (TLS close_notify) that gets no answer is aborted


def make_trust_root(ca_bundle: str | None) -> IOpenSSLTrustRoot:
    """The system CA store, plus the certificates in the PEM file `ca_bundle` if given."""
    if ca_bundle is None:
        return _system_trust()
    option = f"--upstream-ca-bundle {ca_bundle!r}"
    try:
        pem = Path(ca_bundle).read_bytes()
    except OSError as e:
        problem = f"cannot read it ({e.strerror}); give a readable PEM file"
        raise ConfigError(f"{option}: {problem}") from None
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        problem = "no PEM certificate in it; give a PEM file of CA certificates"
        raise ConfigError(f"{option}: {problem}") from None
    return _SystemPlusBundle(tuple(crypto.X509.from_cryptography(cert) for cert in certs))


@implementer(IOpenSSLTrustRoot)
@frozen
class _SystemPlusBundle:
    """Trust OpenSSL's default verify paths and, in addition, some extra CA certificates."""

    extra: tuple[crypto.X509, ...]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None
        for cert in self.extra:
            store.add_cert(cert)


@implementer(IHandshakeListener)
class UpstreamProtocol(HTTP11ClientConnection):
    """An HTTP/1.1 client connection that reports readiness (after TLS) and loss to its pool."""

    def __init__(self, tls: bool, on_quiescent: Callable[[], None], on_lost: Callable[[], None]):
        super().__init__(lambda _protocol: on_quiescent())
        self._tls = tls
        self._on_lost = on_lost
        self.handshaking = False
        self.ready: Deferred[UpstreamProtocol] = Deferred(self._cancel_ready)

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._tls:
            self.handshaking = True
        else:
            self.ready.callback(self)

    def handshakeCompleted(self) -> None:
        self.handshaking = False
        if not self.ready.called:
            self.ready.callback(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        HTTP11ClientConnection.connectionLost(self, reason)
        if not self.ready.called:
            self.ready.errback(reason)
        self._on_lost()

    def _cancel_ready(self, _: Deferred[UpstreamProtocol]) -> None:
        _abort(self.transport)


class Connector(Protocol):
    """Connects a given protocol to one address of the upstream."""

    def connect(self, address: str, protocol: UpstreamProtocol) -> Deferred[UpstreamProtocol]:
        """Fire with `protocol` once it is connected and, for TLS, the handshake is done."""


class _OneProtocol(ClientFactory):
    noisy = False

    def __init__(self, protocol: UpstreamProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> UpstreamProtocol:
        return self._protocol


class EndpointConnector:
    """TCP (IPv4 or IPv6) to the upstream port, wrapped in verified TLS for https upstreams."""

    def __init__(
        self,
        reactor: IReactorTCP,
        target: UpstreamTarget,
        trust_root: IOpenSSLTrustRoot | None = None,
        tcp_timeout: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self._port = target.port
        self._tcp_timeout = tcp_timeout
        self._tls: IOpenSSLClientConnectionCreator | None = None
        if target.tls:
            self._tls = optionsForClientTLS(target.host, trustRoot=trust_root or _system_trust())

    def connect(self, address: str, protocol: UpstreamProtocol) -> Deferred[UpstreamProtocol]:
        endpoint: IStreamClientEndpoint
        if ":" in address:
            endpoint = TCP6ClientEndpoint(
                self._reactor, address, self._port, self._tcp_timeout
            )
        else:
            endpoint = TCP4ClientEndpoint(self._reactor, address, self._port, self._tcp_timeout)
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls, endpoint)
        d: Deferred[Any] = endpoint.connect(_OneProtocol(protocol))
        return d.addCallback(lambda _: protocol.ready)


class PooledConnection:
    """One upstream connection; `reused` tells whether it served a request before this one."""

    __slots__ = (
        "_guard",
        "address",
        "closing",
        "created",
        "idle",
        "idle_since",
        "protocol",
        "requests",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.protocol: UpstreamProtocol
        self.created = 0.0
        self.idle_since = 0.0
        self.requests = 0
        self.idle = False
        self.closing = False
        self._guard: IDelayedCall | None = None

    @property
    def reused(self) -> bool:
        return self.requests > 1

    def abort(self) -> None:
        """Drop the connection now (it will not be reused); in-flight requests fail."""
        self.closing = True
        _abort(self.protocol.transport)


class ConnectionPool:
    """Keep-alive connections to one upstream, see the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        target: UpstreamTarget,
        resolver: CachingResolver,
        connector: Connector,
        *,
        max_idle: int = MAX_IDLE,
        idle_timeout: float = IDLE_TIMEOUT,
        max_age: float = MAX_AGE,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        queue_timeout: float = QUEUE_TIMEOUT,
        max_waiting: int | None = None,
    ) -> None:
        self._clock = clock
        self._max_connections = max_connections
        self._queue_timeout = queue_timeout
        self._max_waiting = 4 * max_connections if max_waiting is None else max_waiting
        self._waiting: deque[_Waiter] = deque()
        self._target = target
        self._resolver = resolver
        self._connector = connector
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._max_age = max_age
        self._connect_timeout = connect_timeout
        self._idle: deque[PooledConnection] = deque()
        self._all: set[PooledConnection] = set()
        self._pending: set[Deferred[UpstreamProtocol]] = set()
        self._next_address = 0
        self._sweep: IDelayedCall | None = None
        self._closing = False
        self._closed_waiters: list[Deferred[None]] = []

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        """Connections open or being opened, idle or busy."""
        return len(self._all)

    @property
    def waiting_count(self) -> int:
        """Requests waiting for a connection (all `max_connections` busy)."""
        return len(self._waiting)

    def acquire(self, fresh: bool = False) -> Deferred[PooledConnection]:
        """An idle connection (unless `fresh`), or a new one if fewer than `max_connections`
        exist, or the next one that comes back; fails with an UpstreamError."""
        if self._closing:
            return fail(UpstreamConnectFailed("the upstream connection pool is closed"))
        if not fresh:
            conn = self._take_idle()
            if conn is not None:
                conn.requests += 1
                return succeed(conn)
        if len(self._all) < self._max_connections:
            return self._open()
        if fresh and self._idle:
            self._close(self._idle.popleft())  # a slot for the fresh one, soon
        if len(self._waiting) >= self._max_waiting:
            return fail(self._busy(f"{len(self._waiting)} requests already wait"))
        waiter = _Waiter(self, fresh)
        self._waiting.append(waiter)
        return waiter.deferred

    def _open(self) -> Deferred[PooledConnection]:
        """A new connection. Cancelling the result does not abort the connection being
        made: once open it goes to the idle list (a client that sends a request and goes
        away at once must not cost a connection attempt each)."""
        opened: Deferred[PooledConnection] = Deferred(lambda _: None)
        resolved = self._resolver.resolve(self._target.host)
        d: Deferred[PooledConnection] = resolved.addCallbacks(self._connect_any, self._dns_failed)

        def settled(result: PooledConnection | Failure) -> None:
            if not opened.called:
                if isinstance(result, Failure):
                    opened.errback(result)
                else:
                    opened.callback(result)
            elif isinstance(result, PooledConnection):
                self.release(result)  # nobody wants it any more: keep it for the next one

        d.addBoth(settled)
        return opened

    def _busy(self, detail: str) -> UpstreamBusy:
        return UpstreamBusy(
            f"all {self._max_connections} upstream connections are busy ({detail}); "
            "raise --upstream-max-connections if the upstream allows more"
        )

    def _serve_waiters(self) -> None:
        """Hand idle connections, or free slots, to waiting requests, oldest first."""
        while self._waiting and not self._closing:
            if self._idle and not self._waiting[0].fresh:
                conn = self._take_idle()
                if conn is None:
                    continue
                conn.requests += 1
                self._waiting.popleft().succeed(conn)
            elif len(self._all) < self._max_connections:
                waiter = self._waiting.popleft()
                waiter.chain(self._open())
            else:
                return

    def release(self, conn: PooledConnection) -> None:
        """Take back a connection that was handed out but not used (its request was
        withdrawn before it was written)."""
        if conn.protocol.state == "QUIESCENT" and conn.protocol.transport is not None:
            self._on_quiescent(conn)
        else:
            conn.abort()

    def close(self) -> Deferred[None]:
        """Close all connections (idle politely, busy at once); fires when all are gone."""
        self._closing = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        for pending in list(self._pending):
            pending.cancel()
        waiting, self._waiting = self._waiting, deque()
        for queued in waiting:
            queued.fail(UpstreamConnectFailed("the upstream connection pool is closed"))
        while self._idle:
            conn = self._idle.pop()
            conn.idle = False
            self._close(conn)
        for conn in list(self._all):
            if not conn.closing:
                conn.abort()
        if not self._all:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    # Handing out.

    def _take_idle(self) -> PooledConnection | None:
        now = self._clock.seconds()
        while self._idle:
            conn = self._idle.pop()
            conn.idle = False
            if (
                now - conn.idle_since < self._idle_timeout
                and now - conn.created < self._max_age
                and conn.protocol.state == "QUIESCENT"
            ):
                return conn
            self._close(conn)
        return None

    def _dns_failed(self, failure: Failure) -> Failure:
        if isinstance(failure.value, UpstreamError | CancelledError):
            return failure
        host = self._target.host
        raise DNSLookupFailed(f"DNS lookup of {host} failed: {failure.getErrorMessage()}")

    def _connect_any(self, addresses: list[str]) -> Deferred[PooledConnection]:
        if not addresses:
            raise DNSLookupFailed(f"{self._target.host} has no address")
        start = self._next_address
        self._next_address += 1
        order = [addresses[(start + i) % len(addresses)] for i in range(len(addresses))]
        return self._connect_from(order, 0)

    def _connect_from(self, order: list[str], index: int) -> Deferred[PooledConnection]:
        d = self._connect_one(order[index])
        if index + 1 < len(order):

            def next_address(failure: Failure) -> Failure | Deferred[PooledConnection]:
                if isinstance(failure.value, UpstreamConnectFailed) and not self._closing:
                    return self._connect_from(order, index + 1)
                return failure

            d.addErrback(next_address)
        return d

    def _connect_one(self, address: str) -> Deferred[PooledConnection]:
        conn = PooledConnection(address)
        conn.protocol = UpstreamProtocol(
            self._target.tls, lambda: self._on_quiescent(conn), lambda: self._on_lost(conn)
        )
        self._all.add(conn)
        d = self._connector.connect(address, conn.protocol)
        d.addTimeout(self._connect_timeout, self._clock)
        self._pending.add(d)

        def settled(result: object) -> object:
            self._pending.discard(d)
            return result

        d.addBoth(settled)
        return d.addCallbacks(
            self._connected, self._connect_failed, callbackArgs=(conn,), errbackArgs=(conn,)
        )

    def _connected(self, _: UpstreamProtocol, conn: PooledConnection) -> PooledConnection:
        if self._closing:
            conn.abort()
            raise UpstreamConnectFailed("the upstream connection pool is closed")
        conn.created = self._clock.seconds()
        conn.requests = 1
        return conn

    def _connect_failed(self, failure: Failure, conn: PooledConnection) -> Failure:
        if conn.protocol.transport is None:
            self._forget(conn)  # never connected, so no connectionLost will come
        value = failure.value
        if isinstance(value, CancelledError) or not isinstance(value, Exception):
            return failure
        where = f"{self._target.host} at {conn.address} port {self._target.port}"
        detail = "timed out" if isinstance(value, DeferredTimeout) else _describe(value)
        if isinstance(value, SSL.Error):
            detail = _ssl_detail(value)
            raise UpstreamTLSFailed(f"TLS handshake with {where} failed: {detail}", value)
        if isinstance(value, VerificationError | CertificateError):
            raise UpstreamTLSFailed(
                f"TLS certificate of {where} is not valid for {self._target.host}", value
            )
        if conn.protocol.handshaking:
            raise UpstreamTLSFailed(f"TLS handshake with {where} failed: {detail}", value)
        raise UpstreamConnectFailed(f"cannot connect to {where}: {detail}", value)

    # Taking back.

    def _on_quiescent(self, conn: PooledConnection) -> None:
        now = self._clock.seconds()
        if (
            self._closing
            or conn.closing
            or now - conn.created >= self._max_age
            or len(self._idle) >= self._max_idle
        ):
            self._close(conn)
            return
        conn.idle = True
        conn.idle_since = now
        self._idle.append(conn)
        if self._waiting:
            self._serve_waiters()
            if not conn.idle:
                return
        due = min(now + self._idle_timeout, conn.created + self._max_age)
        if self._sweep is None:
            self._sweep = self._clock.callLater(due - now, self._run_sweep)
        elif due < self._sweep.getTime():
            self._sweep.reset(due - now)

    def _run_sweep(self) -> None:
        self._sweep = None
        now = self._clock.seconds()
        keep: deque[PooledConnection] = deque()
        next_due = None
        for conn in self._idle:
            due = min(conn.idle_since + self._idle_timeout, conn.created + self._max_age)
            if due <= now:
                conn.idle = False
                self._close(conn)
            else:
                keep.append(conn)
                next_due = due if next_due is None else min(next_due, due)
        self._idle = keep
        if next_due is not None:
            self._sweep = self._clock.callLater(next_due - now, self._run_sweep)

    def _close(self, conn: PooledConnection) -> None:
        if conn.closing:
            return
        conn.closing = True
        transport = conn.protocol.transport
        if transport is None:
            return
        conn._guard = self._clock.callLater(CLOSE_GRACE, _abort, transport)
        transport.loseConnection()

    def _on_lost(self, conn: PooledConnection) -> None:
        conn.closing = True
        if conn._guard is not None and conn._guard.active():
            conn._guard.cancel()
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
        self._forget(conn)

    def _forget(self, conn: PooledConnection) -> None:
        self._all.discard(conn)
        if self._waiting:
            self._serve_waiters()
        if self._closing and not self._all:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)


class _Waiter:
    """A request waiting for a connection: fires with one, or fails after the queue timeout;
    cancelling it (the client went away) takes it out of the queue."""

    __slots__ = ("_inner", "_pool", "_timer", "deferred", "fresh")

    def __init__(self, pool: ConnectionPool, fresh: bool) -> None:
        self._pool = pool
        self.fresh = fresh
        self._inner: Deferred[PooledConnection] | None = None
        self.deferred: Deferred[PooledConnection] = Deferred(self._cancelled)
        self._timer: IDelayedCall | None = pool._clock.callLater(
            pool._queue_timeout, self._timed_out
        )

    def _stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def succeed(self, conn: PooledConnection) -> None:
        self._stop()
        self.deferred.callback(conn)

    def fail(self, error: Exception) -> None:
        self._stop()
        self.deferred.errback(error)

    def chain(self, d: Deferred[PooledConnection]) -> None:
        """Fire with what ``d`` gives (a new connection being opened for this waiter)."""
        self._stop()
        self._inner = d
        d.addCallbacks(self.deferred.callback, self.deferred.errback)

    def _timed_out(self) -> None:
        self._timer = None
        pool = self._pool
        if self in pool._waiting:
            pool._waiting.remove(self)
            self.deferred.errback(pool._busy(f"waited {pool._queue_timeout:g} s"))

    def _cancelled(self, _: Deferred[PooledConnection]) -> None:
        self._stop()
        if self in self._pool._waiting:
            self._pool._waiting.remove(self)
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.cancel()  # the connection being opened for it


def _system_trust() -> IOpenSSLTrustRoot:
    trust: IOpenSSLTrustRoot = platformTrust()
    return trust


def _abort(transport: Any) -> None:
    """Abort a TCP or TLS transport (ITransport itself has no abortConnection)."""
    if transport is not None:
        transport.abortConnection()


def _ssl_detail(error: BaseException) -> str:
    reasons = [str(item[-1]) for item in error.args[0] if item] if error.args else []
    return ", ".join(r for r in reasons if r) or type(error).__name__


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


__all__ = [
    "CONNECT_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_AGE",
    "MAX_CONNECTIONS",
    "MAX_IDLE",
    "QUEUE_TIMEOUT",
    "ConnectionPool",
    "Connector",
    "EndpointConnector",
    "PooledConnection",
    "UpstreamProtocol",
    "make_trust_root",
]
