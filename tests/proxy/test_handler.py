"""The request handler without sockets: a fake exchange (what an HTTP server hands over) and an
upstream spy (records each request; the test fires its answer), so routing, the outcome the
handler records, and the upstream work it starts and ends are checked directly."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.proxy.challenges import ChallengeResponder
from trackingproxy.proxy.forwarded import ForwardedFor, parse_networks
from trackingproxy.proxy.handler import TrackingHandler
from trackingproxy.proxy.wellknown import WellKnownFile
from trackingproxy.server.exchange import Outcome
from trackingproxy.upstream.errors import UpstreamBusy, UpstreamConnectFailed, UpstreamTimeout

DOMAIN = "click.example.com"


@define
class FakeExchange:
    """A ClientExchange that records the answer and the upstream-work calls."""

    method: bytes = b"GET"
    uri: bytes = b"/f/token"
    headers: list[tuple[bytes, bytes]] = field(factory=lambda: [(b"host", DOMAIN.encode())])
    clientproto: bytes = b"HTTP/1.1"
    peer: str = "198.51.100.7"
    body_bytes: bytes = b""
    started: float = 0.0
    outcome: Outcome = field(factory=Outcome)
    too_large: bool = False
    code: int = 200
    sent: int = 0
    answer: list[Any] = field(factory=list)
    work: list[int] = field(factory=list)
    lost: Callable[[], None] | None = None
    closed_after: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = self.header_values(name)
        return values[-1] if values else None

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def header_items(self) -> Iterable[tuple[bytes, bytes]]:
        return self.headers

    def body(self) -> bytes:
        return self.body_bytes

    def peer_host(self) -> str:
        return self.peer

    def sni(self) -> str | None:
        return None

    def respond(self, code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.code = code
        self.answer.append(("respond", code, headers, body))

    def start(self, code: int, phrase: bytes, headers: Any, length: int | None, add_date: bool) -> None:
        self.code = code
        self.answer.append(("start", code, headers, length))

    def write(self, data: bytes) -> None:
        self.answer.append(("write", data))

    def finish(self) -> None:
        self.answer.append(("finish",))

    def close_after(self) -> None:
        self.closed_after = True

    def abort(self) -> None:
        self.answer.append(("abort",))

    def register_producer(self, producer: Any) -> None:
        pass

    def unregister_producer(self) -> None:
        pass

    def upstream_started(self) -> None:
        self.work.append(1)

    def upstream_ended(self) -> None:
        self.work.append(-1)

    def on_lost(self, callback: Callable[[], None]) -> None:
        self.lost = callback

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()


@define
class UpstreamSpy:
    """Records each request; ``answers[i]`` is its Deferred for the test to fire."""

    requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes | None]] = field(
        factory=list
    )
    answers: list[Deferred[Any]] = field(factory=list)
    cancelled: list[int] = field(factory=list)

    def request(self, method: bytes, path: bytes, headers: Any, body: bytes | None) -> Any:
        index = len(self.answers)
        self.requests.append((method, path, list(headers), body))
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(index))
        self.answers.append(d)
        return d

    def abandon(self, response: Any) -> None:
        pass


class _Tokens(ChallengeResponder):
    def key_authorization(self, host: str, token: str) -> bytes | None:
        return b"auth-" + token.encode() if token == "good" else None


def _handler(upstream: UpstreamSpy, trusted: tuple[str, ...] = ()) -> TrackingHandler:
    files = {b"/.well-known/assetlinks.json": WellKnownFile(b"[]", b"application/json")}
    return TrackingHandler(
        scheme=b"https",
        domains=lambda: frozenset({DOMAIN}),
        upstream=upstream,
        forwarded=ForwardedFor(parse_networks(trusted)),
        well_known=lambda: files,
        challenges=_Tokens(),
    )


class Routing(SynchronousTestCase):
    def test_unknown_host_is_421_and_never_forwarded(self) -> None:
        """A Host that is no configured domain: 421, nothing upstream, no work started."""
        upstream = UpstreamSpy()
        exchange = FakeExchange(headers=[(b"host", b"other.example")])
        _handler(upstream).handle(exchange)
        self.assertEqual((exchange.code, upstream.requests, exchange.work), (421, [], []))
        self.assertEqual(exchange.outcome.host, "-")

    def test_invalid_host_is_400(self) -> None:
        """A Host with userinfo is no host name: 400 (RFC 9112 3.2)."""
        exchange = FakeExchange(headers=[(b"host", b"user@" + DOMAIN.encode())])
        _handler(UpstreamSpy()).handle(exchange)
        self.assertEqual(exchange.code, 400)

    def test_challenge_and_well_known_are_answered_here(self) -> None:
        """An HTTP-01 token and a well-known file are answered locally, never forwarded."""
        upstream = UpstreamSpy()
        for uri, code, body in (
            (b"/.well-known/acme-challenge/good", 200, b"auth-good"),
            (b"/.well-known/acme-challenge/bad", 404, b"404 Not Found\n"),
            (b"/.well-known/assetlinks.json", 200, b"[]"),
        ):
            exchange = FakeExchange(uri=uri)
            _handler(upstream).handle(exchange)
            self.assertEqual((exchange.code, exchange.answer[0][3]), (code, body))
        self.assertEqual(upstream.requests, [])

    def test_other_methods_are_405(self) -> None:
        """PUT is refused with 405 and an Allow field."""
        exchange = FakeExchange(method=b"PUT")
        _handler(UpstreamSpy()).handle(exchange)
        self.assertEqual(exchange.code, 405)
        self.assertIn((b"allow", b"GET, HEAD, POST, OPTIONS"), exchange.answer[0][2])


class Forwarding(SynchronousTestCase):
    def test_request_goes_upstream_with_the_proxys_fields_and_outcome(self) -> None:
        """The request is forwarded in origin form with Host and X-Forwarded-*; the outcome
        names the domain and the client; the upstream work is started once."""
        upstream = UpstreamSpy()
        exchange = FakeExchange(
            uri=b"/f/token?x=1",
            headers=[(b"host", DOMAIN.encode()), (b"user-agent", b"UA"), (b"x-real-ip", b"6.6.6.6")],
        )
        _handler(upstream).handle(exchange)
        [(method, path, headers, body)] = upstream.requests
        self.assertEqual((method, path, body), (b"GET", b"/f/token?x=1", None))
        self.assertEqual(
            headers,
            [
                (b"user-agent", b"UA"),
                (b"host", DOMAIN.encode()),
                (b"x-forwarded-for", b"198.51.100.7"),
                (b"x-forwarded-proto", b"https"),
                (b"x-forwarded-host", DOMAIN.encode()),
            ],
        )
        self.assertEqual((exchange.outcome.host, exchange.outcome.client), (DOMAIN, "198.51.100.7"))
        self.assertEqual(exchange.work, [1])

    def test_upstream_failures_are_answered_with_their_status_and_end_the_work(self) -> None:
        """Connect failure 502, timeout 504, busy 503 with Retry-After; the outcome records the
        cause and the upstream work ends exactly once."""
        for error, code in (
            (UpstreamConnectFailed("refused"), 502),
            (UpstreamTimeout("slow"), 504),
            (UpstreamBusy("busy"), 503),
        ):
            upstream = UpstreamSpy()
            exchange = FakeExchange()
            _handler(upstream).handle(exchange)
            upstream.answers[0].errback(Failure(error))
            self.assertEqual(exchange.code, code)
            self.assertEqual(exchange.outcome.upstream_error, error.cause)
            self.assertEqual(exchange.work, [1, -1])
            if code == 503:
                self.assertIn((b"retry-after", b"5"), exchange.answer[0][2])
        self.flushLoggedErrors()

    def test_a_client_gone_before_the_answer_withdraws_the_request(self) -> None:
        """The client goes away while the request waits upstream: the request is cancelled
        (withdrawn), nothing is answered, and the work ends once."""
        upstream = UpstreamSpy()
        exchange = FakeExchange()
        _handler(upstream).handle(exchange)
        assert exchange.lost is not None
        exchange.lost()
        self.assertEqual(upstream.cancelled, [0])
        self.assertTrue(upstream.answers[0].called)  # with CancelledError, taken by the handler
        self.assertEqual((exchange.answer, exchange.work), ([], [1, -1]))
