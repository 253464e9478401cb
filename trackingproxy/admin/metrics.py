"""Prometheus metrics of the proxy: one registry of our own and the hooks on the hot path.

Per finished request the work is one dict lookup and one integer increment: the slot for a
(domain, kind, status class, protocol) combination is resolved once and cached, and the
``trackingproxy_requests_total`` series are built from the slots at scrape time. A host that is
not a configured domain is counted as ``domain="other"`` (and 421 answers never carry a
domain), so clients cannot create label values.

Request counters carry a ``domain`` label only while ``--metrics-per-domain`` says so (``on``;
``auto``: while fewer than ``PER_DOMAIN_AUTO_LIMIT`` domains are configured, evaluated at every
scrape and status read and whenever a new slot appears, so a reload that crosses the limit
switches). Otherwise slots are kept per (configured or not, kind, status, protocol): a few
dozen, whatever the number of domains. A switch retires the old slots into plain totals, so
the status page's totals and rates stay monotonic; the exported series start anew.

Every exported series is built at scrape time from ``ProcessCounts``: this process's own
(``ProxyMetrics.counts``) plus, with ``--workers``, those the other processes reported
(``ProxyMetrics.others``, see ``trackingproxy.admin.workers``), so ``/metrics``, ``/status`` and
the page add up every process the same way. Certificate and renewal gauges are not kept here:
they are read from the live objects at scrape time (``trackingproxy.admin.collector``).
"""

# -*- test-case-name: tests.admin.test_metrics -*-

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, Final

from attrs import define, field, frozen
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from trackingproxy.proxy.forward import Upstream
from trackingproxy.server.listener import ListenerObserver
from trackingproxy.upstream.errors import CAUSES, UpstreamError
from trackingproxy.upstream.http1 import UpstreamResponse

__all__ = [
    "ERROR_CAUSES",
    "KINDS",
    "LATENCY_BUCKETS",
    "PER_DOMAIN_AUTO_LIMIT",
    "PER_DOMAIN_MODES",
    "InstrumentedUpstream",
    "MetricHooks",
    "ProcessCounts",
    "ProxyMetrics",
    "SiteMetrics",
    "add_up",
]

KINDS: Final = ("open", "click", "other")
ERROR_CAUSES: Final = (*CAUSES, "internal")
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PER_DOMAIN_MODES: Final = ("auto", "on", "off")
PER_DOMAIN_AUTO_LIMIT: Final = 100  # auto: request counters per domain below this many domains
CONFIGURED: Final = "*"  # the slot domain of every configured domain while not per domain
_KIND_BY_PREFIX: Final = {b"/q/": "open", b"/f/": "click"}
_STATUS_CLASS: Final = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_REQUESTS_HELP: Final = (
    "Requests answered, by domain (with --metrics-per-domain; other: not a configured "
    "domain), kind (open: /q/, click: /f/, other), status class, protocol (h1, h2) and scheme "
    "(http, https)."
)
RequestKey = tuple[str, str, str, str, str]  # scheme, domain, kind, status class, protocol


@frozen
class ProcessCounts:
    """What one process has counted, as plain values: the counters (they only grow while the
    process lives) and two gauges (``connections`` and ``in_flight``: open now).

    ``requests`` maps (scheme, slot domain, kind, status class, protocol) to requests answered;
    ``retired`` holds what per-domain switches retired (``other`` or ``*`` -> kind -> count);
    ``latency`` is the count per bucket of ``LATENCY_BUCKETS`` and a last one for slower
    (not cumulative), ``latency_sum`` their seconds.
    """

    requests: Mapping[RequestKey, int] = field(factory=dict)
    retired: Mapping[str, Mapping[str, int]] = field(factory=dict)
    upstream_requests: int = 0
    upstream_errors: Mapping[str, int] = field(factory=dict)
    latency: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS) + 1)
    latency_sum: float = 0.0
    connections: Mapping[str, int] = field(factory=dict)
    in_flight: int = 0

    def requests_total(self) -> int:
        """Every request answered (live slots and retired ones)."""
        return sum(self.requests.values()) + sum(
            sum(kinds.values()) for kinds in self.retired.values()
        )


def add_up(processes: Iterable[ProcessCounts], gauges: bool = True) -> ProcessCounts:
    """The sum of ``processes`` (without ``gauges``: their counters only, e.g. to keep what a
    process that ended had counted)."""
    requests: dict[RequestKey, int] = {}
    retired: dict[str, dict[str, int]] = {}
    errors = dict.fromkeys(ERROR_CAUSES, 0)
    latency = [0] * (len(LATENCY_BUCKETS) + 1)
    connections: dict[str, int] = {}
    sent = in_flight = 0
    seconds = 0.0
    for p in processes:
        for key, n in p.requests.items():
            requests[key] = requests.get(key, 0) + n
        for group, kinds in p.retired.items():
            into = retired.setdefault(group, dict.fromkeys(KINDS, 0))
            for kind, n in kinds.items():
                into[kind] += n
        for cause, n in p.upstream_errors.items():
            errors[cause] = errors.get(cause, 0) + n
        latency = [a + b for a, b in zip(latency, p.latency, strict=True)]
        sent += p.upstream_requests
        seconds += p.latency_sum
        if gauges:
            for scheme, n in p.connections.items():
                connections[scheme] = connections.get(scheme, 0) + n
            in_flight += p.in_flight
    return ProcessCounts(requests, retired, sent, errors, tuple(latency), seconds, connections,
                         in_flight)


class _Latency:
    """The upstream response-time histogram: one increment per observation."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: the first bound >= it
        self.sum += seconds


@define
class _Slot:
    """One label combination and its count. ``domain`` is a configured domain, ``other``, or
    ``CONFIGURED`` (any configured domain, while counters are not per domain)."""

    domain: str
    kind: str
    status: str
    protocol: str
    count: int = 0


class SiteMetrics(ListenerObserver):
    """The counters of one listener (``scheme`` is ``http`` or ``https``).

    @ivar open_connections: client connections open now.
    @ivar per_domain: whether new slots are per domain (set by ``ProxyMetrics``).
    """

    def __init__(self, metrics: ProxyMetrics, scheme: str, per_domain: bool) -> None:
        self._metrics = metrics
        self.scheme = scheme
        self._slots: dict[tuple[str, str, int, bool], _Slot] = {}
        self.open_connections = 0
        self.per_domain = per_domain

    # -- hot path -------------------------------------------------------------------------
    def request_done(self, request: Any) -> None:
        """Count a finished request (called from the Site's access-log hook)."""
        host = raw = request.outcome.host
        if not self.per_domain:
            host = "other" if raw == "-" else CONFIGURED
        kind = _KIND_BY_PREFIX.get(request.uri[:3], "other")
        status = request.code // 100
        h2 = request.clientproto == b"HTTP/2"
        slot = self._slots.get((host, kind, status, h2))
        if slot is None:
            slot = self._resolve(raw, kind, status, h2)
        slot.count += 1

    def connection_opened(self) -> None:
        self.open_connections += 1

    def connection_closed(self) -> None:
        self.open_connections -= 1

    # -- once per label combination -------------------------------------------------------
    def _resolve(self, raw: str, kind: str, status: int, h2: bool) -> _Slot:
        """The slot for a new combination (``raw``: the request's host, ``-`` for none).
        Re-evaluates ``--metrics-per-domain`` first: a reload may have crossed the limit."""
        if self._metrics.refresh_per_domain():
            host = raw
            domain = raw if raw in self._metrics.domains() else "other"
        else:
            host = domain = "other" if raw == "-" else CONFIGURED
        key = (host, kind, status, h2)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(
                domain, kind, _STATUS_CLASS.get(status, "other"), "h2" if h2 else "h1"
            )
        return slot

    def retire(self, per_domain: bool) -> list[_Slot]:
        """Drop every slot (their counts are the caller's) and count per domain or not."""
        slots = list(self._slots.values())
        self._slots.clear()
        self.per_domain = per_domain
        return slots

    def slots(self) -> list[_Slot]:
        return list(self._slots.values())


class InstrumentedUpstream:
    """Wraps the upstream client: counts requests, times the response headers, and counts
    failures by their cause (``UpstreamError.cause``; anything else is ``internal``)."""

    def __init__(self, upstream: Upstream, clock: IReactorTime, metrics: ProxyMetrics) -> None:
        self._upstream = upstream
        self._clock = clock
        self._metrics = metrics

    def request(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> Deferred[UpstreamResponse]:
        m = self._metrics
        m.upstream_count += 1
        started = self._clock.seconds()
        d = self._upstream.request(method, path, headers, body)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(started,))
        return d

    def abandon(self, response: UpstreamResponse) -> None:
        self._upstream.abandon(response)

    def _answered(self, response: UpstreamResponse, started: float) -> UpstreamResponse:
        self._metrics.upstream_latency.observe(self._clock.seconds() - started)
        return response

    def _failed(self, reason: Failure) -> Failure:
        err = reason.value
        self._metrics.upstream_error(err.cause if isinstance(err, UpstreamError) else "internal")
        return reason


class _RequestCollector(Collector):
    """``trackingproxy_requests_total`` from the slots, with or without the domain label."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily("trackingproxy_requests", _REQUESTS_HELP, labels=())]

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        per_domain = m.refresh_per_domain()
        labels: tuple[str, ...] = ("kind", "status", "protocol", "scheme")
        if per_domain:
            labels = ("domain", *labels)
        counts: dict[tuple[str, ...], int] = {}
        for (scheme, domain, kind, status, protocol), n in m.total().requests.items():
            key: tuple[str, ...] = (kind, status, protocol, scheme)
            if per_domain:
                if domain == CONFIGURED:  # a worker that has not switched yet (for a second)
                    continue
                key = (domain, *key)
            counts[key] = counts.get(key, 0) + n
        family = CounterMetricFamily("trackingproxy_requests", _REQUESTS_HELP, labels=labels)
        for key, count in counts.items():
            family.add_metric(key, float(count))
        yield family


class _SummedCollector(Collector):
    """Open connections and the upstream series, added up over every process."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families(ProcessCounts()))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._metrics.total())

    @staticmethod
    def _families(total: ProcessCounts) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "trackingproxy_open_connections", "Client connections currently open, by scheme.",
            labels=("scheme",),
        )
        for scheme, n in total.connections.items():
            gauge.add_metric((scheme,), float(n))
        yield gauge
        yield CounterMetricFamily(
            "trackingproxy_upstream_requests",
            "Requests sent (or attempted) to the upstream.",
            value=float(total.upstream_requests),
        )
        cumulative, so_far = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), total.latency, strict=True):
            so_far += n
            cumulative.append((floatToGoString(bound), float(so_far)))
        yield HistogramMetricFamily(
            "trackingproxy_upstream_response_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=cumulative,
            sum_value=total.latency_sum,
        )
        errors = CounterMetricFamily(
            "trackingproxy_upstream_errors",
            "Upstream requests that got no response, by cause (dns, connect, tls, timeout, "
            "reset, protocol, internal).",
            labels=("cause",),
        )
        for cause in ERROR_CAUSES:
            errors.add_metric((cause,), float(total.upstream_errors.get(cause, 0)))
        yield errors


class ProxyMetrics:
    """The registry (not the global one) with every metric the proxy updates as it runs.

    ``domains`` returns the configured domains (re-read when a new label combination appears,
    so domains added by a reload get their own label; its size decides ``auto``).
    ``per_domain`` is ``--metrics-per-domain``: ``on``, ``off`` or ``auto``.

    @ivar others: the other processes' counts (``--workers``: set by ``WorkerMetrics``).
    @ivar local_in_flight: this process's requests in flight (set with the admin service).
    """

    def __init__(
        self,
        domains: Callable[[], Collection[str]],
        *,
        per_domain: str = "auto",
        process_metrics: bool = True,
    ) -> None:
        if per_domain not in PER_DOMAIN_MODES:
            raise ValueError(f"per_domain must be one of {PER_DOMAIN_MODES}, not {per_domain!r}")
        self.domains = domains
        self.per_domain_mode = per_domain
        self.registry = CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        r.register(_RequestCollector(self))
        r.register(_SummedCollector(self))
        self.upstream_latency = _Latency()
        self.error_counts = dict.fromkeys(ERROR_CAUSES, 0)
        self.upstream_count = 0
        self.sites: dict[str, SiteMetrics] = {}
        self._per_domain = self._wanted()
        # counts of slots retired by a switch: (configured or "other") -> kind -> requests
        self._retired: dict[str, dict[str, int]] = {}
        self.others: Callable[[], Iterable[ProcessCounts]] = tuple
        self.local_in_flight: Callable[[], int] | None = None

    def _wanted(self) -> bool:
        mode = self.per_domain_mode
        if mode == "auto":
            return len(self.domains()) < PER_DOMAIN_AUTO_LIMIT
        return mode == "on"

    @property
    def per_domain(self) -> bool:
        """Whether request counters are kept per domain now (as of the last evaluation)."""
        return self._per_domain

    def refresh_per_domain(self) -> bool:
        """Evaluate ``--metrics-per-domain`` against the current domains; on a change retire
        every slot (their counts stay in the totals by kind) and count the new way."""
        wanted = self._wanted()
        if wanted != self._per_domain:
            self._per_domain = wanted
            for site in self.sites.values():
                for slot in site.retire(wanted):
                    group = "other" if slot.domain == "other" else CONFIGURED
                    totals = self._retired.setdefault(group, dict.fromkeys(KINDS, 0))
                    totals[slot.kind] += slot.count
        return wanted

    def site(self, scheme: str) -> SiteMetrics:
        """The hooks for the listener serving ``scheme`` (one object per scheme)."""
        site = self.sites.get(scheme)
        if site is None:
            site = self.sites[scheme] = SiteMetrics(self, scheme, self._per_domain)
        return site

    def instrument(self, upstream: Upstream, clock: IReactorTime) -> InstrumentedUpstream:
        return InstrumentedUpstream(upstream, clock, self)

    def upstream_error(self, cause: str) -> None:
        if cause not in self.error_counts:
            cause = "internal"
        self.error_counts[cause] += 1

    # -- reading (scrapes, status page) --------------------------------------------------
    def counts(self) -> ProcessCounts:
        """This process's counts now (the caller refreshes ``per_domain`` first if it cares)."""
        requests: dict[RequestKey, int] = {}
        for scheme, site in self.sites.items():
            for s in site.slots():
                key = (scheme, s.domain, s.kind, s.status, s.protocol)
                requests[key] = requests.get(key, 0) + s.count
        return ProcessCounts(
            requests=requests,
            retired={group: dict(kinds) for group, kinds in self._retired.items()},
            upstream_requests=self.upstream_count,
            upstream_errors=dict(self.error_counts),
            latency=tuple(self.upstream_latency.counts),
            latency_sum=self.upstream_latency.sum,
            connections=self.open_connections_here(),
            in_flight=self.local_in_flight() if self.local_in_flight is not None else 0,
        )

    def total(self) -> ProcessCounts:
        """The counts of this process and the other processes (``--workers``) added up."""
        others = list(self.others())
        return add_up([self.counts(), *others]) if others else self.counts()

    def totals_by_kind(self) -> dict[str, int]:
        total = self.total()
        totals = dict.fromkeys(KINDS, 0)
        for retired in total.retired.values():
            for kind, count in retired.items():
                totals[kind] += count
        for key, count in total.requests.items():
            totals[key[2]] += count
        return totals

    def totals_by_domain(self) -> dict[str, dict[str, int]]:
        """domain -> kind -> requests answered (``other`` collects unknown hosts, including
        counts retired by a switch; while not per domain, configured domains are ``*``)."""
        total = self.total()
        out: dict[str, dict[str, int]] = {}
        other = total.retired.get("other")
        if other is not None:
            out["other"] = dict(other)
        for (_, domain, kind, _, _), count in total.requests.items():
            out.setdefault(domain, dict.fromkeys(KINDS, 0))[kind] += count
        return out

    def open_connections_here(self) -> dict[str, int]:
        """Client connections open in this process, by scheme."""
        return {scheme: site.open_connections for scheme, site in self.sites.items()}

    def open_connections(self) -> dict[str, int]:
        """Client connections open in every process, by scheme."""
        return dict(self.total().connections)


class MetricHooks:
    """The request-path hooks of one process's metrics: an observer per listener and the
    instrumented upstream (the admin listener's process and a ``--workers`` child alike)."""

    def __init__(self, clock: IReactorTime, metrics: ProxyMetrics) -> None:
        self.clock = clock
        self.metrics = metrics

    def site(self, scheme: str) -> SiteMetrics:
        return self.metrics.site(scheme)

    def instrument(self, upstream: Upstream) -> InstrumentedUpstream:
        return self.metrics.instrument(upstream, self.clock)
