"""The process log keeps the project's lines and drops Twisted's bookkeeping, at --log-level."""

from __future__ import annotations

import pytest
from twisted.logger import LogEvent, Logger, LogLevel, LogPublisher

from trackingproxy.errors import ConfigError
from trackingproxy.logs.quiet import parse_level, quiet

# Lines Twisted 26 writes as a proxy starts, looks up its upstream and stops (as formatted).
BOOKKEEPING = [
    "Starting factory <trackingproxy.server.listener.HTTPListener object at 0x7f7cfff31ed0>",
    "Stopping factory <trackingproxy.server.listener.HTTPListener object at 0x7f7cfff31ed0>",
    "Starting factory <twisted.protocols.haproxy._wrapper.HAProxyWrappingFactory object at 0x1>",
    "HTTPListener starting on 18080",
    "HTTPListener (TLS) starting on 18443",
    "HTTPListener (PROXY) starting on 57795",
    "AdminSite starting on 19180",
    "DNSDatagramProtocol starting on 60338",
    "Starting protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7fdc74cb5310>",
    "Stopping protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7fdc74cb5310>",
    "(UDP Port 60338 Closed)",
    "(TCP Port 18080 Closed)",
    "b'/etc/resolv.conf' changed, reparsing",
    "Resolver added ('10.255.255.53', 53) to server list",
]
OWN = [
    "--http-port listening on 127.0.0.1:18080",
    "a.example.com: serving certificate 4b73 from CN=R3, valid until 2027-01-04T03:26:09+00:00",
    "Received SIGTERM, shutting down.",
]


def _seen(level: LogLevel, lines: list[str], at: LogLevel = LogLevel.info) -> list[str]:
    captured: list[LogEvent] = []
    publisher = LogPublisher(quiet(captured.append, at))
    logger = Logger(observer=publisher, namespace="somewhere")
    for line in lines:
        logger.emit(level, "{line}", line=line)
    return [e["line"] for e in captured]


def test_bookkeeping_is_dropped_own_lines_kept() -> None:
    """Every bookkeeping line is dropped at info level; the project's lines all pass."""
    assert _seen(LogLevel.info, BOOKKEEPING) == []
    assert _seen(LogLevel.info, OWN) == OWN


def test_warnings_always_pass() -> None:
    """A warning or error is never dropped, whatever it says."""
    assert _seen(LogLevel.warn, BOOKKEEPING[:2]) == BOOKKEEPING[:2]
    assert _seen(LogLevel.error, BOOKKEEPING[-1:]) == BOOKKEEPING[-1:]


def test_level() -> None:
    """--log-level warn drops info lines; debug lets them through."""
    assert _seen(LogLevel.info, OWN, at=LogLevel.warn) == []
    assert _seen(LogLevel.warn, OWN[:1], at=LogLevel.warn) == OWN[:1]
    assert _seen(LogLevel.debug, OWN[:1], at=LogLevel.debug) == OWN[:1]


@pytest.mark.parametrize("raw", ["debug", "info", "warn", "warning", "ERROR", "critical"])
def test_parse_level(raw: str) -> None:
    """The five levels (and "warning") are accepted, in any case."""
    assert parse_level(raw).name in ("debug", "info", "warn", "error", "critical")


def test_parse_level_refuses_others() -> None:
    """Anything else is one line naming the choices."""
    with pytest.raises(ConfigError, match="debug, info, warn, error, critical"):
        parse_level("loud")
