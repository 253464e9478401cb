"""Assembling the service tree from a ProxyConfig: listeners, TLS (SNI map), upstream client.

This is the one place where collaborators are wired together; the reactor is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import define, evolve
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IResolver
from twisted.names import client as names_client
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import IResource

from trackingproxy.accesslog import AccessLog
from trackingproxy.acme.settings import build_acme
from trackingproxy.challenges import ChallengeResponder
from trackingproxy.config import ProxyConfig
from trackingproxy.errors import ConfigError, exit_with
from trackingproxy.forwarded import ForwardedFor
from trackingproxy.listeners import ListenerService
from trackingproxy.proxy import TrackingResource, Upstream
from trackingproxy.site import ProxySite
from trackingproxy.sni import SNIContextMap
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.dns import CachingResolver
from trackingproxy.upstream.pool import ConnectionPool, EndpointConnector, make_trust_root
from trackingproxy.wellknown import WellKnownFile, load_well_known


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
    """The root service. Start-up problems (a port that cannot be bound) end the process with one
    line and exit status 1 instead of a traceback."""

    def __init__(self, sni: SNIContextMap, runtime: Runtime, upstream: UpstreamClient) -> None:
        super().__init__()
        self.sni = sni
        self.runtime = runtime
        self.upstream = upstream

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ConfigError as e:
            exit_with(e.message)


class _UpstreamCloser(Service):
    """Closes upstream connections and stops the DNS client's resolv.conf re-read timer."""

    def __init__(self, upstream: UpstreamClient, names: IResolver | None) -> None:
        self._upstream = upstream
        self._names = names

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for resolver in getattr(self._names, "resolvers", ()):
            call = getattr(resolver, "_parseCall", None)  # twisted.names.client.Resolver
            if call is not None and call.active():
                call.cancel()
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
    )
    return UpstreamClient(pool, reactor, response_timeout=config.upstream_timeout)


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
    reactor: object,
    *,
    challenges: ChallengeResponder | None = None,
    access_log: AccessLog | None = None,
    upstream: UpstreamClient | None = None,
) -> TrackingProxyService:
    """Build (not start) the service tree for ``config``."""
    sni = sni_map = SNIContextMap(config.domains)
    for cert in config.certificates:
        sni.install(cert)
    runtime = Runtime(
        domains=frozenset(config.domains),
        well_known=load_well_known(config.well_known_dir) if config.well_known_dir else {},
    )
    names: IResolver | None = None
    if upstream is None:
        names = names_client.createResolver()
        upstream = build_upstream(config, reactor, names)
    access_log = access_log or AccessLog(config.log_format, config.log_paths)
    forwarded = ForwardedFor(config.trusted_proxies)
    acme_service = None
    if challenges is None:
        acme = config.acme
        if config.https_port is None:
            acme = evolve(acme, no_acme=True)
        acme_service, challenges = build_acme(
            acme, config.domains, config.user_covered, sni, reactor
        )
    root = TrackingProxyService(sni, runtime, upstream)

    def same_certificate(sni: str, host: str) -> bool:
        cert = sni_map.certificate_for(sni)
        return cert is not None and cert is sni_map.certificate_for(host)

    def resource(scheme: bytes, upstream_: Upstream) -> IResource:
        return TrackingResource(
            scheme=scheme,
            domains=runtime.current_domains,
            upstream=upstream_,
            forwarded=forwarded,
            well_known=runtime.current_well_known,
            challenges=challenges,
            redirect_http=config.redirect_http and config.https_port is not None,
            sni_check=same_certificate if scheme == b"https" else None,
        )

    def site(scheme: str) -> ProxySite:
        return ProxySite(
            resource(scheme.encode(), upstream),
            access_log,
            scheme,
            reactor,  # type: ignore[arg-type]
            idle_timeout=config.idle_timeout,
            header_timeout=config.header_timeout,
        )

    if config.http_port is not None:
        ListenerService(
            "--http-port",
            config.http_port,
            _endpoint(reactor, "http-port", config.http_port),  # type: ignore[arg-type]
            site("http"),
        ).setServiceParent(root)
    if config.https_port is not None:
        ListenerService(
            "--https-port",
            config.https_port,
            _endpoint(reactor, "https-port", config.https_port),  # type: ignore[arg-type]
            TLSMemoryBIOFactory(sni, False, site("https"), clock=reactor),
        ).setServiceParent(root)
    _UpstreamCloser(upstream, names).setServiceParent(root)
    if acme_service is not None:
        # After the listeners: port 80 must answer HTTP-01 before the first order is placed.
        acme_service.setServiceParent(root)
    return root
