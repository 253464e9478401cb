"""The frozen configuration of a trackingproxy process, validated from parsed options.

All user-caused problems surface here (or when listening) as one ConfigError line that names the
fix. Loading certificate and well-known files happens here, once, at start-up.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from attrs import field, frozen

from trackingproxy.acme.settings import AcmeSettings
from trackingproxy.domains import normalise_domain, read_domains_file
from trackingproxy.errors import ConfigError
from trackingproxy.logs.access import LogFormat, PathMode
from trackingproxy.logs.quiet import parse_level
from trackingproxy.proxy.forwarded import IPNetwork, parse_networks
from trackingproxy.store.settings import store_settings_from_options
from trackingproxy.tls.certificates import (
    CertsDirFiles,
    LoadedCertificate,
    check_usable,
    covered_domains,
    load_certs_dir,
    load_pair,
)
from trackingproxy.upstream.target import UpstreamTarget, parse_upstream

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@frozen
class ProxyConfig:
    domains: tuple[str, ...]
    command_line_domains: tuple[str, ...]  # as given (--domain / env), before the domains file
    domains_file: Path | None
    cert_files: tuple[tuple[Path, Path], ...]  # --cert/--key pairs, re-read on SIGHUP
    shutdown_timeout: float
    upstream: UpstreamTarget
    upstream_ca_bundle: str | None
    upstream_timeout: float
    upstream_max_age: float
    upstream_max_connections: int
    http_port: str | None
    https_port: str | None
    certificates: tuple[LoadedCertificate, ...]
    certs_dir: Path | None
    trusted_proxies: tuple[IPNetwork, ...]
    well_known_dir: Path | None
    redirect_http: bool
    log_format: LogFormat
    access_log: str  # "stdout", "log", "off" or a file path
    log_paths: PathMode
    idle_timeout: float
    header_timeout: float
    body_timeout: float
    acme: AcmeSettings
    admin_port: str | None = None  # --admin-port (None: no admin listener, no metrics)
    workers: int = 1  # --workers: processes sharing the listeners (trackingproxy.ops.supervisor)
    http2_engine: str = "auto"  # --http2-engine: auto, nghttp2 or python (server.engines)
    metrics_per_domain: str = "auto"  # --metrics-per-domain: on, off, auto (admin.metrics)
    log_level: str = "info"  # --log-level (logs.quiet)
    outage_mode: str = "off"  # --outage-mode: off or replay
    remember_links: int = 100_000  # --remember-links
    journal_ttl: float = 86_400.0  # --journal-ttl (seconds, at most 72 h)
    journal_max_bytes: int = 64 * 1024 * 1024  # --journal-max-bytes
    certs_dir_files: CertsDirFiles = field(  # what --certs-dir held at start, for SIGHUP
        factory=CertsDirFiles, eq=False, repr=False
    )

    @property
    def user_covered(self) -> tuple[str, ...]:
        """Configured domains covered by a certificate the user brought (never ordered)."""
        return covered_domains(self.certificates, self.domains)


def _positive_seconds(option: str, raw: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= 86400:
        raise ConfigError(f"--{option} {raw!r}: give a number of seconds, e.g. --{option} 10")
    return value


def _count(option: str, raw: str, most: int = 65536) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if not 0 < value <= most:
        raise ConfigError(f"--{option} {raw!r}: give a whole number from 1 to {most}")
    return value


def _choice(option: str, raw: str, choices: tuple[str, ...]) -> str:
    value = (raw or "").strip().lower()
    if value not in choices:
        raise ConfigError(f"--{option} {raw!r}: choose one of {', '.join(choices)}")
    return value


def _endpoint(option: str, raw: str | None) -> str | None:
    value = (raw or "").strip()
    if not value:
        raise ConfigError(f"--{option} is empty; give an endpoint such as tcp:80, or 'none'")
    return None if value.lower() == "none" else value


def _dir(option: str, raw: str | None) -> Path | None:
    if not raw:
        return None
    path = Path(raw)
    if not path.is_dir():
        raise ConfigError(f"--{option} {raw}: no such directory; create it or fix the path")
    return path


def _domains(
    raw: list[str], domains_file: Path | None, allow_empty: bool = False
) -> tuple[str, ...]:
    if domains_file is not None:
        raw = raw + read_domains_file(domains_file)
    if not raw and not allow_empty:
        raise ConfigError(
            "no domain configured; pass --domain click.example.com "
            "(or set TRACKINGPROXY_DOMAINS=click.example.com)"
        )
    seen: dict[str, None] = {}
    for value in raw:
        seen[normalise_domain(value)] = None
    return tuple(seen)


def _user_certificates(
    opts: Mapping[str, Any], domains: tuple[str, ...], now: datetime.datetime,
    files: CertsDirFiles,
) -> tuple[tuple[LoadedCertificate, ...], Path | None]:
    certs_paths: list[str] = opts["cert"]
    key_paths: list[str] = opts["key"]
    if len(certs_paths) != len(key_paths):
        raise ConfigError(
            f"{len(certs_paths)} --cert but {len(key_paths)} --key given; pass them in pairs "
            "(--cert fullchain.pem --key privkey.pem)"
        )
    loaded = [load_pair(Path(c), Path(k)) for c, k in zip(certs_paths, key_paths, strict=True)]
    certs_dir = _dir("certs-dir", opts.get("certs-dir"))
    if certs_dir is not None:
        loaded.extend(load_certs_dir(certs_dir, files))
    check_usable(loaded, domains, now)
    return tuple(loaded), certs_dir


def config_from_options(opts: Mapping[str, Any], now: datetime.datetime) -> ProxyConfig:
    """Validate parsed options (after environment defaults were applied)."""
    domains_file = Path(opts["domains-file"]) if opts.get("domains-file") else None
    # With --store the list may come from the store alone (`trackingproxy domains add`).
    domains = _domains(list(opts["domain"]), domains_file, allow_empty=bool(opts.get("store")))
    certs_dir_files = CertsDirFiles()
    certificates, certs_dir = _user_certificates(opts, domains, now, certs_dir_files)
    ca_bundle = opts.get("upstream-ca-bundle") or None
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise ConfigError(
            f"--upstream-ca-bundle {ca_bundle}: no such file; give a PEM file of CA certificates"
        )
    return ProxyConfig(
        domains=domains,
        command_line_domains=tuple(opts["domain"]),
        domains_file=domains_file,
        cert_files=tuple(
            (Path(c), Path(k)) for c, k in zip(opts["cert"], opts["key"], strict=True)
        ),
        shutdown_timeout=_positive_seconds("shutdown-timeout", opts["shutdown-timeout"]),
        upstream=parse_upstream(opts["upstream"]),
        upstream_ca_bundle=ca_bundle,
        upstream_timeout=_positive_seconds("upstream-timeout", opts["upstream-timeout"]),
        upstream_max_age=_positive_seconds("upstream-max-age", opts["upstream-max-age"]),
        upstream_max_connections=_count(
            "upstream-max-connections", opts.get("upstream-max-connections") or "1024"
        ),
        http_port=_endpoint("http-port", opts["http-port"]),
        https_port=_endpoint("https-port", opts["https-port"]),
        certificates=certificates,
        certs_dir=certs_dir,
        certs_dir_files=certs_dir_files,
        trusted_proxies=parse_networks(opts["trusted-proxy"]),
        well_known_dir=_dir("well-known-dir", opts.get("well-known-dir")),
        redirect_http=bool(opts["redirect-http"]),
        log_format=cast(LogFormat, _choice("log-format", opts["log-format"], ("combined", "json"))),
        access_log=(opts.get("access-log") or "stdout").strip(),
        log_paths=cast(PathMode, _choice("log-paths", opts["log-paths"], ("full", "redacted"))),
        idle_timeout=_positive_seconds("idle-timeout", opts["idle-timeout"]),
        header_timeout=_positive_seconds("header-timeout", opts["header-timeout"]),
        body_timeout=_positive_seconds("body-timeout", opts.get("body-timeout") or "10"),
        acme=_acme_settings(opts),
        admin_port=_endpoint("admin-port", opts.get("admin-port", "none")),
        workers=parse_workers(opts.get("workers") or "1"),
        http2_engine=parse_http2_engine(opts.get("http2-engine") or "auto"),
        log_level=parse_level(opts.get("log-level") or "info").name,
        outage_mode=_choice("outage-mode", opts.get("outage-mode") or "off", ("off", "replay")),
        remember_links=_count("remember-links", opts.get("remember-links") or "100000",
                              most=10_000_000),
        journal_ttl=_journal_ttl(opts.get("journal-ttl") or "86400"),
        journal_max_bytes=_count("journal-max-bytes", opts.get("journal-max-bytes")
                                 or str(64 * 1024 * 1024), most=2**40),
        metrics_per_domain=_choice(
            "metrics-per-domain", opts.get("metrics-per-domain") or "auto", ("auto", "on", "off")
        ),
    )


def _journal_ttl(raw: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= 72 * 3600:
        raise ConfigError(f"--journal-ttl {raw!r}: give 1 to 259200 seconds (72 h), e.g. 86400")
    return value


def parse_node_id(raw: str | None) -> str:
    """``--node-id`` (default: the host name): letters, digits and ``.-_``, at most 63."""
    value = (raw or "").strip() or socket.gethostname() or "node"
    if not _NODE_ID.match(value):
        raise ConfigError(
            f"--node-id {value!r}: use 1 to 63 letters, digits, '.', '-' or '_' (e.g. the pod name)"
        )
    return value


def parse_http2_engine(raw: str) -> str:
    """``--http2-engine``: asking for nghttp2 explicitly fails at start if it cannot load."""
    from trackingproxy.server.engines import ENGINES
    from trackingproxy.server.nghttp2 import load

    engine = _choice("http2-engine", raw, ENGINES)
    if engine == "nghttp2":
        bound = load()
        if isinstance(bound, str):
            raise ConfigError(f"--http2-engine nghttp2: {bound}; or use --http2-engine python")
    return engine


def parse_workers(raw: str) -> int:
    """``--workers N`` (1 to 256) or ``auto``: the CPUs this process may run on."""
    value = raw.strip().lower()
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)
    if not value.isdigit() or not 1 <= int(value) <= 256:
        raise ConfigError(f"--workers {raw!r}: give a number of processes (1-256) or auto")
    return int(value)


def _acme_settings(opts: Mapping[str, Any]) -> AcmeSettings:
    bundle = opts.get("acme-ca-bundle") or None
    if bundle is not None and not Path(bundle).is_file():
        raise ConfigError(
            f"--acme-ca-bundle {bundle}: no such file; give a PEM file of CA certificates"
        )
    state = opts.get("state-dir") or None
    settings = AcmeSettings(
        email=opts.get("email") or None,
        directory=opts["acme-directory"],
        ca_bundle=Path(bundle) if bundle else None,
        eab_kid=opts.get("eab-kid") or None,
        eab_hmac_key=opts.get("eab-hmac-key") or None,
        profile=opts.get("acme-profile") or None,
        key_type=opts["key-type"],
        state_dir=Path(state) if state else None,
        no_acme=bool(opts["no-acme"]),
        panic_command=opts.get("panic-command") or None,
        store=store_settings_from_options(opts),
        node_id=parse_node_id(opts.get("node-id")),
        order_lock_ttl=_positive_seconds("order-lock-ttl", opts.get("order-lock-ttl") or "120"),
        max_orders_per_hour=_count(
            "acme-max-orders-per-hour", opts.get("acme-max-orders-per-hour") or "90", most=10000
        ),
    )
    if not settings.no_acme:
        settings.validate()
    return settings
