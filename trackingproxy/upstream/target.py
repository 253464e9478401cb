"""The upstream origin: parsing `--upstream` once, at configuration time, into a value object,
and knowing SparkPost's tracking endpoints (the aliases, and which endpoint a target is).

Everything per-request code needs (the IDNA-encoded host, the port, whether TLS is used) is
computed here so that the hot path never parses a URL or encodes a name.

SparkPost has five tracking endpoints (its "Managed HTTPS for Tracking Domains" page, 2026-02):
US `spgo.io`, EU `eu.spgo.io`, Enterprise `TENANT.et.e.sparkpost.com`, and the V2 endpoints
US `v2.spgo.io` and EU `eu.v2.spgo.io` (tracking domains created after December 2025 use V2).
It routes by Host, so the proxy must forward to the endpoint the domain is set up for.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

import idna
from attrs import frozen

from trackingproxy.errors import ConfigError


@frozen
class Endpoint:
    """One of SparkPost's tracking endpoints: its `--upstream` alias, origin URL and name, and
    the alias of the same region's other generation (V1 <-> V2), if there is one."""

    alias: str
    url: str
    name: str
    counterpart: str | None = None


ENDPOINTS: Final = (
    Endpoint("us", "https://spgo.io", "SparkPost US", "us-v2"),
    Endpoint("eu", "https://eu.spgo.io", "SparkPost EU", "eu-v2"),
    Endpoint("us-v2", "https://v2.spgo.io", "SparkPost US V2", "us"),
    Endpoint("eu-v2", "https://eu.v2.spgo.io", "SparkPost EU V2", "eu"),
)
ALIASES: Final = {e.alias: e.url for e in ENDPOINTS}
ENTERPRISE: Final = "enterprise"
ENTERPRISE_DOMAIN: Final = "et.e.sparkpost.com"
DEFAULT_UPSTREAM: Final = "https://spgo.io"
_DEFAULT_PORTS: Final = {"https": 443, "http": 80}
_LABEL: Final = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_FIX: Final = (
    "use the endpoint SparkPost's domain settings show for the tracking domain: us, eu, us-v2, "
    "eu-v2, enterprise:TENANT, or an https:// URL"
)


@frozen
class UpstreamTarget:
    """Where requests are forwarded: scheme ("https" or "http"), ASCII host, port.

    `host` is lower-case ASCII (IDNA-encoded) or an IP address without brackets.
    """

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        """Whether connections to this upstream use TLS."""
        return self.scheme == "https"

    @property
    def netloc(self) -> str:
        """`host[:port]` as used in a URL or a Host header; IPv6 hosts are bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The origin as a URL, e.g. `https://spgo.io`."""
        return f"{self.scheme}://{self.netloc}"


def parse_upstream(value: str) -> UpstreamTarget:
    """Parse `--upstream`: an alias (`us`, `eu`, `us-v2`, `eu-v2`, any case), `enterprise:TENANT`,
    `https://host[:port]` or `http://host[:port]`.

    Raises ConfigError with a one-line message naming the fix for anything else.
    """
    text = value.strip()
    alias, _, tenant = text.partition(":")
    try:
        if alias.lower() == ENTERPRISE:
            return _parse(f"https://{_tenant(value, tenant)}.{ENTERPRISE_DOMAIN}")
        return _parse(ALIASES.get(text.lower(), text))
    except _Invalid as e:
        raise ConfigError(f"--upstream {value!r}: {e}; {_FIX}") from None


def endpoint_for(target: UpstreamTarget) -> Endpoint | None:
    """The SparkPost endpoint `target` is (known by its host name), or None for any other."""
    for endpoint in ENDPOINTS:
        if endpoint.url == f"https://{target.host}":
            return endpoint
    tenant, dot, rest = target.host.partition(".")
    if dot and rest == ENTERPRISE_DOMAIN and _LABEL.fullmatch(tenant):
        url = f"https://{target.host}"
        return Endpoint(f"{ENTERPRISE}:{tenant}", url, "SparkPost Enterprise")
    return None


def _tenant(value: str, raw: str) -> str:
    """The Enterprise tenant: one DNS label, lower-cased; else a ConfigError naming the fix."""
    tenant = raw.strip().lower()
    if _LABEL.fullmatch(tenant):
        return tenant
    why = f"the tenant {raw.strip()!r} is not one DNS label" if tenant else "no tenant was given"
    raise ConfigError(
        f"--upstream {value!r}: {why}; use enterprise:TENANT with TENANT the first label of "
        f"your Enterprise endpoint TENANT.{ENTERPRISE_DOMAIN} (letters, digits and '-', at "
        "most 63), e.g. enterprise:acme"
    )


class _Invalid(Exception):
    """What is wrong with the value, as a short phrase."""


def _parse(text: str) -> UpstreamTarget:
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise _Invalid("only an https:// (or http://) origin is accepted")
    if "@" in rest:
        raise _Invalid("user information is not allowed")
    if "?" in rest or "#" in rest:
        raise _Invalid("a query or fragment is not allowed")
    netloc, _, path = rest.partition("/")
    if path:
        raise _Invalid("a path is not allowed")
    if netloc.startswith("["):
        inside, bracket, port_text = netloc[1:].partition("]")
        address = _ip_literal(inside) if bracket else None
        if address is None or address.version != 6:
            raise _Invalid(f"{netloc!r} is not a bracketed IPv6 address")
        host = address.compressed
    elif netloc.count(":") > 1:
        raise _Invalid("an IPv6 address must be written in brackets, e.g. https://[2001:db8::1]")
    else:
        name, colon, port_text = netloc.partition(":")
        port_text = colon + port_text
        host = _normalise_host(name)
    return UpstreamTarget(scheme=scheme, host=host, port=_port(port_text, scheme))


def _port(text: str, scheme: str) -> int:
    if not text:
        return _DEFAULT_PORTS[scheme]
    digits = text[1:] if text.startswith(":") else ""
    if not (digits.isascii() and digits.isdigit()) or not 0 < int(digits) < 65536:
        raise _Invalid(f"{text!r} is not a port (1-65535)")
    return int(digits)


def _normalise_host(name: str) -> str:
    name = name.rstrip(".")
    if not name:
        raise _Invalid("the host name is missing")
    address = _ip_literal(name)
    if address is not None:
        return address.compressed
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise _Invalid(f"{name!r} is not a valid host name ({e})") from None
    if len(ascii_name) > 253 or not all(_LABEL.match(label) for label in ascii_name.split(".")):
        raise _Invalid(f"{name!r} is not a valid host name")
    return ascii_name


def _ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


__all__ = [
    "ALIASES",
    "DEFAULT_UPSTREAM",
    "ENDPOINTS",
    "ENTERPRISE_DOMAIN",
    "Endpoint",
    "UpstreamTarget",
    "endpoint_for",
    "parse_upstream",
]
