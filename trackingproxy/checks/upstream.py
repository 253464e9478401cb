"""Is the upstream reachable with a valid certificate? One connection made exactly as the proxy
makes them (its pool, connector and trust root: TCP, then TLS with SNI and verification),
closed again at once; no request is sent."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IResolver

from trackingproxy.checks.findings import Finding, Level
from trackingproxy.errors import ConfigError
from trackingproxy.upstream.dns import CachingResolver
from trackingproxy.upstream.errors import (
    DNSLookupFailed,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamTLSFailed,
)
from trackingproxy.upstream.pool import ConnectionPool, EndpointConnector, make_trust_root
from trackingproxy.upstream.target import UpstreamTarget

_FIXES: dict[type[UpstreamError], str] = {
    DNSLookupFailed: "check this host's DNS servers (/etc/resolv.conf)",
    UpstreamConnectFailed: "allow outgoing connections to it (firewall, egress proxy rules)",
    UpstreamTLSFailed: (
        "if an egress proxy intercepts TLS, pass its CA with --upstream-ca-bundle; otherwise "
        "update the system CA store (ca-certificates)"
    ),
}


async def check_upstream(
    reactor: Any,
    resolver: IResolver,
    target: UpstreamTarget,
    ca_bundle: str | None,
    timeout: float,
) -> Finding:
    """One finding: the upstream answers a (verified) TLS handshake, or why not."""
    what = f"{target.url}"
    try:
        trust = make_trust_root(ca_bundle) if target.tls else None
    except ConfigError as e:
        return Finding(Level.FAIL, "upstream", str(e))
    names = CachingResolver(resolver, reactor, query_timeout=(max(1, round(timeout / 3)),))
    connector = EndpointConnector(reactor, target, trust, tcp_timeout=timeout)
    pool = ConnectionPool(reactor, target, names, connector, connect_timeout=timeout)
    try:
        conn = await pool.acquire()
    except UpstreamError as e:
        fix = next((f for cls, f in _FIXES.items() if isinstance(e, cls)), "")
        return Finding(Level.FAIL, "upstream", f"{what}: {e.message}", fix)
    except Exception as e:
        return Finding(Level.FAIL, "upstream", f"{what}: {type(e).__name__}: {e}")
    finally:
        await pool.close()
    verified = "TLS certificate verified" if target.tls else "connected (plain HTTP)"
    return Finding(Level.OK, "upstream", f"{what}: reachable at {conn.address}, {verified}")


__all__ = ["check_upstream"]
