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

Certificate and renewal gauges are not kept here: they are read from the live objects at
scrape time (``trackingproxy.admin.collector``).
"""

# -*- test-case-name: tests.admin.test_metrics -*-

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any, Final

from attrs import define
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
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
    "ProxyMetrics",
    "SiteMetrics",
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
        self._connections = metrics.connections.labels(scheme)
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
        self._connections.inc()

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self._connections.dec()

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
        m.upstream_requests.inc()
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
        for scheme, site in m.sites.items():
            for s in site.slots():
                key: tuple[str, ...] = (s.kind, s.status, s.protocol, scheme)
                if per_domain:
                    key = (s.domain, *key)
                counts[key] = counts.get(key, 0) + s.count
        family = CounterMetricFamily("trackingproxy_requests", _REQUESTS_HELP, labels=labels)
        for key, count in counts.items():
            family.add_metric(key, float(count))
        yield family


class ProxyMetrics:
    """The registry (not the global one) with every metric the proxy updates as it runs.

    ``domains`` returns the configured domains (re-read when a new label combination appears,
    so domains added by a reload get their own label; its size decides ``auto``).
    ``per_domain`` is ``--metrics-per-domain``: ``on``, ``off`` or ``auto``.
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
        self.connections = Gauge(
            "trackingproxy_open_connections",
            "Client connections currently open, by scheme.",
            ("scheme",),
            registry=r,
        )
        self.upstream_requests = Counter(
            "trackingproxy_upstream_requests",
            "Requests sent (or attempted) to the upstream.",
            registry=r,
        )
        self.upstream_latency = Histogram(
            "trackingproxy_upstream_response_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "trackingproxy_upstream_errors",
            "Upstream requests that got no response, by cause (dns, connect, tls, timeout, "
            "reset, protocol, internal).",
            ("cause",),
            registry=r,
        )
        self._error_children = {c: self.upstream_errors.labels(c) for c in ERROR_CAUSES}
        self.error_counts = dict.fromkeys(ERROR_CAUSES, 0)
        self.upstream_count = 0
        self.sites: dict[str, SiteMetrics] = {}
        self._per_domain = self._wanted()
        # counts of slots retired by a switch: (configured or "other") -> kind -> requests
        self._retired: dict[str, dict[str, int]] = {}

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
        if cause not in self._error_children:
            cause = "internal"
        self.error_counts[cause] += 1
        self._error_children[cause].inc()

    # -- reading (status page) ------------------------------------------------------------
    def totals_by_kind(self) -> dict[str, int]:
        totals = dict.fromkeys(KINDS, 0)
        for retired in self._retired.values():
            for kind, count in retired.items():
                totals[kind] += count
        for site in self.sites.values():
            for slot in site.slots():
                totals[slot.kind] += slot.count
        return totals

    def totals_by_domain(self) -> dict[str, dict[str, int]]:
        """domain -> kind -> requests answered (``other`` collects unknown hosts, including
        counts retired by a switch; while not per domain, configured domains are ``*``)."""
        out: dict[str, dict[str, int]] = {}
        other = self._retired.get("other")
        if other is not None:
            out["other"] = dict(other)
        for site in self.sites.values():
            for slot in site.slots():
                out.setdefault(slot.domain, dict.fromkeys(KINDS, 0))[slot.kind] += slot.count
        return out

    def open_connections(self) -> dict[str, int]:
        return {scheme: site.open_connections for scheme, site in self.sites.items()}
