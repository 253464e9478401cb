"""Resolving the upstream host name: non-blocking, TTL-aware, shared and stale-tolerant.

Lookups go through an injected `IResolver` (twisted.names: A and AAAA queries, never the
blocking libc resolver). Answers are cached for their TTL clamped to [5 s, 300 s]; concurrent
lookups of one name share one query. Once a name has been resolved, callers never wait for DNS
again: an expired answer is returned at once while a single refresh runs in the background, and
if that refresh fails the old answer stays in use (logged once per outage), so a DNS blip cannot
turn into 502s. Only a name that never resolved fails, with `DNSLookupFailed`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Final

from attrs import define
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from trackingproxy.domains import is_ip_literal
from trackingproxy.upstream.errors import DNSLookupFailed

MIN_TTL: Final = 5.0
MAX_TTL: Final = 300.0
QUERY_TIMEOUT: Final = (1, 3)

_log = Logger()


@define
class _Entry:
    addresses: list[str]
    expires: float
    failing: bool = False


class CachingResolver:
    """Resolve one (or a few) host names to IP address strings, caching by TTL."""

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        *,
        min_ttl: float = MIN_TTL,
        max_ttl: float = MAX_TTL,
        query_timeout: Sequence[int] = QUERY_TIMEOUT,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._query_timeout = tuple(query_timeout)
        self._cache: dict[str, _Entry] = {}
        self._waiters: dict[str, list[Deferred[list[str]]]] = {}
        self._inflight: set[str] = set()

    def resolve(self, host: str) -> Deferred[list[str]]:
        """The addresses of `host` (IPv4 first); an IP literal resolves to itself at once."""
        entry = self._cache.get(host)
        if entry is not None:
            if self._clock.seconds() >= entry.expires:
                self._refresh(host)
            return succeed(list(entry.addresses))
        if is_ip_literal(host):
            return succeed([host])
        waiter: Deferred[list[str]] = Deferred()
        self._waiters.setdefault(host, []).append(waiter)
        self._refresh(host)
        return waiter

    def cached(self, host: str) -> list[str] | None:
        """The cached addresses of `host`, fresh or stale, without querying (for diagnostics)."""
        entry = self._cache.get(host)
        return None if entry is None else list(entry.addresses)

    def _refresh(self, host: str) -> None:
        if host in self._inflight:
            return
        self._inflight.add(host)
        d = self._query(host)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(host,), errbackArgs=(host,))
        d.addErrback(lambda f: _log.failure("DNS cache update failed for {host}", f, host=host))

    def _query(self, host: str) -> Deferred[tuple[list[str], float]]:
        resolver: Any = self._resolver
        lookups: list[Deferred[Any]] = []
        for lookup in (resolver.lookupAddress, resolver.lookupIPV6Address):
            lookups.append(maybeDeferred(lookup, host, self._query_timeout))
        gathered = DeferredList(lookups, consumeErrors=True)
        return gathered.addCallback(_addresses_and_ttl, host)

    def _answered(self, result: tuple[list[str], float], host: str) -> None:
        self._inflight.discard(host)
        addresses, ttl = result
        ttl = min(max(ttl, self._min_ttl), self._max_ttl)
        old = self._cache.get(host)
        if old is not None and old.failing:
            _log.info("DNS for {host} answers again: {addresses}", host=host, addresses=addresses)
        self._cache[host] = _Entry(addresses, self._clock.seconds() + ttl)
        for waiter in self._waiters.pop(host, ()):
            if not waiter.called:
                waiter.callback(list(addresses))

    def _failed(self, failure: Failure, host: str) -> None:
        self._inflight.discard(host)
        entry = self._cache.get(host)
        if entry is not None:
            # Keep the stale answer; try again after the minimum TTL, not on every call.
            entry.expires = self._clock.seconds() + self._min_ttl
            if not entry.failing:
                entry.failing = True
                _log.warn(
                    "DNS refresh of {host} failed ({error}); still using {addresses}",
                    host=host,
                    error=_describe(failure),
                    addresses=entry.addresses,
                )
        error = DNSLookupFailed(f"DNS lookup of {host} failed: {_describe(failure)}", failure.value)
        for waiter in self._waiters.pop(host, ()):
            if waiter.called:
                continue
            if entry is not None:
                waiter.callback(list(entry.addresses))
            else:
                waiter.errback(error)


def default_resolver(clock: IReactorTime) -> CachingResolver:
    """The production resolver: /etc/hosts, then the servers in /etc/resolv.conf."""
    resolver: IResolver = client.createResolver()
    return CachingResolver(resolver, clock)


class LazyResolver:
    """The system's DNS client, made on the first lookup (so reading resolv.conf happens
    once the process logs through its filters, and not at all when nothing is looked up)."""

    def __init__(self, make: Any = client.createResolver) -> None:
        self._make = make
        self._resolver: Any = None

    def _get(self) -> Any:
        if self._resolver is None:
            self._resolver = self._make()
        return self._resolver

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._get().lookupAddress(name, timeout)  # type: ignore[no-any-return]

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._get().lookupIPV6Address(name, timeout)  # type: ignore[no-any-return]

    @property
    def resolvers(self) -> Sequence[Any]:
        """The chained resolvers, once made (for stopping their resolv.conf timer)."""
        return () if self._resolver is None else getattr(self._resolver, "resolvers", ())


class _NoAddresses(Exception):
    pass


def _addresses_and_ttl(results: list[tuple[bool, Any]], host: str) -> tuple[list[str], float]:
    v4: list[str] = []
    v6: list[str] = []
    ttls: list[float] = []
    failures: list[Failure] = []
    for ok, value in results:
        if not ok:
            failures.append(value)
            continue
        for rr in value[0]:
            if rr.type == dns.A:
                v4.append(rr.payload.dottedQuad())
            elif rr.type == dns.AAAA:
                v6.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
            else:
                continue
            ttls.append(rr.ttl)
    if not ttls:
        if failures:
            failures[0].raiseException()
        raise _NoAddresses(f"{host} has no A or AAAA record")
    return v4 + v6, float(min(ttls))


def _describe(failure: Failure) -> str:
    if isinstance(failure.value, _NoAddresses):
        return str(failure.value)
    if isinstance(failure.value, dns_error.DNSNameError):
        return "no such domain"
    message = failure.getErrorMessage()
    name = type(failure.value).__name__
    return f"{name}: {message}" if message else name


__all__ = ["MAX_TTL", "MIN_TTL", "CachingResolver", "default_resolver"]
