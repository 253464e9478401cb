"""Assembling the service tree from a ProxyConfig: listeners, TLS (SNI map), upstream client.

This is the one place where collaborators are wired together; the reactor is passed in.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from attrs import define, evolve
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IResolver
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized

from trackingproxy.acme.settings import (
    DEFAULT_STATE_DIR,
    FALLBACK_STATE_DIR,
    AcmeParts,
    build_acme,
    open_store,
)
from trackingproxy.admin import Admin, AdminParts, build_admin
from trackingproxy.admin.status import ClusterFacts
from trackingproxy.config import ProxyConfig
from trackingproxy.errors import ConfigError, exit_with
from trackingproxy.internals.twisted_private import forget_exit_signal, stop_resolv_conf_timer
from trackingproxy.logs.access import AccessLog, AccessLogObserver, build_access_log
from trackingproxy.logs.jsonlines import JSONLinesObserver
from trackingproxy.logs.quiet import install as quiet_logs
from trackingproxy.ops.lifecycle import (
    ActiveRequests,
    OpenConnections,
    raise_open_files_limit,
    tune_gc,
)
from trackingproxy.ops.listeners import ListenerService
from trackingproxy.ops.malloctrim import AllocatorTrim, glibc_malloc_trim
from trackingproxy.ops.reload import Reloader
from trackingproxy.ops.supervisor import SharedListeners, WorkerPool, line_safe_access_log
from trackingproxy.outage import Outage, OutageSettings, build_outage
from trackingproxy.proxy.challenges import ChallengeResponder
from trackingproxy.proxy.forward import Upstream
from trackingproxy.proxy.forwarded import ForwardedFor
from trackingproxy.proxy.handler import TrackingHandler
from trackingproxy.proxy.wellknown import WellKnownFile, load_well_known
from trackingproxy.server.engines import choose_engine
from trackingproxy.server.listener import HTTPListener, ListenerObserver
from trackingproxy.tls.protocol import TLSServerFactory
from trackingproxy.tls.sni import SNIContextMap
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.dns import CachingResolver, LazyResolver
from trackingproxy.upstream.pool import (
    QUEUE_TIMEOUT,
    ConnectionPool,
    EndpointConnector,
    make_trust_root,
)

log = Logger(namespace="trackingproxy.service")


@define
class Runtime:
    """The mutable parts shared by listeners (reloaded on SIGHUP by the operations layer)."""

    domains: frozenset[str]
    well_known: Mapping[bytes, WellKnownFile]

    def current_domains(self) -> frozenset[str]:
        return self.domains

    def current_well_known(self) -> Mapping[bytes, WellKnownFile]:
        return self.well_known


class TrackingProxyService(MultiService):
    """The root service.

    Start-up problems (a port that cannot be bound) end the process with one line and exit
    status 1 instead of a traceback. Stopping (SIGTERM) first stops the listeners (new
    connections are refused) and tells the open ones (HTTP/1.1 answers close their connection,
    HTTP/2 connections get GOAWAY), then waits for the requests in flight (up to the shutdown
    timeout); requests still waiting for the upstream then get a 502 (the upstream connections
    are closed). Then the client connections are closed once their answers are flushed (see
    ``lifecycle``), then everything else is stopped. SIGHUP reloads certificates, well-known
    files and the domains file (when ``install_signals``).
    """

    def __init__(
        self,
        sni: SNIContextMap,
        runtime: Runtime,
        upstream: UpstreamClient,
        active: ActiveRequests,
        shutdown_timeout: float,
        json_log: bool = False,
        connections: OpenConnections | None = None,
    ) -> None:
        super().__init__()
        self.sni = sni
        self.runtime = runtime
        self.upstream = upstream
        self.active = active
        self.connections = connections
        self.shutdown_timeout = shutdown_timeout
        self.reloader: Reloader | None = None
        self.reload_hooks: list[Callable[[], object]] = []  # also run on SIGHUP (--workers)
        self.install_signals = False
        self.log_level = "info"  # --log-level, applied when the process starts
        self._json_log = json_log
        self._previous_sighup: Any = None

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the application: with ``--log-format json`` give it our
        JSON log observer, which twistd then uses instead of its text one."""
        super().setServiceParent(parent)
        if self._json_log and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, JSONLinesObserver(sys.stdout))

    def privilegedStartService(self) -> None:
        if self.install_signals:  # the real process: twistd's log observer exists by now
            quiet_logs(LogLevel.levelWithName(self.log_level))
        try:
            super().privilegedStartService()
        except ConfigError as e:
            exit_with(e.message)

    def startService(self) -> None:
        super().startService()
        if self.install_signals and self.reloader is not None:
            from twisted.internet import reactor as global_reactor

            reactor: Any = global_reactor
            reloader = self.reloader
            hooks = self.reload_hooks

            def on_sighup(signum: int, frame: object) -> None:
                reactor.callFromThread(reloader.reload)
                for hook in hooks:
                    reactor.callFromThread(hook)

            self._previous_sighup = signal.signal(signal.SIGHUP, on_sighup)
            reactor.callWhenRunning(_stop_once, signal.SIGTERM, signal.SIGINT)
            reactor.callWhenRunning(tune_gc)
            raised = raise_open_files_limit()
            if raised is not None:
                before, after = raised
                log.info(
                    "open files limit raised from {before} to {after}", before=before, after=after
                )

    def stopService(self) -> Deferred[None]:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        listeners = [
            s for s in self
            if isinstance(s, ListenerService) or getattr(s, "stops_with_listeners", False)
        ]  # and the --workers pool: its workers drain while this process does
        stopped = DeferredList([maybeDeferred(s.stopService) for s in listeners])

        def drain(_: object) -> Deferred[bool]:
            if self.connections is not None:
                self.connections.notify_shutdown()  # HTTP/1.1: close after; HTTP/2: GOAWAY
            if self.active.count:
                log.info(
                    "Stopped accepting; waiting for {count} request(s) in flight",
                    count=self.active.count,
                )
            return self.active.wait_idle(self.shutdown_timeout)

        def fail_the_rest(idle: bool) -> Deferred[None] | None:
            # Timed out: closing the upstream connections answers what waits for them (502).
            return None if idle else self.upstream.close()

        def close_connections(_: object) -> Deferred[int] | None:
            return None if self.connections is None else self.connections.close()

        def stop_rest(_: object) -> Deferred[None]:
            if self.install_signals:
                _exit_zero_after_sigterm()
            return maybeDeferred(MultiService.stopService, self)

        return (
            stopped.addCallback(drain)
            .addCallback(fail_the_rest)
            .addCallback(close_connections)
            .addCallback(stop_rest)
        )


class _UpstreamCloser(Service):
    """Closes upstream connections and stops the DNS client's resolv.conf re-read timer."""

    def __init__(self, upstream: UpstreamClient, names: IResolver | None) -> None:
        self._upstream = upstream
        self._names = names

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stop_resolv_conf_timer(self._names)
        return self._upstream.close()


def build_upstream(config: ProxyConfig, reactor: Any, names: IResolver) -> UpstreamClient:
    """The upstream client: TTL-cached DNS, a verified-TLS keep-alive pool, the timeout."""
    connector = EndpointConnector(
        reactor, config.upstream, make_trust_root(config.upstream_ca_bundle)
    )
    pool = ConnectionPool(
        reactor,
        config.upstream,
        CachingResolver(names, reactor),
        connector,
        max_age=config.upstream_max_age,
        max_connections=config.upstream_max_connections,
        queue_timeout=min(QUEUE_TIMEOUT, config.upstream_timeout / 2),
    )
    return UpstreamClient(pool, reactor, response_timeout=config.upstream_timeout)


def outage_parts(
    config: ProxyConfig, reactor: Any, upstream: UpstreamClient, domains: Callable[[], Any]
) -> Outage | None:
    """``--outage-mode replay``: local answers, the journal in the state directory, replay."""
    if config.outage_mode != "replay":
        return None
    settings = OutageSettings(
        remember_links=config.remember_links,
        journal_ttl=config.journal_ttl,
        journal_max_bytes=config.journal_max_bytes,
        state_dir=config.acme.state_dir,
        default_dir=DEFAULT_STATE_DIR,
        fallback_dir=FALLBACK_STATE_DIR,
    )
    return build_outage(settings, reactor, upstream, domains)


def _endpoint(reactor: object, option: str, description: str) -> object:
    try:
        return serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"--{option} {description!r} is not a valid endpoint ({e}); use e.g. tcp:80, "
            "tcp:443:interface=::, haproxy:tcp:80 or none"
        ) from None


def build_service(
    config: ProxyConfig,
    reactor: Any,
    *,
    challenges: ChallengeResponder | None = None,
    access_log: AccessLog | None = None,
    upstream: UpstreamClient | None = None,
    listen: Callable[[str, str], object] | None = None,
    acme_builder: Callable[..., AcmeParts] = build_acme,
    admin_builder: Callable[..., AdminParts | None] = build_admin,
) -> TrackingProxyService:
    """Build (not start) the service tree for ``config``.

    ``listen(option, description)`` makes the listening endpoints (default: Twisted's endpoint
    strings); ``acme_builder`` is ``build_acme`` or, in a --workers child,
    ``certwatch.build_worker_acme`` (with ``--store``, children run ``build_acme`` too);
    ``admin_builder`` is ``build_admin`` or, in a --workers child, ``workers.worker_admin``.
    """
    if listen is None:
        def listen(option: str, description: str) -> object:
            return _endpoint(reactor, option, description)
    opened = None
    if challenges is None and config.https_port is not None:
        if acme_builder is build_acme or config.acme.store is not None:
            opened = open_store(config.acme, config.domains, reactor)
        if opened is not None:
            # With a shared store every process is a full replica, --workers children too:
            # the store's locks decide who orders, its change messages reach every process.
            config = with_store_domains(config, opened.domains)
            acme_builder = build_acme
    sni = sni_map = SNIContextMap(config.domains)
    for cert in config.certificates:
        sni.install(cert)
    runtime = Runtime(
        domains=frozenset(config.domains),
        well_known=load_well_known(config.well_known_dir) if config.well_known_dir else {},
    )
    names: IResolver | None = None
    if upstream is None:
        names = cast(IResolver, LazyResolver())
        upstream = build_upstream(config, reactor, names)
    if access_log is None:
        access_log = build_access_log(
            config.access_log, config.log_format, config.log_paths, reactor
        )
    forwarded = ForwardedFor(config.trusted_proxies)
    admin = admin_builder(
        config.admin_port, reactor, runtime.current_domains, config.metrics_per_domain
    )
    outage = outage_parts(config, reactor, upstream, runtime.current_domains)
    if outage is not None and admin is not None:
        admin.metrics.registry.register(outage.collector)
    acme_parts: AcmeParts | None = None
    if challenges is None:
        acme = config.acme
        if config.https_port is None:
            acme = evolve(acme, no_acme=True)
        if opened is None:
            acme_parts = acme_builder(acme, config.domains, config.user_covered, sni, reactor)
        else:
            acme_parts = acme_builder(
                acme, config.domains, config.user_covered, sni, reactor, opened=opened,
                on_store_domains=lambda names: root_reloader().store_domains_changed(names),
            )
        challenges = acme_parts.responder
    active = ActiveRequests(reactor)
    connections = OpenConnections(reactor)

    def root_reloader() -> Reloader:
        assert root.reloader is not None  # set below, before the service starts
        return root.reloader

    root = TrackingProxyService(
        sni,
        runtime,
        upstream,
        active,
        config.shutdown_timeout,
        json_log=config.log_format == "json",
        connections=connections,
    )

    def same_certificate(sni: str, host: str) -> bool:
        cert = sni_map.certificate_for(sni)
        return cert is not None and cert is sni_map.certificate_for(host)

    def handler(scheme: bytes, upstream_: Upstream) -> TrackingHandler:
        return TrackingHandler(
            scheme=scheme,
            domains=runtime.current_domains,
            upstream=upstream_,
            forwarded=forwarded,
            well_known=runtime.current_well_known,
            challenges=challenges,
            redirect_http=config.redirect_http and config.https_port is not None,
            sni_check=same_certificate if scheme == b"https" else None,
            outage=outage.policy if outage is not None else None,
        )

    h2_engine, h2_note = choose_engine(config.http2_engine)
    log.info(h2_note)
    trim = glibc_malloc_trim()
    trimmer = None if trim is None else AllocatorTrim(reactor, trim)
    if trimmer is not None:
        trimmer.setServiceParent(root)

    def site(scheme: str) -> HTTPListener:
        observers: list[ListenerObserver] = [active]
        if admin is not None:
            observers.append(admin.site(scheme))
        observers.append(AccessLogObserver(access_log, scheme, reactor))
        if trimmer is not None:
            observers.append(trimmer)
        return HTTPListener(
            handler(scheme.encode(), admin.instrument(upstream) if admin else upstream),
            reactor,
            observers,
            idle_timeout=config.idle_timeout,
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            h2_engine=h2_engine,
        )

    def watched(listener: HTTPListener) -> HTTPListener:
        connections.watch(listener.connections)
        return listener

    if config.http_port is not None:
        ListenerService(
            "--http-port",
            config.http_port,
            listen("http-port", config.http_port),  # type: ignore[arg-type]
            watched(site("http")),
        ).setServiceParent(root)
    if config.https_port is not None:
        ListenerService(
            "--https-port",
            config.https_port,
            listen("https-port", config.https_port),  # type: ignore[arg-type]
            TLSServerFactory(sni, False, watched(site("https")), clock=reactor),
        ).setServiceParent(root)
    _UpstreamCloser(upstream, names).setServiceParent(root)
    if outage is not None:  # after it: stops (journal written) before upstream connections close
        outage.service.setServiceParent(root)
    if acme_parts is not None:
        # After the listeners: port 80 must answer HTTP-01 before the first order is placed.
        acme_parts.service.setServiceParent(root)
    if admin is not None:  # last: it reports on the listeners and the issuer above
        issuer = acme_parts.issuer if acme_parts is not None else None
        cluster = ClusterFacts(config.acme.node_id or "-")
        if opened is not None:
            cluster = ClusterFacts(config.acme.node_id, opened.shared.description,
                                   opened.shared.health)
        admin.service(
            root, sni, config.https_port is not None, issuer, cluster
        ).setServiceParent(root)
        source = getattr(admin, "source", None)  # a --workers child reports, shows nothing
        if outage is not None and source is not None:
            source.outage = outage.status

    def apply_runtime(domains: frozenset[str], well_known: dict[bytes, WellKnownFile]) -> None:
        runtime.domains = domains
        runtime.well_known = well_known

    followers = list(acme_parts.follow_domains) if acme_parts is not None else []
    root.log_level = config.log_level
    root.reloader = Reloader(config, reactor, sni, apply_runtime, followers)
    if opened is not None:
        root.reloader.store_domains = opened.domains
    return root


def with_store_domains(config: ProxyConfig, store_domains: Iterable[str]) -> ProxyConfig:
    """``config`` serving the shared store's domain list too; at least one domain in all."""
    domains = tuple(dict.fromkeys([*config.domains, *store_domains]))
    if not domains:
        raise ConfigError(
            "no domain configured: pass --domain click.example.com, or add one to the store "
            "with `trackingproxy domains add click.example.com --store URL`"
        )
    return evolve(config, domains=domains)


def _stop_once(*signums: int) -> None:
    """A second SIGTERM (or Ctrl-C) while the first one's drain runs is ignored, with one line:
    the reactor's own handler would ask the stopping reactor to stop again (a traceback)."""
    stopping: list[int] = []
    for signum in signums:
        handler = signal.getsignal(signum)
        if not callable(handler):
            continue

        def once(sig: int, frame: object, handler: Any = handler) -> None:
            if stopping:
                log.info("Already stopping (signal {sig} ignored)", sig=sig)
                return
            stopping.append(sig)
            handler(sig, frame)

        signal.signal(signum, once)


def _exit_zero_after_sigterm() -> None:
    """twistd re-raises the signal that stopped it once shut down (exit status 143); a SIGTERM
    that we handled gracefully is a normal stop, so make twistd exit with status 0 instead."""
    from twisted.internet import reactor

    forget_exit_signal(reactor, signal.SIGTERM)



def build_with_workers(
    config: ProxyConfig, options: Mapping[str, Any], reactor: Any
) -> TrackingProxyService:
    """The parent's service tree: ``build_service`` on shared sockets, plus the worker pool."""
    listeners = SharedListeners(reactor, config.workers)
    admins: list[Admin] = []

    def admin_builder(*args: Any) -> Admin | None:
        admin = build_admin(*args)
        if admin is not None:  # the admin listener counts the workers' requests too
            admin.add_workers(config.workers, os.getpid())
            admins.append(admin)
        return admin

    root = build_service(
        config, reactor, listen=listeners.endpoint,
        access_log=line_safe_access_log(config, reactor), admin_builder=admin_builder,
    )
    reports = admins[0].workers if admins else None
    pool = WorkerPool(reactor, listeners, options, config.shutdown_timeout, reports=reports)
    pool.setServiceParent(root)
    root.reload_hooks.append(pool.reload)
    log.info("{count} processes serve the listeners: this one (pid {pid}) and {workers} "
             "worker(s)", count=config.workers, pid=os.getpid(), workers=config.workers - 1)
    return root
