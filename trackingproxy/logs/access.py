"""Access log lines (combined or JSON), with optional redaction of tracking tokens.

SparkPost tracking paths (``/f/<token>``, ``/q/<token>``) embed the recipient's address; the
redacted form keeps the prefix and a short hash of the rest so lines can still be correlated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, Literal

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from trackingproxy.logs.writer import open_access_log
from trackingproxy.server.exchange import ClientExchange
from trackingproxy.server.listener import ListenerObserver

LogFormat = Literal["combined", "json"]
PathMode = Literal["full", "redacted"]

_log = Logger(namespace="trackingproxy.access")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@frozen
class AccessEntry:
    """One finished request."""

    when: float
    client: str
    host: str
    method: str
    target: bytes
    protocol: str
    status: int
    sent: int
    referer: str
    user_agent: str
    duration: float
    scheme: str


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def redact_target(target: bytes) -> str:
    """``/f/abc...?x=1`` -> ``/f/<hash>``; other paths keep the path and hash the query."""
    path, sep, query = target.partition(b"?")
    for prefix in (b"/f/", b"/q/"):
        if path.startswith(prefix):
            rest = target[len(prefix) :]
            return prefix.decode() + _short_hash(rest) if rest else prefix.decode()
    shown = path.decode("latin-1")
    return shown + ("?" + _short_hash(query) if sep else "")


def _clf_time(when: float) -> str:
    t = time.gmtime(when)
    return (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


# What a combined line shows of client-sent text: '"' and '\\' escaped, and control characters
# and bytes over 0x7e as \xHH (as nginx does), so no field can end the line or forge another.
_ESCAPES: dict[int, str] = {
    **{c: f"\\x{c:02X}" for c in (*range(0x20), *range(0x7F, 0x100))},
    ord("\\"): "\\\\",
    ord('"'): '\\"',
}


def _quote(text: str) -> str:
    return text.translate(_ESCAPES)


def _log_line(line: str) -> None:
    _log.info("{line}", line=line)


class AccessLog:
    """Formats AccessEntry values and hands each line to ``write`` (default: the twistd log)."""

    def __init__(
        self,
        fmt: LogFormat = "combined",
        paths: PathMode = "full",
        write: Callable[[str], None] | None = _log_line,
    ) -> None:
        """``write`` None turns the access log off."""
        self._fmt = fmt
        self._paths = paths
        self._write = write

    @property
    def enabled(self) -> bool:
        return self._write is not None

    def shown_target(self, target: bytes) -> str:
        if self._paths == "redacted":
            return redact_target(target)
        return target.decode("latin-1")

    def record(self, e: AccessEntry) -> dict[str, object]:
        """The entry as JSON-able fields (the ``json`` format, and the JSON log observer)."""
        return {
            "type": "access",
            "time": e.when,
            "target": self.shown_target(e.target),
            "client": e.client,
            "host": e.host,
            "method": e.method,
            "protocol": e.protocol,
            "scheme": e.scheme,
            "status": e.status,
            "bytes": e.sent,
            "referer": e.referer,
            "user_agent": e.user_agent,
            "duration_ms": round(e.duration * 1000, 3),
        }

    def format(self, e: AccessEntry) -> str:
        if self._fmt == "json":
            return json.dumps(self.record(e), separators=(",", ":"))
        target = self.shown_target(e.target)
        return (
            f'{e.client} - - [{_clf_time(e.when)}] "{_quote(e.method)} {_quote(target)} '
            f'{e.protocol}" {e.status} {e.sent} "{_quote(e.referer or "-")}" '
            f'"{_quote(e.user_agent or "-")}" host={e.host or "-"} '
            f"scheme={e.scheme} time={e.duration * 1000:.1f}ms"
        )

    def log(self, entry: AccessEntry) -> None:
        if self._write is None:
            return
        if self._write is _log_line and self._fmt == "json":
            # The JSON log observer writes these fields as the line itself.
            _log.info("{line}", line=self.format(entry), access=self.record(entry))
        else:
            self._write(self.format(entry))


class AccessLogObserver(ListenerObserver):
    """Writes one access-log entry per finished request of one listener (``scheme``)."""

    def __init__(self, access_log: AccessLog, scheme: str, clock: IReactorTime) -> None:
        self._log = access_log
        self._scheme = scheme
        self._clock = clock

    def request_done(self, exchange: ClientExchange) -> None:
        if not self._log.enabled:
            return
        now = self._clock.seconds()
        outcome = exchange.outcome
        self._log.log(
            AccessEntry(
                when=now,
                client=outcome.client or exchange.peer_host(),
                host=outcome.host,
                method=exchange.method.decode("latin-1"),
                target=exchange.uri,
                protocol=exchange.clientproto.decode("latin-1") or "-",
                status=exchange.code,
                sent=exchange.sent,
                referer=(exchange.header(b"referer") or b"").decode("latin-1"),
                user_agent=(exchange.header(b"user-agent") or b"").decode("latin-1"),
                duration=now - exchange.started,
                scheme=self._scheme,
            )
        )


def build_access_log(
    destination: str, fmt: LogFormat, paths: PathMode, reactor: Any
) -> AccessLog:
    """The access log of ``--access-log``: buffered to stdout or a file, the twistd log, or
    off (``destination``: ``stdout``, a path, ``log`` or ``off``)."""
    if destination == "off":
        return AccessLog(fmt, paths, write=None)
    if destination == "log":
        return AccessLog(fmt, paths)
    writer = open_access_log(destination, reactor)
    reactor.addSystemEventTrigger("after", "shutdown", writer.close)
    return AccessLog(fmt, paths, write=writer)
