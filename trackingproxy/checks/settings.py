"""The check's configuration: the proxy's own options (domains, upstream, ports) plus the
check-only ones (expected addresses, resolver, connect-to, CA bundle, timeout), as a frozen value.

The proxy's options are validated exactly as the proxy does (`config_from_options`); a problem
there is reported as a finding, and the checks still run when the domains and the upstream can
be understood on their own (an expired `--cert` must not hide what DNS or the served
certificate look like). Reading this host's interface addresses happens here, once.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrs import frozen

from trackingproxy.checks.findings import Finding, Level
from trackingproxy.config import config_from_options
from trackingproxy.domains import normalise_domain
from trackingproxy.errors import ConfigError
from trackingproxy.upstream.target import UpstreamTarget, parse_upstream

DEFAULT_TIMEOUT = 5.0
WARN_DAYS = 14.0
PROBE_PATH = "/f/a/b/c/d"  # SparkPost's own test: curl -v https://DOMAIN/f/a/b/c/d


@frozen
class CheckSettings:
    """Everything the checks need; `expected` are the addresses that mean "this host"."""

    domains: tuple[str, ...]
    upstream: UpstreamTarget
    upstream_ca_bundle: str | None
    http_port: int | None
    https_port: int | None
    expected: frozenset[str]
    expected_given: bool
    connect_to: str | None = None
    ca_bundle: str | None = None
    resolver: tuple[str, int] | None = None
    timeout: float = DEFAULT_TIMEOUT
    warn_days: float = WARN_DAYS
    probe_path: str = PROBE_PATH


def settings_from_options(
    opts: Mapping[str, Any],
    now: datetime.datetime,
    interface_addresses: frozenset[str],
) -> tuple[CheckSettings, list[Finding]]:
    """Build the settings; the findings say whether the proxy itself would accept the options.

    Raises ConfigError when the checks cannot run at all (no usable domain or upstream, or a bad
    check-only option).
    """
    findings: list[Finding] = []
    try:
        config = config_from_options(opts, now)
    except ConfigError as e:
        findings.append(Finding(Level.FAIL, "conf", f"the proxy would refuse to start: {e}"))
        domains = tuple(dict.fromkeys(normalise_domain(d) for d in opts["domain"]))
        if not domains:
            raise
        upstream = parse_upstream(opts["upstream"])
        ca_bundle: str | None = opts.get("upstream-ca-bundle") or None
    else:
        domains, upstream, ca_bundle = config.domains, config.upstream, config.upstream_ca_bundle
    given = [_address(a) for a in opts.get("expect-address") or ()]
    settings = CheckSettings(
        domains=domains,
        upstream=upstream,
        upstream_ca_bundle=ca_bundle,
        http_port=public_port(opts["http-port"], 80),
        https_port=public_port(opts["https-port"], 443),
        expected=frozenset(given) if given else interface_addresses,
        expected_given=bool(given),
        connect_to=_connect_to(opts.get("connect-to")),
        ca_bundle=_file("ca-bundle", opts.get("ca-bundle")),
        resolver=parse_resolver(opts.get("resolver")),
        timeout=_timeout(opts.get("timeout")),
    )
    return settings, findings


def public_port(endpoint: str | None, default: int) -> int | None:
    """The port clients reach for a listener endpoint string; None when it is disabled.

    `tcp:8443:interface=::` -> 8443; `haproxy:tcp:80` (behind a load balancer) -> `default`,
    the load balancer's public port; anything unparsable -> `default`.
    """
    value = (endpoint or "").strip()
    if not value or value.lower() == "none":
        return None
    fields = value.split(":")
    if fields[0].lower() == "haproxy":
        return default
    for field in fields[1:]:
        candidate = field.removeprefix("port=")
        if candidate.isdigit() and 0 < int(candidate) < 65536:
            return int(candidate)
    return default


def interface_addresses(proc: Path = Path("/proc/net")) -> frozenset[str]:
    """This host's global (non-loopback, non-link-local) addresses, from /proc (Linux).

    Empty when /proc is not readable; the DNS check then asks for `--expect-address`.
    """
    found: set[str] = set()
    try:
        last = ""
        for line in (proc / "fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|-- "):
                last = text[4:]
            elif text.endswith("host LOCAL") and text.startswith("/32"):
                found.add(last)
    except OSError:
        pass
    try:
        for line in (proc / "if_inet6").read_text().splitlines():
            hexaddr = line.split()[0] if line.split() else ""
            if len(hexaddr) == 32:
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError):
        pass
    return frozenset(a for a in found if _is_global_enough(a))


def _is_global_enough(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_link_local or address.is_unspecified)


def _address(raw: str) -> str:
    try:
        return ipaddress.ip_address(raw.strip().strip("[]")).compressed
    except ValueError:
        raise ConfigError(
            f"--expect-address {raw!r} is not an IP address; pass e.g. --expect-address "
            "203.0.113.10 (the address DNS should point to)"
        ) from None


def _connect_to(raw: str | None) -> str | None:
    if not raw:
        return None
    try:
        return ipaddress.ip_address(raw.strip().strip("[]")).compressed
    except ValueError:
        raise ConfigError(
            f"--connect-to {raw!r} is not an IP address; pass e.g. --connect-to 127.0.0.1"
        ) from None


def _file(option: str, raw: str | None) -> str | None:
    if not raw:
        return None
    if not Path(raw).is_file():
        raise ConfigError(f"--{option} {raw}: no such file; give a PEM file of CA certificates")
    return raw


def parse_resolver(raw: str | None) -> tuple[str, int] | None:
    if not raw:
        return None
    host, sep, port = raw.strip().rpartition(":")
    if not sep:
        host, port = raw.strip(), "53"
    try:
        address = ipaddress.ip_address(host.strip("[]")).compressed
        number = int(port)
    except ValueError:
        address, number = "", 0
    if not address or not 0 < number < 65536:
        raise ConfigError(
            f"--resolver {raw!r}: give a DNS server as IP:PORT, e.g. --resolver 127.0.0.1:53"
        )
    return address, number


def _timeout(raw: str | None) -> float:
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 300:
        raise ConfigError(f"--timeout {raw!r}: give a number of seconds, e.g. --timeout 5")
    return value


__all__ = [
    "DEFAULT_TIMEOUT",
    "PROBE_PATH",
    "WARN_DAYS",
    "CheckSettings",
    "interface_addresses",
    "public_port",
    "settings_from_options",
]
