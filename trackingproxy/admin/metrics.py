"""Prometheus metrics of the proxy: one registry of our own and the hooks on the hot path.

Per finished request the work is one dict lookup and two integer increments: the label child
for a (domain, kind, status class, protocol) combination is resolved once and cached. A host
that is not a configured domain is counted as ``domain="other"`` (and 421 answers never carry
a domain), so clients cannot create label values. Certificate and renewal gauges are not kept
here: they are read from the live objects at scrape time (``trackingproxy.admin.collector``).
"""

from __future__ import annotations

from collections.abc import Callable, Container
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
    "InstrumentedUpstream",
    "ProxyMetrics",
    "SiteMetrics",
]

KINDS: Final = ("open", "click", "other")
ERROR_CAUSES: Final = (*CAUSES, "internal")
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_KIND_BY_PREFIX: Final = {b"/q/": "open", b"/f/": "click"}
_STATUS_CLASS: Final = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


@define
class _Slot:
    """One label combination: its Prometheus child and a plain count for the status page."""

    child: Any
    domain: str
    kind: str
    count: int = 0


class SiteMetrics(ListenerObserver):
    """The counters of one listener (``scheme`` is ``http`` or ``https``)."""

    def __init__(self, metrics: ProxyMetrics, scheme: str) -> None:
        self._metrics = metrics
        self._scheme = scheme
        self._slots: dict[tuple[str, str, int, bool], _Slot] = {}
        self._connections = metrics.connections.labels(scheme)
        self.open_connections = 0

    # -- hot path -------------------------------------------------------------------------
    def request_done(self, request: Any) -> None:
        """Count a finished request (called from the Site's access-log hook)."""
        kind = _KIND_BY_PREFIX.get(request.uri[:3], "other")
        key = (
            request.outcome.host,
            kind,
            request.code // 100,
            request.clientproto == b"HTTP/2",
        )
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = self._resolve(*key)
        slot.count += 1
        slot.child.inc()

    def connection_opened(self) -> None:
        self.open_connections += 1
        self._connections.inc()

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self._connections.dec()

    # -- once per label combination -------------------------------------------------------
    def _resolve(self, host: str, kind: str, status: int, h2: bool) -> _Slot:
        domain = host if host in self._metrics.domains() else "other"
        child = self._metrics.requests.labels(
            domain, kind, _STATUS_CLASS.get(status, "other"), "h2" if h2 else "h1", self._scheme
        )
        return _Slot(child, domain, kind)

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


class ProxyMetrics:
    """The registry (not the global one) with every metric the proxy updates as it runs.

    ``domains`` returns the configured domains (re-read when a new label combination appears,
    so domains added by a reload get their own label).
    """

    def __init__(
        self, domains: Callable[[], Container[str]], *, process_metrics: bool = True
    ) -> None:
        self.domains = domains
        self.registry = CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.requests = Counter(
            "trackingproxy_requests",
            "Requests answered, by domain (other: not a configured domain), kind (open: /q/, "
            "click: /f/, other), status class, protocol (h1, h2) and scheme (http, https).",
            ("domain", "kind", "status", "protocol", "scheme"),
            registry=r,
        )
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

    def site(self, scheme: str) -> SiteMetrics:
        """The hooks for the listener serving ``scheme`` (one object per scheme)."""
        site = self.sites.get(scheme)
        if site is None:
            site = self.sites[scheme] = SiteMetrics(self, scheme)
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
        for site in self.sites.values():
            for slot in site.slots():
                totals[slot.kind] += slot.count
        return totals

    def totals_by_domain(self) -> dict[str, dict[str, int]]:
        """domain -> kind -> requests answered (``other`` collects unknown hosts)."""
        out: dict[str, dict[str, int]] = {}
        for site in self.sites.values():
            for slot in site.slots():
                out.setdefault(slot.domain, dict.fromkeys(KINDS, 0))[slot.kind] += slot.count
        return out

    def open_connections(self) -> dict[str, int]:
        return {scheme: site.open_connections for scheme, site in self.sites.items()}
