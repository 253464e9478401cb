"""Typed failures of the upstream leg.

Every failure the upstream client reports is an `UpstreamError` whose `cause` names the phase
that failed (used as a metrics label) and whose `status` is the HTTP status the proxy answers
with: 504 for a timeout, 503 when every allowed upstream connection stayed busy, 502 for
everything else. `written` says whether the request was ever handed to a connection: False
means it provably never reached the upstream (DNS, connect and TLS failures, the busy queue, a
timeout while still waiting for a connection); True, the default, means it may have.
"""

from __future__ import annotations

from typing import ClassVar, Final

CAUSES: Final = ("dns", "connect", "tls", "timeout", "reset", "protocol", "busy")


class UpstreamError(Exception):
    """The upstream could not give a response; `reason` is the underlying exception, if any."""

    cause: ClassVar[str] = "protocol"
    status: ClassVar[int] = 502

    def __init__(
        self, message: str, reason: BaseException | None = None, *, written: bool = True
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.written = written  # False: the request provably never reached the upstream

    def __str__(self) -> str:
        return self.message


class DNSLookupFailed(UpstreamError):
    """The upstream host name has no address, and no earlier answer is cached."""

    cause = "dns"


class UpstreamConnectFailed(UpstreamError):
    """No TCP connection could be made to any upstream address (refused, unreachable, timeout)."""

    cause = "connect"


class UpstreamTLSFailed(UpstreamError):
    """The TLS handshake failed, e.g. the certificate is not trusted or not valid for the host."""

    cause = "tls"


class UpstreamTimeout(UpstreamError):
    """No response headers arrived within the response timeout; the request may have been seen."""

    cause = "timeout"
    status = 504


class UpstreamBusy(UpstreamError):
    """Every allowed upstream connection stayed busy for the whole wait; nothing was sent."""

    cause = "busy"
    status = 503


class UpstreamReset(UpstreamError):
    """The connection was closed or reset before a complete response header was received."""

    cause = "reset"


class UpstreamProtocolError(UpstreamError):
    """The request could not be generated, or the upstream sent something that is not HTTP/1.1."""

    cause = "protocol"


__all__ = [
    "CAUSES",
    "DNSLookupFailed",
    "UpstreamBusy",
    "UpstreamConnectFailed",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTLSFailed",
    "UpstreamTimeout",
]
