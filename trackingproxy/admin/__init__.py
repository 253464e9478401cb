"""The admin listener (``--admin-port``): health, readiness, Prometheus metrics, JSON status
and an HTML status page, plus the metric hooks the proxy's sites and upstream call.

``build_admin`` (from ``service.build_service``) returns None when the admin port is ``none``:
then no metric is kept at all. Otherwise ``Admin.site`` gives each listener's Site its hooks,
``Admin.instrument`` wraps the upstream client, and ``Admin.service`` is the admin listener
(added last to the service tree, so it reports on the proxy's listeners).
``--metrics-per-domain`` decides whether request counters carry the domain
(``trackingproxy.admin.metrics``). With ``--workers``, ``Admin.add_workers`` makes the admin
listener count every process, and a worker builds ``workers.WorkerAdmin`` instead (both are
``AdminParts``): see ``trackingproxy.admin.workers``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime

from trackingproxy.admin.collector import StatusCollector
from trackingproxy.admin.metrics import (
    InstrumentedUpstream,
    MetricHooks,
    ProxyMetrics,
    SiteMetrics,
)
from trackingproxy.admin.resources import AdminSite, admin_resource
from trackingproxy.admin.status import CertificateSource, ClusterFacts, RateTracker, StatusSource
from trackingproxy.admin.workers import WorkerMetrics
from trackingproxy.errors import ConfigError
from trackingproxy.ops.listeners import ListenerService
from trackingproxy.proxy.forward import Upstream

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "Admin",
    "AdminParts",
    "AdminService",
    "ProxyMetrics",
    "SiteMetrics",
    "StatusSource",
    "build_admin",
]

DEFAULT_ADMIN_PORT = "tcp:9180:interface=127.0.0.1"


class AdminService(MultiService):
    """The admin listener plus the sampler behind the page's request rates. Not a direct
    ListenerService child of the root, so on SIGTERM it keeps answering (``/readyz`` says 503)
    while the proxy's listeners drain."""

    name = "admin"

    def __init__(self, listener: ListenerService, rates: RateTracker) -> None:
        super().__init__()
        self.listener = listener
        self._rates = rates
        listener.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self._rates.start()

    def stopService(self) -> Deferred[None]:
        self._rates.stop()
        return super().stopService()  # type: ignore[no-any-return]


class AdminParts(Protocol):
    """What ``build_service`` needs of the admin side: the hooks and the service to add."""

    metrics: ProxyMetrics

    def site(self, scheme: str) -> SiteMetrics: ...

    def instrument(self, upstream: Upstream) -> InstrumentedUpstream: ...

    def service(
        self,
        root: MultiService,
        certificates: CertificateSource,
        https_enabled: bool,
        acme_issuer: object | None,
        cluster: ClusterFacts | None = None,
    ) -> Service: ...


class Admin(MetricHooks):
    """The metrics of one proxy process and the builder of its admin listener.

    @ivar workers: with ``--workers``, the other processes' counts (``add_workers``).
    """

    def __init__(self, endpoint: str, clock: IReactorTime, metrics: ProxyMetrics) -> None:
        super().__init__(clock, metrics)
        self.endpoint = endpoint
        self.workers: WorkerMetrics | None = None

    def add_workers(self, count: int, pid: int | None = None) -> WorkerMetrics:
        """Count the ``count - 1`` worker processes too (``pid``: this process's, shown)."""
        self.workers = WorkerMetrics(self.clock, self.metrics, count, pid)
        return self.workers

    def service(
        self,
        root: MultiService,
        certificates: CertificateSource,
        https_enabled: bool,
        acme_issuer: object | None,
        cluster: ClusterFacts | None = None,
    ) -> AdminService:
        """The admin listener reporting on ``root``'s listeners and the ACME issuer (None:
        ACME is off, or this is a worker)."""

        def listeners() -> list[ListenerService]:
            return [s for s in root if isinstance(s, ListenerService)]

        def issuer() -> Any:
            return acme_issuer

        active = getattr(root, "active", None)
        metrics = self.metrics
        if active is not None:
            metrics.local_in_flight = lambda: int(active.count)
        rates = RateTracker(self.clock, metrics.totals_by_kind)
        source = StatusSource(
            clock=self.clock,
            certificates=certificates,
            https_enabled=https_enabled,
            listeners=listeners,
            renewals=issuer,
            metrics=self.metrics,
            rates=rates,
            in_flight=(lambda: metrics.total().in_flight) if active is not None else None,
            cluster=cluster,
            processes=self.workers.rows if self.workers is not None else None,
        )
        self.metrics.registry.register(StatusCollector(source))
        self.source = source
        site = AdminSite(admin_resource(source, self.metrics.registry), self.clock)
        try:
            endpoint = serverFromString(self.clock, self.endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"--admin-port {self.endpoint!r} is not a valid endpoint ({e}); use e.g. "
                f"{DEFAULT_ADMIN_PORT} or none"
            ) from None
        return AdminService(ListenerService("--admin-port", self.endpoint, endpoint, site), rates)


def build_admin(
    endpoint: str | None,
    clock: IReactorTime,
    domains: Callable[[], Collection[str]],
    metrics_per_domain: str = "auto",
) -> Admin | None:
    """The admin parts for ``--admin-port endpoint`` (None when it is ``none``);
    ``metrics_per_domain`` is ``--metrics-per-domain`` (``auto``, ``on`` or ``off``), judged
    against the current ``domains`` (they change on SIGHUP)."""
    if endpoint is None:
        return None
    return Admin(endpoint, clock, ProxyMetrics(domains, per_domain=metrics_per_domain))
