"""What the HTTP/1.x answers put on the wire besides the fields: status lines (all prebuilt
at import) and the ``Date`` field (formatted once per second)."""

from __future__ import annotations

import time

from twisted.web.http import RESPONSES

__all__ = ["date_line", "http_date", "status_line"]

# Reason phrases twisted.web does not know (RFC 9110).
_PHRASES = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    431: b"Request Header Fields Too Large",
}

_DAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS = (
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
    b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
)  # fmt: skip


_cached_second = -1
_cached_date = b""
_cached_line = b""


def http_date(now: float | None = None) -> bytes:
    """The IMF-fixdate for ``now`` (default: the current time), formatted once per second."""
    global _cached_second, _cached_date, _cached_line
    second = int(time.time() if now is None else now)
    if second != _cached_second:
        t = time.gmtime(second)
        _cached_date = b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
            _DAYS[t.tm_wday],
            t.tm_mday,
            _MONTHS[t.tm_mon - 1],
            t.tm_year,
            t.tm_hour,
            t.tm_min,
            t.tm_sec,
        )
        _cached_line = b"Date: " + _cached_date + b"\r\n"
        _cached_second = second
    return _cached_date


def date_line(now: float | None = None) -> bytes:
    """``Date: ...\\r\\n`` for ``now``."""
    http_date(now)
    return _cached_line


def _status_line(version: bytes, code: int) -> bytes:
    phrase = _PHRASES.get(code) or RESPONSES.get(code, b"Unknown Status")
    return b"%s %d %s\r\n" % (version, code, phrase)


# Every status line, built at import (as uvicorn does): one dict lookup per answer.
_STATUS_LINES: dict[tuple[bytes, int], bytes] = {
    (version, code): _status_line(version, code)
    for version in (b"HTTP/1.1", b"HTTP/1.0")
    for code in range(100, 600)
}


def status_line(version: bytes, code: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` (prebuilt for HTTP/1.1 and 1.0, codes 100 to 599)."""
    return _STATUS_LINES.get((version, code)) or _status_line(version, code)
