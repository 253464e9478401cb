"""The upstream, asked directly. `reachable`: one connection made exactly as the proxy makes them
(its pool, connector and trust root: TCP, then TLS with SNI and verification). `route`: the `/f/`
probe for one tracking domain sent over that pool the way the proxy forwards it (the domain as
Host, which is how SparkPost routes), judged by `routing.judge_route`. One pool serves the whole
run; `close` ends it.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from trackingproxy.checks.findings import Finding, Level
from trackingproxy.checks.routing import Answer, judge_route, named
from trackingproxy.errors import ConfigError
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.dns import CachingResolver
from trackingproxy.upstream.errors import (
    DNSLookupFailed,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamTLSFailed,
)
from trackingproxy.upstream.pool import ConnectionPool, EndpointConnector, make_trust_root
from trackingproxy.upstream.target import UpstreamTarget

_FIXES: dict[type[UpstreamError], str] = {
    DNSLookupFailed: "check this host's DNS servers (/etc/resolv.conf)",
    UpstreamConnectFailed: "allow outgoing connections to it (firewall, egress proxy rules)",
    UpstreamTLSFailed: (
        "if an egress proxy intercepts TLS, pass its CA with --upstream-ca-bundle; otherwise "
        "update the system CA store (ca-certificates)"
    ),
    UpstreamTimeout: "try again, with a longer --timeout if the network is slow",
    UpstreamReset: (
        "the endpoint closed the connection without an answer: try again; if it persists, check "
        "that --upstream is the endpoint SparkPost's domain settings show"
    ),
    UpstreamProtocolError: "the answer is not HTTP/1.1: check that --upstream is SparkPost's",
}


@frozen
class Routed:
    """The finding about one domain's route, and the upstream's answer when there was one."""

    finding: Finding
    answer: Answer | None = None


class UpstreamProbe:
    """Asks the upstream directly; call `reachable` first, `route` per domain, `close` last.

    @ivar _pool: the connection pool, made by `reachable` (None before, or when the trust root
        could not be loaded).
    @ivar _client: the request sender over `_pool`, set once a connection was made.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        target: UpstreamTarget,
        ca_bundle: str | None,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._target = target
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._pool: ConnectionPool | None = None
        self._client: UpstreamClient | None = None

    @property
    def ready(self) -> bool:
        """Whether `reachable` made a connection (so `route` can ask)."""
        return self._client is not None

    async def reachable(self) -> Finding:
        """One finding: the upstream answers a (verified) TLS handshake, or why not."""
        target, what = self._target, named(self._target)
        try:
            trust = make_trust_root(self._ca_bundle) if target.tls else None
        except ConfigError as e:
            return Finding(Level.FAIL, "upstream", str(e))
        reactor, timeout = self._reactor, self._timeout
        query_timeout = (max(1, round(timeout / 3)),)
        names = CachingResolver(self._resolver, reactor, query_timeout=query_timeout)
        connector = EndpointConnector(reactor, target, trust, tcp_timeout=timeout)
        pool = ConnectionPool(reactor, target, names, connector, connect_timeout=timeout)
        self._pool = pool
        try:
            conn = await pool.acquire()
        except UpstreamError as e:
            return Finding(Level.FAIL, "upstream", f"{what}: {e.message}", _fix(e))
        except Exception as e:
            return Finding(Level.FAIL, "upstream", f"{what}: {type(e).__name__}: {e}")
        pool.release(conn)  # idle again: the route probes reuse it
        self._client = UpstreamClient(pool, reactor, response_timeout=timeout)
        verified = "TLS certificate verified" if target.tls else "connected (plain HTTP)"
        return Finding(Level.OK, "upstream", f"{what}: reachable at {conn.address}, {verified}")

    async def route(self, domain: str, path: str) -> Routed:
        """GET `path` from the upstream with `Host: domain`, as the proxy forwards an HTTPS
        click; the verdict on its answer."""
        assert self._client is not None, "route() before a successful reachable()"
        host = domain.encode("ascii")
        headers = [
            (b"host", host),
            (b"user-agent", b"trackingproxy-check"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", host),
        ]
        try:
            response = await self._client.request(b"GET", path.encode("ascii"), headers, None)
        except UpstreamError as e:
            text = f"{named(self._target)} for {domain}: GET {path} with Host {domain}: no answer"
            return Routed(Finding(Level.FAIL, "upstream", f"{text} ({e.message})", _fix(e)))
        done: Deferred[None] = Deferred()
        response.deliverBody(_Drain(done))
        await done  # the body is dropped; it ends, or the client's body timeout ends it
        answer = Answer(
            response.code, _header(response, b"server"), _header(response, b"location")
        )
        return Routed(judge_route(domain, self._target, path, answer), answer)

    async def close(self) -> None:
        """Close every connection the probes opened."""
        if self._pool is not None:
            await self._pool.close()


def _fix(error: UpstreamError) -> str:
    return next((f for cls, f in _FIXES.items() if isinstance(error, cls)), "")


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


class _Drain(Protocol):
    """Reads and drops a body; fires `done` when it has ended, however it ended."""

    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


__all__ = ["Routed", "UpstreamProbe"]
