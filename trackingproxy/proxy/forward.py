"""Forwarding one request upstream and copying the answer back: the head as the upstream sent it
(minus hop-by-hop fields), the body streamed with back-pressure, or 502/503/504 when the
upstream fails; the exchange's upstream work ends exactly once.

With ``--outage-mode replay`` the forward has an `OutageRequest` (``outage``): it sees the head
of every answer (redirects are remembered; a 503 may be replaced) and every failure, and may
give a local answer instead (`trackingproxy.outage.policy` decides which).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from trackingproxy.outage.answers import LocalAnswer
from trackingproxy.outage.policy import OutageRequest
from trackingproxy.proxy.headers import OUTBOUND_DROP, one_line, outbound_drop
from trackingproxy.server.exchange import ClientExchange
from trackingproxy.upstream.errors import UpstreamError, UpstreamReset
from trackingproxy.upstream.http1 import UpstreamResponse

__all__ = ["SMALL_BODY", "Forward", "Upstream", "plain"]

log = Logger(namespace="trackingproxy.proxy.forward")

SMALL_BODY = 64 * 1024  # responses up to this size are written without flow control
_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_NO_STORE = (b"cache-control", b"no-store")
_FAILURE_BODIES: dict[int, tuple[bytes, tuple[tuple[bytes, bytes], ...]]] = {
    502: (b"502 Bad Gateway\n", ()),
    503: (b"503 Service Unavailable: the upstream is busy\n", ((b"retry-after", b"5"),)),
    504: (b"504 Gateway Timeout\n", ()),
}


def plain(exchange: ClientExchange, code: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    """Answer ``code`` with a short text ``body`` that no cache keeps."""
    exchange.respond(code, [_TEXT, _NO_STORE, *extra], body)


class Upstream(Protocol):
    """What the proxy needs from the upstream client (trackingproxy.upstream.client)."""

    def request(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> Deferred[UpstreamResponse]: ...

    def abandon(self, response: UpstreamResponse) -> None: ...


class Forward(TwistedProtocol):
    """One proxied request: copies the upstream response to the client (streaming its body
    with back-pressure), or answers 502/503/504.

    A client that goes away before the response withdraws the request (cancels it: sent
    nowhere if not yet written, else finished and dropped by the upstream client). The
    exchange's upstream work ends exactly once (``upstream_ended``): when the answer is
    complete, failed, or withdrawn.
    """

    def __init__(self, exchange: ClientExchange, upstream: Upstream, host: str) -> None:
        self._exchange = exchange
        self._upstream = upstream
        self._host = host
        self._client_gone = False
        self._response: UpstreamResponse | None = None
        self._head: tuple[int, bytes, list[tuple[bytes, bytes]], int | None, bool] | None = None
        self._done = False
        self._producing = False
        self._working = True
        self.pending: Deferred[UpstreamResponse] | None = None
        self.outage: OutageRequest | None = None  # --outage-mode replay, GET and HEAD
        exchange.on_lost(self._client_lost)

    def _work_over(self) -> None:
        if self._working:
            self._working = False
            self._exchange.upstream_ended()

    def _client_lost(self) -> None:
        self._client_gone = True
        response = self._response
        if response is not None and not self._done:
            self._done = True
            self._upstream.abandon(response)
        elif response is None and self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()  # withdrawn: never sent if not written yet

    def got_response(self, response: UpstreamResponse) -> None:
        self.pending = None
        if self._client_gone:
            response.deliverBody(_Discard())
            self._work_over()
            return
        if self.outage is not None:
            local = self.outage.on_response(response.code, response.raw_headers)
            if local is not None:  # a 503 before any body byte: answered here instead
                response.deliverBody(_Discard())
                self._work_over()
                self._exchange.outcome.upstream_error = "unavailable"
                _answer(self._exchange, local)
                return
        self._response = response
        fields = [(name.lower(), name, value) for name, value in response.raw_headers]
        connection = [value for lower, _, value in fields if lower == b"connection"]
        drop = outbound_drop(connection) if connection else OUTBOUND_DROP
        headers = []
        has_date = False
        for lower, name, value in fields:
            if lower in drop:
                continue
            if lower == b"date":
                has_date = True
            headers.append((name, one_line(value)))
        length = response.length
        # The head is sent with the first body byte (or the end), so an upstream that fails
        # before any body byte still gets the client a clean 502/504, never a bare close.
        self._head = (
            response.code,
            response.phrase,
            headers,
            length if isinstance(length, int) else None,
            not has_date,
        )
        response.deliverBody(self)

    def _send_head(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._exchange.start(*head)

    def failed(self, reason: Failure) -> None:
        self.pending = None
        self._work_over()
        exchange = self._exchange
        err = reason.value
        if self._client_gone and isinstance(err, CancelledError):
            return  # withdrawn: the client went away first
        code = err.status if isinstance(err, UpstreamError) else 502
        body, extra = _FAILURE_BODIES.get(code, _FAILURE_BODIES[502])
        cause = err.cause if isinstance(err, UpstreamError) else "internal"
        local = None
        if self.outage is not None and not self._client_gone and isinstance(err, UpstreamError):
            local = self.outage.on_failure(err)
            if local is not None:
                code = local.code
        if not isinstance(err, UpstreamError):
            log.failure("unexpected error while proxying for {host}", reason, host=self._host)
        else:
            log.warn(
                "upstream {cause} error for {host}: {error}; answered {code}",
                cause=cause,
                host=self._host,
                error=str(err),
                code=code,
            )
        exchange.outcome.upstream_error = cause
        if self._client_gone:
            return
        if local is not None:
            _answer(exchange, local)
            return
        plain(exchange, code, body, *extra)

    # -- the body (IProtocol of response.deliverBody) -------------------------------------
    def connectionMade(self) -> None:
        if self._done:
            return
        length = self._response.length if self._response is not None else None
        if isinstance(length, int) and length <= SMALL_BODY:
            return  # pixels and redirects: back-pressure would only cost epoll calls
        self._exchange.register_producer(self.transport)
        self._producing = True

    def dataReceived(self, data: bytes) -> None:
        if not self._done:
            if self._head is not None:
                self._send_head()
            self._exchange.write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._response = None  # it refers back to us (its body protocol): no cycle left
        self._work_over()
        if self._done:
            return
        self._done = True
        exchange = self._exchange
        if self._producing:
            exchange.unregister_producer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._send_head()
            exchange.finish()
        elif self._head is not None:
            self._head = None
            if reason.check(UpstreamError):
                self.failed(reason)
            else:
                reasons: list[Failure] = getattr(reason.value, "reasons", None) or [reason]
                message = reasons[0].getErrorMessage()
                self.failed(
                    Failure(
                        UpstreamReset(
                            f"the upstream closed the connection after its response head: {message}"
                        )
                    )
                )
        else:
            log.warn(
                "upstream body for {host} cut short: {error}",
                host=self._host,
                error=reason.getErrorMessage(),
            )
            exchange.outcome.upstream_error = "reset"
            exchange.abort()


def _answer(exchange: ClientExchange, local: LocalAnswer) -> None:
    exchange.respond(local.code, list(local.headers), local.body)


class _Discard(TwistedProtocol):
    """Reads and drops a response body nobody waits for (keeps the connection reusable)."""

    def dataReceived(self, data: bytes) -> None:
        pass
