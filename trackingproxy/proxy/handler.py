"""The request handler (routing): host check, ACME challenges, well-known files, redirect,
method check, and the request sent upstream (`trackingproxy.proxy.forward` copies the answer).

Order for every request: Host (and SNI) must name a configured domain (else 421, never
forwarded) -> ACME HTTP-01 token -> ``/.well-known/`` file -> optional HTTP->HTTPS redirect ->
method check (405) -> proxy (with ``--outage-mode replay``, GET and HEAD carry their
`trackingproxy.outage.OutageRequest`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping, Set
from typing import Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from trackingproxy.domains import host_from_header
from trackingproxy.outage.policy import OutagePolicy
from trackingproxy.proxy.challenges import Busy, ChallengeResponder
from trackingproxy.proxy.forward import Forward, Upstream, plain
from trackingproxy.proxy.forwarded import ForwardedFor
from trackingproxy.proxy.headers import CLIENT_CLAIMS, INBOUND_DROP, one_line, tokens
from trackingproxy.proxy.wellknown import WellKnownFile
from trackingproxy.server.exchange import ClientExchange

log = Logger(namespace="trackingproxy.proxy.handler")

ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"OPTIONS"})
CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"^[A-Za-z0-9_-]{1,256}$")


class SniCheck(Protocol):
    """Whether a request for ``host`` may be served on a TLS connection made for ``sni``."""

    def __call__(self, sni: str, host: str) -> bool: ...




def _disguised_challenge(path: bytes) -> bool:
    """True when ``path`` normalises (percent-decoding, dot segments, repeated or back slashes)
    to the ACME challenge path without being spelled exactly like it."""
    if b"%" not in path and b"//" not in path and b"/." not in path and b"\\" not in path:
        return False  # the common case: nothing to normalise
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    normal = posixpath.normpath(_SLASHES.sub(b"/", decoded))
    return normal.lower().startswith(CHALLENGE_PREFIX.rstrip(b"/"))


_SLASHES = re.compile(rb"/+")




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
        outage: OutagePolicy | None = None,
    ) -> None:
        self._scheme = scheme
        self._domains = domains
        self._upstream = upstream
        self._forwarded = forwarded
        self._well_known = well_known
        self._challenges = challenges
        self._redirect = redirect_http and scheme == b"http"
        self._sni_check = sni_check
        self._outage = outage

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
            return plain(exchange, 400, b"400 Bad Request: invalid Host\n")  # RFC 9112 3.2
        host, target = self._target_host(exchange, host)
        if host is None or host not in self._domains():
            return plain(exchange, 421, b"421 Misdirected Request: unknown host\n")
        if self._sni_check is not None:
            sni = exchange.sni()
            if sni is not None and sni != host and not self._sni_check(sni, host):
                return plain(exchange, 421, b"421 Misdirected Request: host does not match TLS\n")
        exchange.outcome.host = host
        method = exchange.method
        path = target.partition(b"?")[0]
        if path.startswith(CHALLENGE_PREFIX):
            return self._challenge(exchange, host, path[len(CHALLENGE_PREFIX) :])
        if _disguised_challenge(path):
            # Another spelling of the challenge path: an upstream that normalises paths would
            # read it as a challenge request for our domain. Neither answered nor forwarded.
            return plain(exchange, 400, b"400 Bad Request\n")
        if path.startswith(b"/.well-known/"):
            found = self._well_known().get(path)
            if found is not None:
                return self._serve_file(exchange, found)
        if self._redirect:
            location = b"https://" + host.encode("ascii") + target
            code = 301 if method in (b"GET", b"HEAD") else 308
            return plain(exchange, code, b"Moved to HTTPS\n", (b"location", location))
        if method not in ALLOWED_METHODS:
            return plain(
                exchange, 405, b"405 Method Not Allowed\n", (b"allow", b"GET, HEAD, POST, OPTIONS")
            )
        if exchange.clientproto == b"HTTP/1.0" and exchange.header(b"transfer-encoding"):
            # RFC 9112 6.1: faulty framing
            exchange.close_after()
            return plain(exchange, 400, b"400 Bad Request\n")
        if exchange.too_large:
            exchange.close_after()
            return plain(exchange, 413, b"413 Content Too Large\n")
        self._proxy(exchange, host, target)

    def _challenge(self, exchange: ClientExchange, host: str, token: bytes) -> None:
        if exchange.method not in (b"GET", b"HEAD") or not _TOKEN.match(token):
            return plain(exchange, 404, b"404 Not Found\n")
        try:
            answer = self._challenges.key_authorization(host, token.decode("ascii"))
        except Busy:
            return plain(exchange, 503, b"503 Service Unavailable\n", (b"retry-after", b"1"))
        if isinstance(answer, Deferred):
            return self._challenge_later(exchange, answer)
        _answer_challenge(exchange, answer)

    def _challenge_later(self, exchange: ClientExchange, lookup: Deferred[bytes | None]) -> None:
        """Answer once the shared store did (the client may be gone by then)."""
        lost: list[bool] = []
        exchange.on_lost(lambda: lost.append(True))
        exchange.upstream_started()

        def answer(found: bytes | None) -> None:
            exchange.upstream_ended()
            if not lost:
                _answer_challenge(exchange, found)

        lookup.addCallback(answer).addErrback(
            lambda f: log.failure("Answering a challenge failed", f)
        )

    def _serve_file(self, exchange: ClientExchange, found: WellKnownFile) -> None:
        if exchange.method not in (b"GET", b"HEAD"):
            return plain(exchange, 405, b"405 Method Not Allowed\n", (b"allow", b"GET, HEAD"))
        exchange.respond(
            200,
            [(b"content-type", found.content_type), (b"cache-control", b"max-age=300")],
            found.body,
        )

    # -- proxying -------------------------------------------------------------------------
    def _outbound_headers(self, exchange: ClientExchange, host: str) -> list[tuple[bytes, bytes]]:
        """The client's fields minus the dropped ones, then the four the proxy sets; names in
        lower case, as the client's parser gives them (as HTTP/2 and Envoy send them)."""
        drop = INBOUND_DROP
        connection = exchange.header_values(b"connection")
        if connection:
            drop = drop | tokens(connection)
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
            headers.append((name, one_line(value)))
        addr = self._forwarded.resolve(peer, exchange.header_values(b"x-forwarded-for"))
        exchange.outcome.client = addr.client
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
        forward = Forward(exchange, self._upstream, host)
        if self._outage is not None:
            forward.outage = self._outage.request(
                method,
                host,
                target,
                exchange.outcome.client or exchange.peer_host(),
                exchange.header(b"user-agent"),
                self._scheme,
            )
        exchange.upstream_started()
        pending = self._upstream.request(method, target, headers, body)
        forward.pending = pending
        pending.addCallbacks(forward.got_response, forward.failed)


def _answer_challenge(exchange: ClientExchange, answer: bytes | None) -> None:
    if answer is None:
        plain(exchange, 404, b"404 Not Found\n")
    else:
        plain(exchange, 200, answer)
