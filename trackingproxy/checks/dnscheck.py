"""Where a tracking domain points: A/AAAA/CNAME through twisted.names, then a verdict.

`resolve` follows a CNAME chain (at most 8 steps) with A and AAAA queries that time out; it never
raises, a failed lookup is part of the `Resolution`. `judge` is pure: it compares the answer
with this host's addresses and with SparkPost's (a CNAME to one of its tracking endpoints: V1
spgo.io / eu.spgo.io, V2 v2.spgo.io / eu.v2.spgo.io, Enterprise TENANT.et.e.sparkpost.com; or
their addresses) and returns the one finding for the domain.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Final

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolver
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from trackingproxy.checks.findings import Finding, Level
from trackingproxy.upstream.target import ENTERPRISE_DOMAIN

SPARKPOST_HOSTS: Final = ("spgo.io", "eu.spgo.io", "v2.spgo.io", "eu.v2.spgo.io")
SPARKPOST_SUFFIXES: Final = (ENTERPRISE_DOMAIN,)  # a CNAME under it is SparkPost's too
MAX_CNAMES: Final = 8


@frozen
class Resolution:
    """The answer for `name`: the CNAME targets in order, the addresses, or what went wrong."""

    name: str
    cnames: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    nxdomain: bool = False
    error: str | None = None

    @property
    def final(self) -> str:
        return self.cnames[-1] if self.cnames else self.name


async def resolve(
    resolver: IResolver, name: str, timeout: Sequence[int], stop_at: Iterable[str] = ()
) -> Resolution:
    """Resolve `name` (A and AAAA, following CNAMEs); stop following at a name in `stop_at`."""
    stops = {s.lower() for s in stop_at}
    cnames: list[str] = []
    current = name
    for _ in range(MAX_CNAMES):
        answers, failures = await _query(resolver, current, timeout)
        aliases = {
            str(rr.name).lower(): str(rr.payload.name).lower()
            for rr in answers
            if rr.type == dns.CNAME
        }
        before = len(cnames)
        while current in aliases and len(cnames) < MAX_CNAMES:
            current = aliases[current]
            cnames.append(current)
        addresses = _addresses(answers)
        if addresses:
            return Resolution(name, tuple(cnames), addresses)
        if cnames and _is_sparkpost(current, stops):
            return Resolution(name, tuple(cnames))
        if len(cnames) > before:
            continue  # the answer ended at a CNAME target without its addresses: ask for them
        if any(f.check(dns_error.DNSNameError) for f in failures):
            return Resolution(name, tuple(cnames), nxdomain=True)
        if failures:
            return Resolution(name, tuple(cnames), error=_describe(failures[0], timeout))
        return Resolution(name, tuple(cnames))
    return Resolution(name, tuple(cnames), error=f"more than {MAX_CNAMES} CNAMEs (a loop?)")


async def addresses_of(
    resolver: IResolver, names: Iterable[str], timeout: Sequence[int]
) -> set[str]:
    """All addresses the `names` resolve to (best effort: failures give nothing)."""
    found: set[str] = set()
    for name in names:
        answers, _ = await _query(resolver, name, timeout)
        found.update(_addresses(answers))
    return found


async def _query(
    resolver: IResolver, name: str, timeout: Sequence[int]
) -> tuple[list[Any], list[Failure]]:
    lookups: list[Deferred[Any]] = [
        maybeDeferred(resolver.lookupAddress, name, timeout),
        maybeDeferred(resolver.lookupIPV6Address, name, timeout),
    ]
    results = await DeferredList(lookups, consumeErrors=True)
    answers: list[Any] = []
    failures: list[Failure] = []
    for ok, value in results:
        if ok:
            answers.extend(value[0])
        else:
            failures.append(value)
    return answers, failures


def _addresses(answers: Iterable[Any]) -> tuple[str, ...]:
    v4: list[str] = []
    v6: list[str] = []
    for rr in answers:
        if rr.type == dns.A:
            v4.append(rr.payload.dottedQuad())
        elif rr.type == dns.AAAA:
            v6.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
    return tuple(dict.fromkeys(v4 + v6))


def _describe(failure: Failure, timeout: Sequence[int]) -> str:
    if failure.check(dns_error.DNSQueryTimeoutError, DeferredTimeout, DNSLookupError):
        return f"no answer within {sum(timeout):g} s"
    if failure.check(dns_error.DNSServerError):
        return "the DNS server failed (SERVFAIL)"
    if failure.check(dns_error.DNSQueryRefusedError):
        return "the DNS server refused the query"
    text = failure.getErrorMessage()
    name = type(failure.value).__name__
    return f"{name}: {text}" if text else name


def _is_sparkpost(name: str, hosts: Iterable[str]) -> bool:
    return any(name == h or name.endswith("." + h) for h in hosts)


def judge(
    resolution: Resolution,
    expected: frozenset[str],
    expected_given: bool,
    sparkpost_addresses: frozenset[str] = frozenset(),
    sparkpost_hosts: Iterable[str] = (*SPARKPOST_HOSTS, *SPARKPOST_SUFFIXES),
) -> Finding:
    """The verdict on where `resolution.name` points (one finding)."""
    name = resolution.name
    here = ", ".join(sorted(expected, key=_sort_key)) or "this host's address"
    create = f"create an A/AAAA record pointing here ({here}), or a CNAME to this host's name"
    chain = "".join(f" -> CNAME {c}" for c in resolution.cnames)
    if resolution.nxdomain:
        return Finding(Level.FAIL, "dns", f"{name}{chain}: no such domain (NXDOMAIN)", create)
    if resolution.error is not None:
        return Finding(
            Level.FAIL,
            "dns",
            f"{name}{chain}: DNS lookup failed ({resolution.error})",
            "check the DNS servers in /etc/resolv.conf (or --resolver) and try again",
        )
    sparkpost = next((c for c in resolution.cnames if _is_sparkpost(c, sparkpost_hosts)), None)
    if sparkpost is None and set(resolution.addresses) & sparkpost_addresses:
        sparkpost = "SparkPost's addresses"
    if sparkpost is not None:
        shown = ", ".join(resolution.addresses)
        return Finding(
            Level.FAIL,
            "dns",
            f"{name}{chain}{' -> ' + shown if shown else ''}: still points at SparkPost "
            f"({sparkpost}), not at this host",
            f"once this host answers for {name} (check with --connect-to), point the domain "
            f"here ({here}) and keep port 80 open",
        )
    if not resolution.addresses:
        return Finding(Level.FAIL, "dns", f"{name}{chain}: no A or AAAA record", create)
    shown = ", ".join(
        f"{a} ({'this host' if a in expected else 'not this host'})" for a in resolution.addresses
    )
    text = f"{name}{chain} -> {shown}"
    if not expected:
        return Finding(
            Level.WARN,
            "dns",
            f"{name}{chain} -> {', '.join(resolution.addresses)}: cannot tell whether that is "
            "this host (no non-loopback interface address found)",
            "pass --expect-address with this host's public address",
        )
    elsewhere = [a for a in resolution.addresses if a not in expected]
    if not elsewhere:
        return Finding(Level.OK, "dns", text)
    nat = "" if expected_given else (
        "; if this host is behind NAT or a load balancer, pass --expect-address PUBLIC_IP"
    )
    if len(elsewhere) < len(resolution.addresses):
        return Finding(
            Level.FAIL,
            "dns",
            text,
            f"remove the records for {', '.join(elsewhere)}: part of the traffic goes there{nat}",
        )
    return Finding(Level.FAIL, "dns", text, f"point the domain here ({here}){nat}")


def _sort_key(address: str) -> tuple[int, str]:
    return (ipaddress.ip_address(address).version, address)


__all__ = [
    "SPARKPOST_HOSTS",
    "SPARKPOST_SUFFIXES",
    "Resolution",
    "addresses_of",
    "judge",
    "resolve",
]
