"""The facts the admin endpoints report, gathered from the live objects on demand.

``StatusSource`` reads the served certificates (the SNI map), the issuing service's renewal
state, the listeners and the request counters, and turns them into readiness (``ready``), typed
per-domain facts (``domains``, used by the Prometheus collector) and one JSON-able snapshot
(``snapshot``, served as /status and rendered as the HTML page). A snapshot can be narrowed
to one page of a search (``trackingproxy.admin.listing``): readiness and the problems always
cover every domain, the JSON of each domain is built only for the page. Certificate facts are
read from the certificate once and kept while it is served (x509 parsing was most of the cost
of a scrape or page view), so gathering 10,000 domains again takes milliseconds.
With ACME the snapshot has the order queue too (``acme_queue``: one ``queue_summary`` of the
issuer per snapshot; each domain's place and estimated start come with its renewal state).
``RateTracker`` samples the request totals on the clock so the page can show recent rates.
The request numbers are those of every process (``--workers``: ``ProxyMetrics.total``), and
``processes`` breaks them down per process. Nothing here runs per request.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall

from trackingproxy.acme.issuer import RenewalState
from trackingproxy.acme.queue import QueueSummary
from trackingproxy.admin.listing import DomainQuery, find_problems, select
from trackingproxy.admin.metrics import KINDS, ProxyMetrics
from trackingproxy.tls.certificates import LoadedCertificate

__all__ = [
    "CertificateFacts",
    "CertificateSource",
    "DomainFacts",
    "Listener",
    "RateTracker",
    "RenewalSource",
    "StatusSource",
]


class CertificateSource(Protocol):
    """What is served per domain (``trackingproxy.tls.sni.SNIContextMap``)."""

    @property
    def domains(self) -> tuple[str, ...]: ...

    def certificate_for(self, name: str) -> LoadedCertificate | None: ...


class RenewalSource(Protocol):
    """The issuing service (``trackingproxy.acme.issuer.IssuingService``)."""

    def renewal_states(self) -> Mapping[str, RenewalState]: ...

    def queue_summary(self) -> QueueSummary: ...


class Listener(Protocol):
    """A listening service (``trackingproxy.ops.listeners.ListenerService``)."""

    option: str
    description: str
    port: IListeningPort | None


@frozen
class CertificateFacts:
    issuer: str
    serial: str
    names: tuple[str, ...]
    source: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    @classmethod
    def of(cls, cert: LoadedCertificate) -> CertificateFacts:
        return cls(
            issuer=cert.issuer,
            serial=cert.serial_hex,
            names=cert.names,
            source=cert.source,
            not_before=cert.not_before,
            not_after=cert.not_after,
        )


@frozen
class DomainFacts:
    name: str
    certificate: CertificateFacts | None
    renewal: RenewalState | None  # None: not managed by ACME (a certificate you brought)


def _iso(when: datetime.datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="seconds")


def _ts(when: datetime.datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def _queue_json(summary: QueueSummary) -> dict[str, Any]:
    """The order queue as a whole (``QueueSummary``'s fields, times as ISO 8601 UTC)."""
    return {
        "length": summary.length,
        "running": summary.running,
        "paused_until": _iso(summary.paused_until),
        "pause_reason": summary.pause_reason,
        "orders_last_hour": summary.orders_last_hour,
        "max_orders_per_hour": summary.max_orders_per_hour,
        "max_concurrent": summary.max_concurrent,
        "next_start": _iso(summary.next_start),
        "drained_at": _iso(summary.drained_at),
    }


def _address(port: IListeningPort | None) -> str | None:
    if port is None:
        return None
    addr = port.getHost()
    host, number = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is None or number is None:
        return str(addr)
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


class RateTracker:
    """Samples the request totals by kind every ``interval`` seconds, keeping ``window``
    seconds of history, and answers per-second rates over the last minute / five minutes."""

    def __init__(
        self,
        clock: IReactorTime,
        totals: Callable[[], Mapping[str, int]],
        interval: float = 10.0,
        window: float = 300.0,
    ) -> None:
        self._clock = clock
        self._totals = totals
        self._interval = interval
        self._samples: deque[tuple[float, dict[str, int]]] = deque(
            maxlen=int(window / interval) + 2
        )
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> None:
        self._samples.append((self._clock.seconds(), dict(self._totals())))

    def rates(self, seconds: float) -> dict[str, float]:
        """Requests per second by kind over (about) the last ``seconds``."""
        now = self._clock.seconds()
        current = self._totals()
        base: tuple[float, Mapping[str, int]] | None = None
        for when, totals in self._samples:  # oldest first: the last one at least `seconds` old
            if now - when >= seconds or base is None:
                base = (when, totals)
        if base is None or now <= base[0]:
            return dict.fromkeys(KINDS, 0.0)
        span = now - base[0]
        return {k: round((current.get(k, 0) - base[1].get(k, 0)) / span, 4) for k in KINDS}


class StoreHealthView(Protocol):
    """The shared store's reachability (``trackingproxy.store.health.StoreHealth``)."""

    @property
    def up(self) -> bool | None: ...

    @property
    def last_sync(self) -> float | None: ...


@frozen
class ClusterFacts:
    """Which replica this is and, with ``--store``, the shared store (password masked)."""

    node_id: str
    store: str | None = None  # the masked URL; None: the state directory only
    health: StoreHealthView | None = None

    def json(self) -> dict[str, Any]:
        up = self.health.up if self.health is not None else None
        return {
            "node_id": self.node_id,
            "store": self.store,
            "store_up": up,
            "store_last_sync": self.health.last_sync if self.health is not None else None,
        }


READY_REASONS = 20  # domains named in /readyz's reasons; the rest are counted


class _Validity(Protocol):
    """When a certificate is valid (``LoadedCertificate`` or its ``CertificateFacts``)."""

    @property
    def not_before(self) -> datetime.datetime: ...

    @property
    def not_after(self) -> datetime.datetime: ...


def _certificate_reasons(
    served: Iterable[tuple[str, _Validity | None]], now: datetime.datetime
) -> list[str]:
    """Why the domains in ``served`` (name, certificate or None) are not ready: how many have
    a certificate, the first ``READY_REASONS`` without one (the rest counted where the last
    one is), and every certificate expired or not yet valid. One pass, nothing kept per
    domain (10,000 kept tuples would wake the garbage collector on every probe)."""
    reasons: list[str] = []
    total = missing = 0
    rest_at = 0  # where "and N more without one" goes: after the last name without one
    for name, cert in served:
        total += 1
        if cert is None:
            missing += 1
            if missing <= READY_REASONS:
                reasons.append(f"{name}: no certificate yet")
            rest_at = len(reasons)
        elif cert.not_after <= now:
            reasons.append(f"{name}: the certificate expired at {_iso(cert.not_after)}")
        elif cert.not_before > now:
            reasons.append(f"{name}: the certificate is valid only from {_iso(cert.not_before)}")
    if missing > READY_REASONS:
        reasons.insert(rest_at, f"and {missing - READY_REASONS} more without one")
    if missing:  # how far loading or issuing has come, then the first few names
        reasons.insert(0, f"{total - missing} of {total} domains have a certificate")
    return reasons


class StatusSource:
    """Readiness, per-domain facts and the JSON snapshot, read from the running objects."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        certificates: CertificateSource,
        https_enabled: bool,
        listeners: Callable[[], Iterable[Listener]],
        renewals: Callable[[], RenewalSource | None],
        metrics: ProxyMetrics,
        rates: RateTracker | None = None,
        in_flight: Callable[[], int] | None = None,
        started: float | None = None,
        cluster: ClusterFacts | None = None,
        processes: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self._clock = clock
        self._certificates = certificates
        self._https = https_enabled
        self._listeners = listeners
        self._renewals = renewals
        self.metrics = metrics
        self._rates = rates
        self._in_flight = in_flight
        self._started = clock.seconds() if started is None else started
        self.cluster = cluster
        # --outage-mode replay: the outage parts' facts (mode, upstream state, journal size)
        self.outage: Callable[[], dict[str, Any]] | None = None
        self._processes = processes  # --workers: one row per process
        # id(certificate) -> (the certificate, its facts), for the certificates served now
        self._facts: dict[int, tuple[LoadedCertificate, CertificateFacts]] = {}

    def requests_in_flight(self) -> int | None:
        return self._in_flight() if self._in_flight is not None else None

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def domains(self) -> list[DomainFacts]:
        renewals = self._renewals()
        states = renewals.renewal_states() if renewals is not None else {}
        known, facts = self._facts, {}
        out = []
        for name in self._certificates.domains:
            cert = self._certificates.certificate_for(name)
            if cert is None:
                out.append(DomainFacts(name, None, states.get(name)))
                continue
            entry = known.get(id(cert))
            if entry is None or entry[0] is not cert:
                entry = (cert, CertificateFacts.of(cert))
            facts[id(cert)] = entry
            out.append(DomainFacts(name, entry[1], states.get(name)))
        self._facts = facts
        return out

    def ready(self, domains: list[DomainFacts] | None = None) -> tuple[bool, list[str]]:
        """Ready: every listener is listening and (with HTTPS) every domain has a certificate
        that has not expired. The reasons say what is missing, one per line.

        Without ``domains`` (/readyz, polled every few milliseconds during start) only the
        served certificates' validity is read, one ``certificate_for`` a domain: no facts, no
        renewal states (about 3 ms for 10,000 domains instead of 70). Same answer either way.
        """
        reasons = [
            f"{listener.option} {listener.description} is not listening"
            for listener in self._listeners()
            if listener.port is None
        ]
        if self._https:
            served: Iterable[tuple[str, _Validity | None]]
            if domains is None:
                certificate_for = self._certificates.certificate_for
                served = ((name, certificate_for(name)) for name in self._certificates.domains)
            else:
                served = ((facts.name, facts.certificate) for facts in domains)
            reasons.extend(_certificate_reasons(served, self.now()))
        return not reasons, reasons

    def snapshot(
        self,
        query: DomainQuery | None = None,
        *,
        problem_limit: int | None = None,
        clamp: bool = False,
    ) -> dict[str, Any]:
        """Everything as JSON-able values (times as ISO 8601 UTC and as epoch seconds).

        ``domains`` holds the page of domains ``query`` selects (default: all of them);
        ``listing`` says which page of how many that is. ``problems`` ranks the domains that
        need attention (all of them, or the first ``problem_limit``; ``problem_count`` is how
        many there are); ``clamp`` turns a page past the last into the last one.
        ``acme_queue`` is the order queue (None without an issuer: ``--no-acme``)."""
        now = self._clock.seconds()
        domains = self.domains()
        ready, reasons = self.ready(domains)
        problems = find_problems(domains, self.now(), self._https)
        listing = select(domains, problems, query or DomainQuery(), clamp=clamp)
        m = self.metrics
        per_domain = m.refresh_per_domain()
        by_domain = m.totals_by_domain()
        total = m.total()
        shown = problems if problem_limit is None else problems[:problem_limit]
        renewals = self._renewals()
        return {
            "time": now,
            "uptime_seconds": round(now - self._started, 3),
            "ready": ready,
            "not_ready_reasons": reasons,
            "cluster": self.cluster.json() if self.cluster is not None else None,
            "acme_queue": None if renewals is None else _queue_json(renewals.queue_summary()),
            "outage": self.outage() if self.outage is not None else {"mode": "off"},
            "https": self._https,
            "listeners": [
                {
                    "option": listener.option,
                    "endpoint": listener.description,
                    "listening": listener.port is not None,
                    "address": _address(listener.port),
                }
                for listener in self._listeners()
            ],
            "problems": [p.json(now) for p in shown],
            "problem_count": len(problems),
            "listing": listing.json(),
            "domains": [
                self._domain_json(d, now, by_domain if per_domain else None)
                for d in listing.domains
            ],
            "requests": {
                "total": m.totals_by_kind(),
                "per_second_1m": self._rates.rates(60) if self._rates else None,
                "per_second_5m": self._rates.rates(300) if self._rates else None,
                "unknown_hosts": by_domain.get("other", dict.fromkeys(KINDS, 0)),
                "in_flight": self.requests_in_flight(),
                "per_domain": per_domain,
            },
            "connections": dict(total.connections),
            "upstream": {
                "requests": total.upstream_requests,
                "errors": dict(total.upstream_errors),
            },
            "processes": self._processes() if self._processes is not None else None,
        }

    @staticmethod
    def _domain_json(
        d: DomainFacts, now: float, by_domain: Mapping[str, Mapping[str, int]] | None
    ) -> dict[str, Any]:
        """One domain's facts; ``requests`` is None while counters are not per domain
        (``by_domain`` None)."""
        cert = d.certificate
        renewal = d.renewal
        return {
            "name": d.name,
            "certificate": None
            if cert is None
            else {
                "issuer": cert.issuer,
                "serial": cert.serial,
                "names": list(cert.names),
                "source": cert.source,
                "not_before": _iso(cert.not_before),
                "not_after": _iso(cert.not_after),
                "not_before_ts": _ts(cert.not_before),
                "not_after_ts": _ts(cert.not_after),
                "expires_in_seconds": round(cert.not_after.timestamp() - now, 3),
            },
            "renewal": None
            if renewal is None
            else {
                "next_attempt": _iso(renewal.next_attempt),
                "next_attempt_ts": _ts(renewal.next_attempt),
                "next_attempt_in_seconds": None
                if renewal.next_attempt is None
                else max(0.0, round(renewal.next_attempt.timestamp() - now, 3)),
                "ordering": renewal.ordering,
                "consecutive_failures": renewal.failures,
                "last_error": renewal.last_error,
                "last_error_at": _iso(renewal.last_error_at),
                "orders": dict(renewal.orders),
                "queue_position": renewal.queue_position,
                "queue_eta": _iso(renewal.queue_eta),
            },
            "requests": None
            if by_domain is None
            else dict(by_domain.get(d.name, dict.fromkeys(KINDS, 0))),
        }
