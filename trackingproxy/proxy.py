"""The request handler: host check, ACME challenges, well-known files, redirect, and the
forwarding of everything else to the upstream with streamed responses.

Order for every request: Host (and SNI) must name a configured domain (else 421, never
forwarded) -> ACME HTTP-01 token -> ``/.well-known/`` file -> optional HTTP->HTTPS redirect ->
method check (405) -> proxy.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from trackingproxy.challenges import ChallengeResponder
from trackingproxy.domains import host_from_header
from trackingproxy.exchange import ClientExchange
from trackingproxy.forwarded import ForwardedFor
from trackingproxy.upstream.errors import UpstreamError, UpstreamReset
from trackingproxy.upstream.http1 import LeanResponse
from trackingproxy.wellknown import WellKnownFile

log = Logger(namespace="trackingproxy.proxy")

ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"OPTIONS"})
MAX_BODY = 64 * 1024
SMALL_BODY = 64 * 1024  # responses up to this size are written without flow control
CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"^[A-Za-z0-9_-]{1,256}$")
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
_INBOUND_DROP = HOP_BY_HOP | {
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
_OUTBOUND_DROP = HOP_BY_HOP | {b"server", b"content-length"}


_drop_by_connection: dict[tuple[bytes, ...], frozenset[bytes]] = {}


def _outbound_drop(connection: Sequence[bytes]) -> frozenset[bytes]:
    """The response header names (lower case) not to pass on, given the upstream's Connection
    values (the upstream sends the same few, e.g. ``keep-alive``, on every response: cached)."""
    key = tuple(connection)
    drop = _drop_by_connection.get(key)
    if drop is None:
        drop = _OUTBOUND_DROP | {t for t in _tokens(connection) if _TOKEN_NAME.match(t)}
        if len(_drop_by_connection) < 64:
            _drop_by_connection[key] = drop
    return drop


def _one_line(value: bytes) -> bytes:
    """``value`` with any CR or LF turned into a space (as twisted.web's Headers does): the
    parsers already refuse them, this keeps a forwarded field from ever splitting the request."""
    if b"\r" in value or b"\n" in value:
        return b" ".join(value.splitlines())
    return value


class Upstream(Protocol):
    """What the proxy needs from the upstream client (trackingproxy.upstream.client)."""

    def request(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> Deferred[LeanResponse]: ...

    def abandon(self, response: LeanResponse) -> None: ...


class SniCheck(Protocol):
    """Whether a request for ``host`` may be served on a TLS connection made for ``sni``."""

    def __call__(self, sni: str, host: str) -> bool: ...


def _tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_FAILURE_BODIES: dict[int, tuple[bytes, tuple[tuple[bytes, bytes], ...]]] = {
    502: (b"502 Bad Gateway\n", ()),
    503: (b"503 Service Unavailable: the upstream is busy\n", ((b"retry-after", b"5"),)),
    504: (b"504 Gateway Timeout\n", ()),
}
_NO_STORE = (b"cache-control", b"no-store")


def _disguised_challenge(path: bytes) -> bool:
    """True when ``path`` normalises (percent-decoding, dot segments, repeated or back slashes)
    to the ACME challenge path without being spelled exactly like it."""
    if b"%" not in path and b"//" not in path and b"/." not in path and b"\\" not in path:
        return False  # the common case: nothing to normalise
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    normal = posixpath.normpath(_SLASHES.sub(b"/", decoded))
    return normal.lower().startswith(CHALLENGE_PREFIX.rstrip(b"/"))


_SLASHES = re.compile(rb"/+")


def _plain(exchange: ClientExchange, code: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    exchange.respond(code, [_TEXT, _NO_STORE, *extra], body)


class TrackingHandler:
    """The request handler of a listener (`handle`), for the HTTP/1.1 and HTTP/2 servers."""

    def __init__(
        self,
        *,
        scheme: bytes,
        domains: Callable[[], Set[str]],
        upstream: Upstream,
        forwarded: ForwardedFor,
        well_known: Callable[[], Mapping[bytes, WellKnownFile]],
        challenges: ChallengeResponder,
        redirect_http: bool = False,
        sni_check: SniCheck | None = None,
    ) -> None:
        self._scheme = scheme
        self._domains = domains
        self._upstream = upstream
        self._forwarded = forwarded
        self._well_known = well_known
        self._challenges = challenges
        self._redirect = redirect_http and scheme == b"http"
        self._sni_check = sni_check

    # -- routing --------------------------------------------------------------------------
    def _target_host(self, exchange: ClientExchange, host: str | None) -> tuple[str | None, bytes]:
        """(host, origin-form target) for the request (``host``: from its Host field), host
        None when it is not ours."""
        uri = exchange.uri
        if uri.startswith(b"/"):
            return host, uri
        scheme, sep, rest = uri.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return None, uri
        authority, slash, path = rest.partition(b"/")
        uri_host = host_from_header(authority)
        if uri_host is None or host != uri_host:  # RFC 9112 3.2.2: Host must agree
            return None, uri
        return uri_host, b"/" + path if slash else b"/"

    def handle(self, exchange: ClientExchange) -> None:
        """Answer ``exchange`` (at once, or later for a proxied request)."""
        if exchange.uri == b"*":
            return exchange.respond(400, [], b"")
        raw_host = exchange.header(b"host")
        host = host_from_header(raw_host)
        if host is None and raw_host is not None:
            return _plain(exchange, 400, b"400 Bad Request: invalid Host\n")  # RFC 9112 3.2
        host, target = self._target_host(exchange, host)
        if host is None or host not in self._domains():
            return _plain(exchange, 421, b"421 Misdirected Request: unknown host\n")
        if self._sni_check is not None:
            sni = exchange.sni()
            if sni is not None and sni != host and not self._sni_check(sni, host):
                return _plain(exchange, 421, b"421 Misdirected Request: host does not match TLS\n")
        exchange.tp_host = host
        method = exchange.method
        path = target.partition(b"?")[0]
        if path.startswith(CHALLENGE_PREFIX):
            return self._challenge(exchange, host, path[len(CHALLENGE_PREFIX) :])
        if _disguised_challenge(path):
            # Another spelling of the challenge path: an upstream that normalises paths would
            # read it as a challenge request for our domain. Neither answered nor forwarded.
            return _plain(exchange, 400, b"400 Bad Request\n")
        if path.startswith(b"/.well-known/"):
            found = self._well_known().get(path)
            if found is not None:
                return self._serve_file(exchange, found)
        if self._redirect:
            location = b"https://" + host.encode("ascii") + target
            code = 301 if method in (b"GET", b"HEAD") else 308
            return _plain(exchange, code, b"Moved to HTTPS\n", (b"location", location))
        if method not in ALLOWED_METHODS:
            return _plain(
                exchange, 405, b"405 Method Not Allowed\n", (b"allow", b"GET, HEAD, POST, OPTIONS")
            )
        if exchange.clientproto == b"HTTP/1.0" and exchange.header(b"transfer-encoding"):
            # RFC 9112 6.1: faulty framing
            exchange.close_after()
            return _plain(exchange, 400, b"400 Bad Request\n")
        if exchange.tp_too_large:
            exchange.close_after()
            return _plain(exchange, 413, b"413 Content Too Large\n")
        self._proxy(exchange, host, target)

    def _challenge(self, exchange: ClientExchange, host: str, token: bytes) -> None:
        if exchange.method not in (b"GET", b"HEAD") or not _TOKEN.match(token):
            return _plain(exchange, 404, b"404 Not Found\n")
        answer = self._challenges.key_authorization(host, token.decode("ascii"))
        if answer is None:
            return _plain(exchange, 404, b"404 Not Found\n")
        _plain(exchange, 200, answer)

    def _serve_file(self, exchange: ClientExchange, found: WellKnownFile) -> None:
        if exchange.method not in (b"GET", b"HEAD"):
            return _plain(exchange, 405, b"405 Method Not Allowed\n", (b"allow", b"GET, HEAD"))
        exchange.respond(
            200,
            [(b"content-type", found.content_type), (b"cache-control", b"max-age=300")],
            found.body,
        )

    # -- proxying -------------------------------------------------------------------------
    def _outbound_headers(self, exchange: ClientExchange, host: str) -> list[tuple[bytes, bytes]]:
        """The client's fields minus the dropped ones, then the four the proxy sets; names in
        lower case, as the client's parser gives them (as HTTP/2 and Envoy send them)."""
        drop = _INBOUND_DROP
        connection = exchange.header_values(b"connection")
        if connection:
            drop = drop | _tokens(connection)
        peer = exchange.peer_host()
        claims_ok = self._forwarded.trusts(peer)
        headers = []
        for name, value in exchange.header_items():
            if name in drop or (not claims_ok and name in CLIENT_CLAIMS):
                continue
            if b"_" in name:  # X_Forwarded_For is X-Forwarded-For to some upstreams
                folded = name.replace(b"_", b"-")
                if folded in drop or (not claims_ok and folded in CLIENT_CLAIMS):
                    continue
            headers.append((name, _one_line(value)))
        addr = self._forwarded.resolve(peer, exchange.header_values(b"x-forwarded-for"))
        exchange.tp_client = addr.client
        host_b = host.encode("ascii")
        headers += (
            (b"host", host_b),
            (b"x-forwarded-for", addr.forwarded_for),
            (b"x-forwarded-proto", self._scheme),
            (b"x-forwarded-host", host_b),
        )
        return headers

    def _proxy(self, exchange: ClientExchange, host: str, target: bytes) -> None:
        headers = self._outbound_headers(exchange, host)
        method = exchange.method
        body = exchange.body() if method == b"POST" else None
        forward = _Forward(exchange, self._upstream, host)
        exchange.upstream_started()
        pending = self._upstream.request(method, target, headers, body)
        forward.pending = pending
        pending.addCallbacks(forward.got_response, forward.failed)


class _Forward(TwistedProtocol):
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
        self._response: LeanResponse | None = None
        self._head: tuple[int, bytes, list[tuple[bytes, bytes]], int | None, bool] | None = None
        self._done = False
        self._producing = False
        self._working = True
        self.pending: Deferred[LeanResponse] | None = None
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

    def got_response(self, response: LeanResponse) -> None:
        self.pending = None
        if self._client_gone:
            response.deliverBody(_Discard())
            self._work_over()
            return
        self._response = response
        fields = [(name.lower(), name, value) for name, value in response.raw_headers]
        connection = [value for lower, _, value in fields if lower == b"connection"]
        drop = _outbound_drop(connection) if connection else _OUTBOUND_DROP
        headers = []
        has_date = False
        for lower, name, value in fields:
            if lower in drop:
                continue
            if lower == b"date":
                has_date = True
            headers.append((name, _one_line(value)))
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
        exchange.tp_upstream_error = cause
        if self._client_gone:
            return
        _plain(exchange, code, body, *extra)

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
            exchange.tp_upstream_error = "reset"
            exchange.abort()


class _Discard(TwistedProtocol):
    """Reads and drops a response body nobody waits for (keeps the connection reusable)."""

    def dataReceived(self, data: bytes) -> None:
        pass
