"""Sending one request upstream: the retry rule, the response timeout and failure mapping.

Every click is an event at SparkPost, so a request that may have reached the upstream is never
sent twice. The only retry is on a fresh connection after a *reused* pooled connection failed
with `RequestNotSent` or `RequestTransmissionFailed` (the request provably did not get through).
`ResponseNeverReceived`, a timeout, or a reset after the request was written are final.
Every failure says whether the request was ever written to a connection (`UpstreamError.written`):
False only when it provably never reached the upstream (what `trackingproxy.outage` may journal).

Cancelling the request's Deferred (the client went away) withdraws it: a request not yet
written is never sent (it leaves the pool's queue, or the connection made for it is pooled);
one already written is left to finish, its answer read and dropped, so the connection is kept
and the upstream's work is not cut in the middle (the response timeout still bounds it).

The response is handed over as soon as its headers arrive; its body is streamed by the caller
(`response.deliverBody`). A body that stops arriving for `body_timeout` (default: the response
timeout; time its reader spends pausing it does not count) fails the body with an
`UpstreamTimeout` inside `ResponseFailed` and aborts the connection. A caller that stops
reading must call `abandon(response)`, which closes that connection so a half-read response can
never be mistaken for the next one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Protocol

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as Protocol_
from twisted.python.failure import Failure

from trackingproxy.internals.twisted_private import (
    ParseError,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
)
from trackingproxy.upstream.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from trackingproxy.upstream.http1 import UpstreamRequest, UpstreamResponse
from trackingproxy.upstream.pool import PooledConnection

RESPONSE_TIMEOUT: Final = 10.0


class Pool(Protocol):
    """What the client needs from `trackingproxy.upstream.pool.ConnectionPool`."""

    def acquire(self, fresh: bool = False) -> Deferred[PooledConnection]: ...

    def release(self, conn: PooledConnection) -> None: ...

    def close(self) -> Deferred[None]: ...


class UpstreamClient:
    """Forward requests to the pool's upstream, see the module docstring."""

    def __init__(
        self,
        pool: Pool,
        clock: IReactorTime,
        *,
        response_timeout: float = RESPONSE_TIMEOUT,
        body_timeout: float | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._timeout = response_timeout
        self._body_timeout = response_timeout if body_timeout is None else body_timeout

    def request(
        self,
        method: bytes,
        path: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> Deferred[UpstreamResponse]:
        """Send `method path` with exactly `headers`, (name, value) pairs sent in order as
        spelled (they must hold the Host header).

        `path` is sent byte for byte (query string included). Framing is ours: `headers` must not
        hold Connection, Content-Length or Transfer-Encoding. Fails with an `UpstreamError`;
        cancelling the Deferred (the client went away) withdraws the request (see above).
        """
        try:
            request = UpstreamRequest(method, path, headers, body)
        except ValueError as e:  # a method, path or header field that cannot go on the wire
            error = UpstreamProtocolError(f"the request cannot be sent: {e}", e, written=False)
            return fail(error)
        return _Exchange(self, request).start()

    def abandon(self, response: UpstreamResponse) -> None:
        """Stop reading `response`'s body: its connection is closed, never reused.

        Does nothing if the body has already been read completely (the connection is back in
        the pool by then).
        """
        transport: Any = response.connection_transport
        if transport is not None:
            transport.abortConnection()

    def close(self) -> Deferred[None]:
        """Close all upstream connections (shutdown); in-flight requests fail."""
        return self._pool.close()


class _Exchange:
    """The state of one `request` call: at most two attempts under one response timeout."""

    __slots__ = (
        "_client",
        "_conn",
        "_pending",
        "_request",
        "_result",
        "_retried",
        "_settled",
        "_timer",
        "_withdrawn",
        "_written",
    )

    def __init__(self, client: UpstreamClient, request: UpstreamRequest) -> None:
        self._client = client
        self._request = request  # reusable: writing it again writes the same bytes
        self._retried = False
        self._settled = False
        self._withdrawn = False  # the caller cancelled: nothing is reported any more
        self._written = False  # the request has been handed to a connection
        self._conn: PooledConnection | None = None
        self._pending: Deferred[Any] | None = None
        self._result: Deferred[UpstreamResponse] = Deferred(self._cancel)
        self._timer: IDelayedCall | None = None

    def start(self) -> Deferred[UpstreamResponse]:
        client = self._client
        self._timer = client._clock.callLater(client._timeout, self._timed_out)
        self._attempt(fresh=False)
        return self._result

    def _attempt(self, fresh: bool) -> None:
        self._conn = None
        d = self._client._pool.acquire(fresh)
        self._pending = d
        d.addCallback(self._send)
        d.addErrback(self._failed)  # also catches an exception raised by _send

    def _send(self, conn: PooledConnection) -> None:
        if self._settled:  # timed out or withdrawn while connecting: never sent
            self._client._pool.release(conn)
            return
        self._conn = conn
        self._written = True
        client = self._client
        protocol = conn.protocol
        protocol.clock = client._clock
        protocol.body_timeout = client._body_timeout
        d = protocol.request(self._request)
        self._pending = d
        d.addCallbacks(self._responded, self._failed)

    def _responded(self, response: UpstreamResponse) -> None:
        self._pending = None
        if self._withdrawn:
            self._stop_timer()  # the body timeout bounds the rest
            response.deliverBody(_Drop())  # read to its end: the connection stays usable
            return
        if self._settled:
            return
        self._settled = True
        self._stop_timer()
        self._result.callback(response)

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if self._settled:
            # The timeout or the caller's cancellation already settled the result.
            self._stop_timer()
            if self._conn is not None and self._written:
                self._conn.abort()
            return
        conn = self._conn
        if (
            conn is not None
            and conn.reused
            and not self._retried
            and isinstance(failure.value, RequestNotSent | RequestTransmissionFailed)
        ):
            self._retried = True
            self._written = False  # it provably did not get through (the retry rule)
            conn.abort()
            self._attempt(fresh=True)
            return
        if conn is not None:
            conn.abort()
        self._settled = True
        self._stop_timer()
        error = _map_failure(failure)
        if isinstance(error, UpstreamError):
            error.written = self._written and not isinstance(failure.value, RequestNotSent)
        self._result.errback(error)

    def _timed_out(self) -> None:
        self._timer = None
        if self._withdrawn:
            self._abort_pending()  # a withdrawn request's answer took too long: give up
            return
        if self._settled:
            return
        self._settled = True
        self._abort_pending()
        seconds = self._client._timeout
        self._result.errback(
            UpstreamTimeout(
                f"no response headers from the upstream within {seconds:g} s",
                written=self._written,
            )
        )

    def _cancel(self, _: Deferred[UpstreamResponse]) -> None:
        if self._settled:
            return
        self._settled = True  # Deferred.cancel then fails the result with CancelledError
        self._withdrawn = True
        if self._written:
            return  # sent: let it finish (bounded by the timer), its answer dropped
        self._stop_timer()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()  # waiting for, or opening, a connection: nothing is sent

    def _abort_pending(self) -> None:
        if self._conn is not None:
            self._conn.abort()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class _Drop(Protocol_):
    """Reads and drops the body of a response nobody waits for any more."""

    def dataReceived(self, data: bytes) -> None:
        pass


def _map_failure(failure: Failure) -> BaseException:
    value = failure.value
    assert isinstance(value, BaseException)
    if isinstance(value, UpstreamError | CancelledError):
        return value
    if isinstance(value, RequestGenerationFailed):
        return UpstreamProtocolError(f"the request could not be sent: {_reasons(value)}", value)
    if isinstance(value, ResponseFailed | RequestTransmissionFailed | RequestNotSent):
        reasons = getattr(value, "reasons", [])
        if any(isinstance(r, Failure) and isinstance(r.value, ParseError) for r in reasons):
            return UpstreamProtocolError(
                f"the upstream sent an invalid response: {_reasons(value)}", value
            )
        what = {
            RequestNotSent: "before the request could be sent",
            RequestTransmissionFailed: "while the request was being sent",
        }.get(type(value), "before a complete response header arrived")
        return UpstreamReset(f"the upstream closed the connection {what}: {_reasons(value)}", value)
    return UpstreamProtocolError(f"upstream request failed: {value!r}", value)


def _reasons(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None) or []
    parts = []
    for reason in reasons:
        if isinstance(reason, Failure):
            if isinstance(reason.value, ConnectionDone):
                parts.append("connection closed")
            elif isinstance(reason.value, ConnectionLost):
                parts.append("connection lost")
            else:
                parts.append(f"{type(reason.value).__name__}: {reason.getErrorMessage()}")
    return "; ".join(parts) or type(error).__name__


__all__ = ["RESPONSE_TIMEOUT", "Pool", "UpstreamClient"]
