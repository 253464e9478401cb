"""Running every check in order and reporting each finding as soon as it is known.

Order: the upstream once, then per domain DNS, the upstream asked directly for the domain (the
`/f/` probe with the domain as Host; skipped when the upstream is unreachable), the ports, the
certificate and the `/f/` probes through the proxy, each compared with the upstream's answer.
Where a domain's own checks connect: `--connect-to` if given, else the domain's resolved address
(one of this host's, if any); when DNS does not point here those checks are skipped rather than
run against someone else's server. Any unexpected error in a check becomes a FAIL line.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver

from trackingproxy.checks.dnscheck import (
    SPARKPOST_HOSTS,
    SPARKPOST_SUFFIXES,
    Resolution,
    addresses_of,
    judge,
    resolve,
)
from trackingproxy.checks.findings import Finding, Level
from trackingproxy.checks.routing import Answer, judge_probe
from trackingproxy.checks.served import port_answers, probe, served_certificate
from trackingproxy.checks.settings import CheckSettings
from trackingproxy.checks.upstream import UpstreamProbe
from trackingproxy.domains import is_ip_literal


@frozen
class Collaborators:
    """The side effects: `reactor` (TCP, time; also the clock) and the DNS `resolver`."""

    reactor: Any
    resolver: IResolver


def run_checks(
    settings: CheckSettings, parts: Collaborators, report: Callable[[Finding], None]
) -> Deferred[list[Finding]]:
    """Run all checks; `report` gets each finding at once; fires with all of them."""
    return Deferred.fromCoroutine(_Run(settings, parts, report).all())


class _Run:
    def __init__(
        self, settings: CheckSettings, parts: Collaborators, report: Callable[[Finding], None]
    ) -> None:
        self.s = settings
        self.reactor = parts.reactor
        self.resolver = parts.resolver
        self.report = report
        self.findings: list[Finding] = []
        third = settings.timeout / 3
        self.dns_timeout = (max(1, int(third)), max(1, int(2 * third)))

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        self.report(finding)
        return finding

    async def guarded(
        self, kind: str, subject: str, step: Callable[[], Awaitable[list[Finding]]]
    ) -> list[Finding]:
        try:
            found = await step()
        except Exception as e:
            found = [Finding(Level.FAIL, kind, f"{subject}: the check itself failed ({e!r})")]
        for finding in found:
            self.add(finding)
        return found

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    async def all(self) -> list[Finding]:
        s = self.s
        upstream = UpstreamProbe(
            self.reactor, self.resolver, s.upstream, s.upstream_ca_bundle, s.timeout
        )
        try:
            await self.guarded("upstream", s.upstream.url, lambda: _one(upstream.reachable()))
            hosts = list(SPARKPOST_HOSTS)
            if not is_ip_literal(s.upstream.host) and s.upstream.host not in hosts:
                hosts.append(s.upstream.host)
            try:
                sparkpost = frozenset(await addresses_of(self.resolver, hosts, self.dns_timeout))
            except Exception:
                sparkpost = frozenset()
            for domain in s.domains:
                await self.domain(domain, sparkpost, (*hosts, *SPARKPOST_SUFFIXES), upstream)
        finally:
            await upstream.close()
        return self.findings

    async def domain(
        self,
        domain: str,
        sparkpost: frozenset[str],
        hosts: tuple[str, ...],
        upstream: UpstreamProbe,
    ) -> None:
        s = self.s
        resolution = Resolution(domain)
        verdict: list[Finding] = []

        async def dns_step() -> list[Finding]:
            nonlocal resolution
            resolution = await resolve(self.resolver, domain, self.dns_timeout, stop_at=hosts)
            return [judge(resolution, s.expected, s.expected_given, sparkpost, hosts)]

        verdict = await self.guarded("dns", domain, dns_step)
        direct: Answer | None = None

        async def route_step() -> list[Finding]:
            nonlocal direct
            routed = await upstream.route(domain, s.probe_path)
            direct = routed.answer
            return [routed.finding]

        if upstream.ready:
            await self.guarded("upstream", domain, route_step)
        address = self.target_address(resolution, verdict[0])
        if address is None:
            if resolution.error is not None:
                why = "the DNS lookup failed"
            elif resolution.nxdomain or not (resolution.addresses or resolution.cnames):
                why = "the domain has no address"
            else:
                why = "DNS does not point here"
            self.add(
                Finding(
                    Level.SKIP,
                    "port",
                    f"{domain}: ports, certificate and probe not checked: {why}",
                    "fix DNS, or pass --connect-to THIS_HOST_IP to check this host first",
                )
            )
            return
        for port, role in ((s.http_port, "http"), (s.https_port, "https")):
            if port is None:
                self.add(Finding(Level.SKIP, "port", f"{domain}: {role} is disabled ('none')"))
                continue
            answered = await self.guarded(
                "port",
                domain,
                lambda port=port, role=role: _one(  # type: ignore[misc]
                    port_answers(self.reactor, domain, address, port, s.timeout, role)
                ),
            )
            if answered[0].level is not Level.OK:
                continue
            if role == "https":
                found = await self.guarded(
                    "cert",
                    domain,
                    lambda port=port: served_certificate(  # type: ignore[misc]
                        self.reactor,
                        domain,
                        address,
                        port,
                        s.timeout,
                        [None, s.ca_bundle] if s.ca_bundle else [None],
                        self.now(),
                        s.warn_days,
                    ),
                )
                if any("handshake" in f.text for f in found if f.level is Level.FAIL):
                    continue
            await self.guarded(
                "probe",
                domain,
                lambda port=port, role=role: self.probe(  # type: ignore[misc]
                    domain, role, address, port, direct
                ),
            )

    async def probe(
        self, domain: str, scheme: str, address: str, port: int, direct: Answer | None
    ) -> list[Finding]:
        """The `/f/` probe through the proxy, judged against the upstream's direct answer."""
        s = self.s
        got = await probe(self.reactor, domain, scheme, address, port, s.timeout, s.probe_path)
        if isinstance(got, Finding):
            return [got]
        url = f"{scheme}://{domain}{s.probe_path}"
        return [judge_probe(url, domain, got, direct, s.upstream)]

    def target_address(self, resolution: Resolution, verdict: Finding) -> str | None:
        if self.s.connect_to is not None:
            return self.s.connect_to
        if verdict.level is Level.WARN and resolution.addresses:
            return resolution.addresses[0]
        here = [a for a in resolution.addresses if a in self.s.expected]
        return here[0] if here else None


async def _one(step: Awaitable[Finding]) -> list[Finding]:
    return [await step]


__all__ = ["Collaborators", "run_checks"]
