"""The upstream leg: forwarding requests to SparkPost's tracking endpoint.

`target` parses `--upstream`; `dns` resolves the host without blocking; `pool` makes verified
TLS connections and keeps them alive; `client` sends one request with the no-double-send retry
rule and the response timeout; `errors` holds the typed failures (`cause`, `status`).
"""

from __future__ import annotations

from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.dns import CachingResolver, default_resolver
from trackingproxy.upstream.errors import (
    DNSLookupFailed,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamTLSFailed,
)
from trackingproxy.upstream.pool import ConnectionPool, EndpointConnector, make_trust_root
from trackingproxy.upstream.target import UpstreamTarget, parse_upstream

__all__ = [
    "CachingResolver",
    "ConnectionPool",
    "DNSLookupFailed",
    "EndpointConnector",
    "UpstreamClient",
    "UpstreamConnectFailed",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTLSFailed",
    "UpstreamTarget",
    "UpstreamTimeout",
    "default_resolver",
    "make_trust_root",
    "parse_upstream",
]
