"""Command-line options (twistd's usage.Options), each also settable from the environment.

Every option ``--some-name`` can be given as ``TRACKINGPROXY_SOME_NAME``; repeatable options take
a comma-separated list there, under their plural name too (``TRACKINGPROXY_DOMAINS=a.com,b.com``).
The command line wins over the environment. ``Options.config()`` turns the result into a frozen
ProxyConfig or raises ConfigError with one line naming the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.python import usage

ENV_PREFIX = "TRACKINGPROXY_"
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}

# name -> (plural env name or None, help)
REPEATABLE: dict[str, tuple[str, str]] = {
    "domain": ("DOMAINS", "A tracking domain to serve (repeatable; at least one)."),
    "cert": ("CERTS", "PEM certificate chain file; pair with --key (repeatable)."),
    "key": ("KEYS", "PEM private key file for the preceding --cert (repeatable)."),
    "trusted-proxy": (
        "TRUSTED_PROXIES",
        "CIDR of a proxy/load balancer whose X-Forwarded-For is trusted (repeatable).",
    ),
}

PARAMETERS: list[tuple[str, str | None, str]] = [
    (
        "upstream",
        "https://spgo.io",
        "Tracking endpoint: us (spgo.io), eu (eu.spgo.io), us-v2 (v2.spgo.io), eu-v2 "
        "(eu.v2.spgo.io), enterprise:TENANT (TENANT.et.e.sparkpost.com) or a URL. Pick the "
        "endpoint SparkPost's domain settings show for the tracking domain (new domains: V2).",
    ),
    (
        "upstream-ca-bundle",
        None,
        "Extra PEM CA bundle trusted for the upstream (default: system store).",
    ),
    ("upstream-timeout", "10", "Seconds to wait for the upstream's response headers (then 504)."),
    (
        "outage-mode",
        "off",
        "When the upstream cannot be reached: off (502/504), or replay (local answers, a "
        "journal re-sent once after recovery).",
    ),
    ("remember-links", "100000", "Click redirects remembered for replay mode (LRU, 24 h)."),
    ("journal-ttl", "86400", "Seconds a journaled request is kept for replay (at most 259200)."),
    ("journal-max-bytes", "67108864", "Size limit of the replay journal (oldest dropped)."),
    (
        "upstream-max-connections",
        "1024",
        "Most upstream connections at once; beyond, requests wait up to 5 s, then 503.",
    ),
    (
        "upstream-max-age",
        "120",
        "Seconds after which an upstream connection is retired (follows DNS).",
    ),
    (
        "http-port",
        "tcp:80",
        "Twisted endpoint for plain HTTP, e.g. haproxy:tcp:80; 'none' disables.",
    ),
    (
        "https-port",
        "tcp:443",
        "Twisted endpoint for HTTPS, e.g. tcp:443:interface=::; 'none' disables.",
    ),
    (
        "admin-port",
        "tcp:9180:interface=127.0.0.1",
        "Endpoint for /healthz, /readyz, /metrics, /status and the status page; 'none' disables.",
    ),
    ("domains-file", None, "File of tracking domains, one per line (re-read on SIGHUP)."),
    ("shutdown-timeout", "10", "Seconds in-flight requests get to finish on SIGTERM."),
    ("certs-dir", None, "Directory of NAME.pem files, each holding a private key and its chain."),
    (
        "well-known-dir",
        None,
        "Directory of files served as-is under /.well-known/ on every domain.",
    ),
    (
        "access-log",
        "stdout",
        "Access log destination: stdout, log (the twistd log), off, or a file path.",
    ),
    ("log-format", "combined", "Access log format: combined or json."),
    ("log-level", "info", "Lowest level of the process log: debug, info, warn, error, critical."),
    ("log-paths", "full", "Paths in the access log: full, or redacted (hash of tracking tokens)."),
    ("email", None, "ACME account contact address (recommended)."),
    (
        "acme-directory",
        "letsencrypt",
        "ACME directory URL, or letsencrypt, letsencrypt-staging, zerossl, google, local.",
    ),
    ("acme-ca-bundle", None, "PEM CA bundle trusted for the ACME server's own HTTPS."),
    ("eab-kid", None, "External Account Binding key id (ZeroSSL, Google, private CAs)."),
    ("eab-hmac-key", None, "External Account Binding HMAC key (base64url)."),
    ("acme-profile", None, "ACME certificate profile, used if the directory offers it."),
    ("key-type", "ecdsa-p256", "Certificate key: ecdsa-p256, ecdsa-p384, rsa2048, rsa4096."),
    (
        "state-dir",
        None,
        "State directory [default: /var/lib/trackingproxy, else ./trackingproxy-state].",
    ),
    ("panic-command", None, "Command run when a certificate nears expiry and renewal fails."),
    (
        "store",
        None,
        "Store shared by replicas: redis://[user:password@]host:port/db, rediss://..., or "
        "redis+sentinel://host:port[,host:port]/service/db; also from the file named by "
        "TRACKINGPROXY_STORE_FILE [default: the state directory only].",
    ),
    ("store-ca-bundle", None, "PEM CA bundle trusted for a rediss:// store's TLS."),
    ("store-prefix", "trackingproxy:", "Prefix of every key in the store (one per cluster)."),
    ("node-id", None, "This replica's name in locks, logs, metrics, /status [default: host name]."),
    (
        "acme-max-orders-per-hour",
        "90",
        "ACME orders placed per hour at most (first issuance and renewals, queued and paced).",
    ),
    (
        "metrics-per-domain",
        "auto",
        "Request counters per domain in /metrics: on, off, or auto (on below 100 domains).",
    ),
    (
        "order-lock-ttl",
        "120",
        "Seconds an order lock outlives a replica that stopped refreshing it (kill -9, pause).",
    ),
    ("idle-timeout", "60", "Seconds an idle client keep-alive connection is kept open."),
    ("header-timeout", "10", "Seconds a client has to send a request's headers (slowloris)."),
    (
        "body-timeout",
        "10",
        "Seconds a client has to send a request's body once its headers arrived (then 408).",
    ),
    ("workers", "1", "Processes serving the listeners: a number, or auto (one per usable CPU)."),
    (
        "http2-engine",
        "auto",
        "HTTP/2 implementation: nghttp2 (libnghttp2, fast), python (h2), or auto (nghttp2 if "
        "the library loads).",
    ),
]

FLAGS: list[tuple[str, str]] = [
    ("redirect-http", "Redirect plain HTTP to HTTPS (off by default: SparkPost advises against)."),
    ("no-acme", "Do not obtain certificates over ACME; serve only --cert/--certs-dir ones."),
    ("check", "Check DNS, ports, certificate, upstream and /f/a/b/c/d probes; exit 0/1."),
]


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


class Options(usage.Options):
    """``twistd trackingproxy`` options."""

    synopsis = "[options]"
    longdesc = (
        "Serve SparkPost tracking domains (opens /q/ and clicks /f/) over HTTP and HTTPS, "
        "proxying to spgo.io. Every option can also be set as TRACKINGPROXY_<NAME>."
    )
    optParameters = [
        [name, None, None, help_ + (f" [default: {default}]" if default else "")]
        for name, default, help_ in PARAMETERS
    ]
    optFlags = [[name, None, help_] for name, help_ in FLAGS]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        for name in REPEATABLE:
            self[name] = []

    # repeatable options --------------------------------------------------------------
    def opt_domain(self, value: str) -> None:
        """A tracking domain to serve (repeatable; at least one). Env: TRACKINGPROXY_DOMAINS."""
        self["domain"].append(value)

    def opt_cert(self, value: str) -> None:
        """PEM certificate (full chain) file; pair each with --key (repeatable)."""
        self["cert"].append(value)

    def opt_key(self, value: str) -> None:
        """PEM private key file for the --cert given at the same position (repeatable)."""
        self["key"].append(value)

    def opt_trusted_proxy(self, value: str) -> None:
        """CIDR of a proxy whose X-Forwarded-For is trusted (repeatable)."""
        self["trusted-proxy"].append(value)

    def postOptions(self) -> None:
        """Fill what the command line left unset from the environment, then from defaults."""
        from trackingproxy.errors import ConfigError, exit_with

        try:
            self.apply_environment()
        except ConfigError as e:
            exit_with(e.message)

    def apply_environment(self) -> None:
        env = self.environ
        for name, (plural, _) in REPEATABLE.items():
            if not self[name]:
                raw = env.get(ENV_PREFIX + plural) or env.get(env_name(name)) or ""
                self[name] = [v.strip() for v in raw.split(",") if v.strip()]
        if self.get("store") is None and not env.get(env_name("store")):
            self["store"] = read_secret_file(env, "store")
        for name, default, _ in PARAMETERS:
            if self[name] is None:
                self[name] = env.get(env_name(name), default)
        for name, _ in FLAGS:
            if not self[name]:
                self[name] = parse_bool(name, env.get(env_name(name), ""))


def read_secret_file(env: Mapping[str, str], name: str) -> str | None:
    """``TRACKINGPROXY_<NAME>_FILE``: the option's value read from a file (a mounted secret)."""
    from trackingproxy.errors import ConfigError

    path = env.get(env_name(name) + "_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(
            f"{env_name(name)}_FILE={path}: cannot read it ({reason}); mount the secret there"
        ) from None
    if not value:
        raise ConfigError(f"{env_name(name)}_FILE={path} is empty; put the --{name} value in it")
    return value


def parse_bool(name: str, raw: str) -> bool:
    from trackingproxy.errors import ConfigError

    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ConfigError(f"{env_name(name)}={raw!r}: use 1/true/yes or 0/false/no")


def as_dict(options: usage.Options) -> dict[str, Any]:
    return dict(options.items())
