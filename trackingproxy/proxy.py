"""The request handler: host check, ACME challenges, well-known files, redirect, and the
forwarding of everything else to the upstream with streamed responses.

Order for every request: Host (and SNI) must name a configured domain (else 421, never
forwarded) -> ACME HTTP-01 token -> ``/.well-known/`` file -> optional HTTP->HTTPS redirect ->
method check (405) -> proxy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Set
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from trackingproxy.challenges import ChallengeResponder
from trackingproxy.domains import host_from_header
from trackingproxy.forwarded import ForwardedFor
from trackingproxy.upstream.errors import UpstreamError, UpstreamTimeout
from trackingproxy.wellknown import WellKnownFile

log = Logger(namespace="trackingproxy.proxy")

ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"OPTIONS"})
MAX_BODY = 64 * 1024
SMALL_BODY = 64 * 1024  # responses up to this size are written without flow control
CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"^[A-Za-z0-9_-]{1,256}$")

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
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-real-ip",
    b"forwarded",
}
_OUTBOUND_DROP = HOP_BY_HOP | {b"server", b"content-length"}


class Upstream(Protocol):
    """What the proxy needs from the upstream client (trackingproxy.upstream.client)."""

    def request(
        self, method: bytes, path: bytes, headers: Headers, body: bytes | None
    ) -> Deferred[IResponse]: ...

    def abandon(self, response: IResponse) -> None: ...


class SniCheck(Protocol):
    """Whether a request for ``host`` may be served on a TLS connection made for ``sni``."""

    def __call__(self, sni: str, host: str) -> bool: ...


def _connection_tokens(request: Request) -> frozenset[bytes]:
    values = request.requestHeaders.getRawHeaders(b"connection") or []
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def _plain(request: Request, code: int, body: bytes, extra: Mapping[bytes, bytes] = {}) -> bytes:
    request.setResponseCode(code)
    request.responseHeaders.removeHeader(b"server")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    for k, v in extra.items():
        request.setHeader(k, v)
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


def sni_name(request: Request) -> str | None:
    """The TLS server name the client sent on this request's connection, if any."""
    channel = request.channel
    # HTTP/1.1: the channel's transport is the TLS protocol; HTTP/2: the stream's connection's.
    connection = getattr(channel, "_conn", None)  # twisted.web._http2.H2Stream
    transport = getattr(connection if connection is not None else channel, "transport", None)
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    name = getattr(get_handle(), "get_servername", lambda: None)()
    return name.decode("ascii", "replace").lower().rstrip(".") if name else None


class TrackingResource(Resource):
    """The root (and only) resource of a listener's Site."""

    isLeaf = True

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
        super().__init__()
        self._scheme = scheme
        self._domains = domains
        self._upstream = upstream
        self._forwarded = forwarded
        self._well_known = well_known
        self._challenges = challenges
        self._redirect = redirect_http and scheme == b"http"
        self._sni_check = sni_check

    # -- routing --------------------------------------------------------------------------
    def _target_host(self, request: Request) -> tuple[str | None, bytes]:
        """(host, origin-form target) for the request, host None when it is not ours."""
        uri: bytes = request.uri
        host = host_from_header(request.getHeader(b"host"))
        if uri.startswith(b"/"):
            return host, uri
        scheme, sep, rest = uri.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return None, uri
        authority, slash, path = rest.partition(b"/")
        uri_host = host_from_header(authority)
        if uri_host is None or (host is not None and host != uri_host):
            return None, uri
        return uri_host, b"/" + path if slash else b"/"

    def render(self, request: Request) -> bytes | int:
        host, target = self._target_host(request)
        if host is None or host not in self._domains():
            return _plain(request, 421, b"421 Misdirected Request: unknown host\n")
        if self._sni_check is not None:
            sni = sni_name(request)
            if sni is not None and sni != host and not self._sni_check(sni, host):
                return _plain(request, 421, b"421 Misdirected Request: host does not match TLS\n")
        request.tp_host = host  # type: ignore[attr-defined]
        path = target.partition(b"?")[0]
        if path.startswith(CHALLENGE_PREFIX):
            return self._challenge(request, host, path[len(CHALLENGE_PREFIX) :])
        if path.startswith(b"/.well-known/"):
            found = self._well_known().get(path)
            if found is not None:
                return self._serve_file(request, found)
        if self._redirect:
            location = b"https://" + host.encode("ascii") + target
            code = 301 if request.method in (b"GET", b"HEAD") else 308
            return _plain(request, code, b"Moved to HTTPS\n", {b"location": location})
        if request.method not in ALLOWED_METHODS:
            return _plain(
                request, 405, b"405 Method Not Allowed\n", {b"allow": b"GET, HEAD, POST, OPTIONS"}
            )
        if request.clientproto == b"HTTP/1.0" and request.requestHeaders.hasHeader(
            b"transfer-encoding"
        ):  # RFC 9112 6.1: faulty framing
            return _plain(request, 400, b"400 Bad Request\n", {b"connection": b"close"})
        if getattr(request, "tp_too_large", False):
            return _plain(request, 413, b"413 Content Too Large\n", {b"connection": b"close"})
        return self._proxy(request, host, target)

    def _challenge(self, request: Request, host: str, token: bytes) -> bytes:
        if request.method not in (b"GET", b"HEAD") or not _TOKEN.match(token):
            return _plain(request, 404, b"404 Not Found\n")
        answer = self._challenges.key_authorization(host, token.decode("ascii"))
        if answer is None:
            return _plain(request, 404, b"404 Not Found\n")
        return _plain(request, 200, answer)

    def _serve_file(self, request: Request, found: WellKnownFile) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return _plain(request, 405, b"405 Method Not Allowed\n", {b"allow": b"GET, HEAD"})
        request.responseHeaders.removeHeader(b"server")
        request.setHeader(b"content-type", found.content_type)
        request.setHeader(b"content-length", str(len(found.body)).encode())
        request.setHeader(b"cache-control", b"max-age=300")
        return b"" if request.method == b"HEAD" else found.body

    # -- proxying -------------------------------------------------------------------------
    def _outbound_headers(self, request: Request, host: str) -> Headers:
        drop = _INBOUND_DROP | _connection_tokens(request)
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in drop:
                headers.setRawHeaders(name, values)
        peer = request.getClientAddress()
        peer_host = getattr(peer, "host", None) or "-"
        addr = self._forwarded.resolve(
            peer_host, request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        )
        request.tp_client = addr.client  # type: ignore[attr-defined]
        host_b = host.encode("ascii")
        headers.setRawHeaders(b"host", [host_b])
        headers.setRawHeaders(b"x-forwarded-for", [addr.forwarded_for])
        headers.setRawHeaders(b"x-forwarded-proto", [self._scheme])
        headers.setRawHeaders(b"x-forwarded-host", [host_b])
        return headers

    def _proxy(self, request: Request, host: str, target: bytes) -> int:
        headers = self._outbound_headers(request, host)
        body = None
        if request.method == b"POST":
            body = request.content.getvalue() if request.content is not None else b""
        exchange = _Exchange(request, self._upstream, host)
        self._upstream.request(request.method, target, headers, body).addCallbacks(
            exchange.got_response, exchange.failed
        )
        return NOT_DONE_YET


class _Exchange:
    """One proxied request: copies the upstream response to the client, or answers 502/504."""

    def __init__(self, request: Request, upstream: Upstream, host: str) -> None:
        self._request = request
        self._upstream = upstream
        self._host = host
        self._client_gone = False
        request.notifyFinish().addErrback(self._client_lost)

    def _client_lost(self, reason: Failure) -> None:
        self._client_gone = True

    def got_response(self, response: IResponse) -> None:
        request = self._request
        if self._client_gone:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        out.removeHeader(b"server")
        drop = _OUTBOUND_DROP | frozenset(
            t.strip().lower()
            for v in response.headers.getRawHeaders(b"connection") or []
            for t in v.split(b",")
        )
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in drop:
                out.setRawHeaders(name, values)
        if response.length is not None and isinstance(response.length, int):
            out.setRawHeaders(b"content-length", [str(response.length).encode()])
        response.deliverBody(_Relay(request, self._upstream, response, self))

    def failed(self, reason: Failure) -> None:
        request = self._request
        if reason.check(UpstreamTimeout):
            code, body = 504, b"504 Gateway Timeout\n"
        else:
            code, body = 502, b"502 Bad Gateway\n"
        err = reason.value
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
        request.tp_upstream_error = cause  # type: ignore[attr-defined]
        if self._client_gone:
            return
        request.write(_plain(request, code, body))
        request.finish()


class _Discard(TwistedProtocol):
    """Reads and drops a response body nobody waits for (keeps the connection reusable)."""

    def dataReceived(self, data: bytes) -> None:
        pass


class _Relay(TwistedProtocol):
    """Streams the upstream body to the client with back-pressure, then finishes the request."""

    def __init__(
        self, request: Request, upstream: Upstream, response: IResponse, exchange: _Exchange
    ) -> None:
        self._request = request
        self._upstream = upstream
        self._response = response
        self._done = False
        self._producing = False
        request.notifyFinish().addErrback(self._client_lost)

    def connectionMade(self) -> None:
        if self._done:
            return
        length = self._response.length
        if isinstance(length, int) and length <= SMALL_BODY:
            return  # pixels and redirects: back-pressure would only cost epoll calls
        self._request.registerProducer(self.transport, True)
        self._producing = True

    def _client_lost(self, reason: Failure) -> None:
        if not self._done:
            self._done = True
            self._upstream.abandon(self._response)

    def dataReceived(self, data: bytes) -> None:
        if not self._done:
            self._request.write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._done:
            return
        self._done = True
        if self._producing:
            self._request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._request.finish()
        else:
            log.warn(
                "upstream body for {host} cut short: {error}",
                host=getattr(self._request, "tp_host", "-"),
                error=reason.getErrorMessage(),
            )
            self._request.tp_upstream_error = "reset"  # type: ignore[attr-defined]
            self._request.loseConnection()
