"""Every limit and timeout default of the client-facing leg, in one place (each bounds what one
client can make the server hold; docs/security.md lists them)."""

from __future__ import annotations

from typing import Final

__all__ = [
    "BODY_TIMEOUT",
    "HEADER_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_BODY",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_LIST",
    "MAX_QUEUED",
    "MAX_STREAMS",
    "MAX_TARGET",
    "RAPID_RESET_MIN",
]

MAX_HEADERS: Final = 100  # header fields of a request (431)
MAX_HEADER_BYTES: Final = 16384  # bytes of their names and values (431)
MAX_TARGET: Final = 16384  # bytes of a request target (414)
MAX_BODY: Final = 64 * 1024  # bytes of a request body, read whole before forwarding (413)
MAX_QUEUED: Final = 16  # pipelined HTTP/1.1 requests waiting: beyond this reading pauses
MAX_STREAMS: Final = 100  # concurrent HTTP/2 streams (SETTINGS), and streams with upstream work
# RFC 9113 6.5.2 counts 32 bytes per field on top of its name and value.
MAX_HEADER_LIST: Final = MAX_HEADER_BYTES + 32 * MAX_HEADERS + 4096
RAPID_RESET_MIN: Final = 200  # HTTP/2 resets tolerated before their ratio is looked at

HEADER_TIMEOUT: Final = 10.0  # seconds for a request's head (--header-timeout)
BODY_TIMEOUT: Final = 10.0  # seconds for its body after the head (--body-timeout)
IDLE_TIMEOUT: Final = 60.0  # seconds an idle keep-alive connection is kept (--idle-timeout)
