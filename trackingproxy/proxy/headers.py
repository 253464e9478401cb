"""The header tables of the proxy: what is never taken from the client, what the client may
claim only through a trusted proxy, what is never passed back from the upstream, and the
helpers that apply them (field values kept on one line, Connection tokens).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "CLIENT_CLAIMS",
    "HOP_BY_HOP",
    "INBOUND_DROP",
    "OUTBOUND_DROP",
    "one_line",
    "outbound_drop",
    "tokens",
]

_TOKEN_NAME = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: a field name

# RFC 9110 7.6.1 connection-specific fields, plus the legacy ones nginx also drops.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",
    }
)
# Never taken from the client: we set them, or they would let a client spoof what we assert.
INBOUND_DROP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",  # answered here (the body is read before forwarding), never passed on
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
}
# Fields that claim who the client is, or rewrite what it asked for: believed by some
# upstreams and log pipelines, so passed on only from a --trusted-proxy. Compared with '_'
# read as '-' (some servers fold X_Real_IP into X-Real-IP).
CLIENT_CLAIMS = frozenset(
    {
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-forwarded",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"front-end-https",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-uri",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
OUTBOUND_DROP = HOP_BY_HOP | {b"server", b"content-length"}


_drop_by_connection: dict[tuple[bytes, ...], frozenset[bytes]] = {}


def outbound_drop(connection: Sequence[bytes]) -> frozenset[bytes]:
    """The response header names (lower case) not to pass on, given the upstream's Connection
    values (the upstream sends the same few, e.g. ``keep-alive``, on every response: cached)."""
    key = tuple(connection)
    drop = _drop_by_connection.get(key)
    if drop is None:
        drop = OUTBOUND_DROP | {t for t in tokens(connection) if _TOKEN_NAME.match(t)}
        if len(_drop_by_connection) < 64:
            _drop_by_connection[key] = drop
    return drop


def one_line(value: bytes) -> bytes:
    """``value`` with any CR or LF turned into a space (as twisted.web's Headers does): the
    parsers already refuse them, this keeps a forwarded field from ever splitting the request."""
    if b"\r" in value or b"\n" in value:
        return b" ".join(value.splitlines())
    return value


def tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())
