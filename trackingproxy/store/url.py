# -*- test-case-name: tests.store.test_store_url -*-
"""The store URL (``--store``): parsing, masking, connecting and the start-up probe.

Accepted forms (the password percent-encoded when it holds reserved characters)::

    redis://[user:password@]host[:port][/db]             plain TCP
    rediss://[user:password@]host[:port][/db]            TLS
    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]
    rediss+sentinel://...                                Sentinel, TLS to sentinels and master

The user and password are the master's (Sentinel itself is asked without them). The password
never appears in a message, a repr or a log line: ``StoreURL.masked`` replaces it by ``***``.
"""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import redis
from attrs import field, frozen
from redis import exceptions as rx
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from trackingproxy.errors import ConfigError
from trackingproxy.store.contract import StoreUnavailable

__all__ = [
    "StoreURL",
    "config_warnings",
    "connect",
    "parse_store_url",
    "password_of",
    "probe",
    "unavailable_cause",
]

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+sentinel": (False, True),
    "rediss+sentinel": (True, True),
}
_FORMS = (
    "use redis://[user:password@]host:port/db, rediss://... (TLS) or "
    "redis+sentinel://[user:password@]host:port[,host:port...]/service/db"
)


@frozen
class StoreURL:
    """A parsed store URL; ``str()`` and ``repr()`` never show the password."""

    tls: bool
    sentinel: bool
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    service: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return ("rediss" if self.tls else "redis") + ("+sentinel" if self.sentinel else "")

    @property
    def masked(self) -> str:
        """The URL with the password replaced by ``***`` (for messages, logs and status)."""
        auth = ""
        if self.username is not None or self.password is not None:
            user = _quote(self.username or "")
            auth = f"{user}:***@" if self.password is not None else f"{user}@"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        path = f"/{self.service}/{self.db}" if self.sentinel else f"/{self.db}"
        return f"{self.scheme}://{auth}{hosts}{path}"

    def __str__(self) -> str:
        return self.masked


def _quote(text: str) -> str:
    return quote(text, safe="")


def _redacted(text: str) -> str:
    """``text`` with everything between ``://`` and the last ``@`` hidden (for errors about
    a URL that could not be parsed, so a password cannot leak through them)."""
    start = text.find("://")
    at = text.rfind("@")
    if start >= 0 and at > start:
        return text[: start + 3] + "***@" + text[at + 1 :]
    if at >= 0:
        return "***@" + text[at + 1 :]
    return text


def _fail(text: str, problem: str) -> ConfigError:
    return ConfigError(f"--store {_redacted(text)}: {problem}; {_FORMS}")


def _host_port(text: str, item: str, default: int) -> tuple[str, int]:
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _fail(text, f"bad IPv6 address {item!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise _fail(text, "no host")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(text, f"bad port {port_text!r}")
    return host, int(port_text)


def _db(text: str, value: str) -> int:
    if not value:
        return 0
    if not value.isdigit():
        raise _fail(text, f"the database must be a number, not {value!r}")
    return int(value)


def parse_store_url(text: str) -> StoreURL:
    """Parse ``--store``; ConfigError (one line, password hidden) for anything else."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise _fail(text, "not a Redis URL")
    tls, sentinel = _SCHEMES[scheme.lower()]
    if "?" in rest or "#" in rest:
        raise _fail(text, "query options are not supported")
    at = rest.rfind("@")
    userinfo, rest = (rest[:at], rest[at + 1 :]) if at >= 0 else (None, rest)
    netloc, _, path = rest.partition("/")
    username = password = None
    if userinfo is not None:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    items = netloc.split(",")
    if not sentinel and len(items) > 1:
        raise _fail(text, "several hosts are only possible with redis+sentinel://")
    default = DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT
    hosts = tuple(_host_port(text, item, default) for item in items)
    parts = path.split("/") if path else []
    service = None
    if sentinel:
        if not parts or not parts[0]:
            raise _fail(text, "no Sentinel service name (the master's name) after the hosts")
        service, parts = unquote(parts[0]), parts[1:]
    if len(parts) > 1 and any(parts[1:]):
        raise _fail(text, "too many path parts")
    db = _db(text, parts[0] if parts else "")
    return StoreURL(tls, sentinel, hosts, db, service, username, password)


def connect(url: StoreURL, ca_bundle: Path | None, timeout: float = 2.0) -> redis.Redis:
    """A client for ``url`` (nothing is sent yet): bounded connect and call times, one quick
    retry (a pooled connection that a restart or failover closed), TLS verified against
    ``ca_bundle`` when given (the system CAs otherwise)."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        "health_check_interval": 30,
    }
    if url.tls:
        common["ssl"] = True
        if ca_bundle is not None:
            common["ssl_ca_certs"] = str(ca_bundle)
    auth: dict[str, Any] = {"username": url.username, "password": url.password, "db": url.db}
    if not url.sentinel:
        host, port = url.hosts[0]
        return redis.Redis(host=host, port=port, **auth, **common)
    sentinel_kwargs = {k: v for k, v in common.items() if k != "health_check_interval"}
    sentinels = Sentinel(list(url.hosts), sentinel_kwargs=sentinel_kwargs, **auth, **common)
    assert url.service is not None
    client: redis.Redis = sentinels.master_for(url.service, redis_class=redis.Redis)
    return client


_UNAVAILABLE_PREFIXES = (
    "NOAUTH", "WRONGPASS", "MISCONF", "READONLY", "LOADING", "NOPERM", "OOM", "MASTERDOWN",
    "CLUSTERDOWN", "TRYAGAIN", "BUSY",
)


# redis-py names each Sentinel it failed to ask by the whole repr of its client (every
# connection setting, object addresses): only its address is worth a message.
_CLIENT_REPR = re.compile(r"<redis\.client\.Redis\(.*?\bhost=([^,()<>]+),port=(\d+),.*?\)>\)>\)>")


def _one_line(error: BaseException, secret: str | None = None) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = _CLIENT_REPR.sub(r"Sentinel \1:\2", text)
    if secret:
        text = text.replace(secret, "***")
    return text


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unavailable_cause(error: BaseException, secret: str | None = None) -> str | None:
    """One line saying why the store cannot serve, for a redis-py error that means so (None
    for other errors: those are bugs, not outages)."""
    if isinstance(
        error,
        rx.ConnectionError | rx.TimeoutError | rx.ReadOnlyError | rx.BusyLoadingError
        | rx.OutOfMemoryError | rx.NoPermissionError | rx.InvalidResponse | socket.timeout
        | OSError,
    ):
        return _one_line(error, secret)
    if isinstance(error, rx.ResponseError):
        text = _one_line(error, secret)
        code = getattr(error, "status_code", None) or text.split(" ", 1)[0]
        if str(code).upper() in _UNAVAILABLE_PREFIXES or text.upper().startswith(
            _UNAVAILABLE_PREFIXES
        ):
            return text
    return None


def password_of(client: Any) -> str | None:
    """The password a redis-py client authenticates with (to keep it out of messages)."""
    try:
        password = client.connection_pool.connection_kwargs.get("password")
    except AttributeError:
        return None
    return password if isinstance(password, str) and password else None


def probe(client: redis.Redis, description: str) -> None:
    """PING the store (blocking, at start-up); StoreUnavailable (one line) telling apart an
    unreachable store, an untrusted TLS certificate (or a failed handshake), a Sentinel that
    knows no such master, a refused password and something that is not a Redis server."""
    secret = password_of(client)
    try:
        client.ping()
    except (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError) as e:
        raise StoreUnavailable(
            f"store {description}: wrong password or user (AUTH failed: "
            f"{_one_line(e, secret)}); fix the user and password in the store URL"
        ) from None
    except rx.InvalidResponse as e:
        raise StoreUnavailable(
            f"store {description}: not a Redis server (it answered {_one_line(e, secret)}); "
            "check the host and port of the store URL"
        ) from None
    except (rx.ConnectionError, rx.TimeoutError) as e:
        cause = _one_line(e, secret)
        if "CERTIFICATE_VERIFY_FAILED" in cause or _caused_by(e, ssl.SSLCertVerificationError):
            raise StoreUnavailable(
                f"store {description}: TLS certificate not trusted ({cause}); give "
                "--store-ca-bundle the PEM file of the CA that signed the server's certificate, "
                "and a host in the store URL that the certificate names"
            ) from None
        if _caused_by(e, ssl.SSLError):
            raise StoreUnavailable(
                f"store {description}: TLS handshake failed ({cause}); check that the port "
                "speaks TLS (rediss://) and accepts clients without a certificate"
            ) from None
        service = getattr(client.connection_pool, "service_name", None)
        if isinstance(e, MasterNotFoundError) and cause == f"No master found for {service!r}":
            raise StoreUnavailable(
                f"store {description}: the Sentinels answered but name no usable master "
                f"{service!r}: check the service name (the name in `sentinel monitor`), or "
                "the master is down and no replica has been promoted yet"
            ) from None
        raise StoreUnavailable(
            f"store {description}: unreachable (connection refused / timed out): {cause}"
        ) from None
    except rx.ResponseError as e:
        cause = _one_line(e, secret)
        if cause.upper().startswith(("NOAUTH", "WRONGPASS", "ERR AUTH", "INVALID PASSWORD")):
            raise StoreUnavailable(
                f"store {description}: wrong password or user (AUTH failed: {cause}); fix the "
                "user and password in the store URL"
            ) from None
        raise StoreUnavailable(f"store {description}: {cause}") from None


def config_warnings(client: redis.Redis, description: str) -> list[str]:
    """One line per Redis setting that endangers the data, naming the fix (blocking; [] when
    CONFIG is not allowed, as on most managed services)."""
    pipe = client.pipeline(transaction=False)
    for name in ("appendonly", "save", "maxmemory-policy"):
        pipe.config_get(name)
    try:
        answers = pipe.execute()
    except rx.ResponseError as e:
        text = str(e).lower()
        if isinstance(e, rx.NoPermissionError) or "unknown command" in text or "noperm" in text:
            return []
        raise
    config = {_str(k): _str(v) for answer in answers for k, v in answer.items()}
    warnings = []
    if config.get("appendonly", "no") != "yes" and not config.get("save", "").strip():
        warnings.append(
            f"store {description} keeps nothing on disk (appendonly no, save ''): a restart "
            "loses every certificate, lock and fence; set `appendonly yes` (or a `save` "
            "schedule) in its configuration"
        )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        warnings.append(
            f"store {description} may evict keys under memory pressure (maxmemory-policy "
            f"{policy}): certificates and locks could vanish; set `maxmemory-policy noeviction`"
        )
    return warnings


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
