"""A fault-injecting HTTPS layer in front of pebble, for the ACME fault tests.

``FaultLayer`` listens with TLS on loopback (pebble's API certificate, so the client trusts it
through the same ``--acme-ca-bundle``) and passes every request to pebble with the layer's own
Host header (pebble builds the URLs it hands out from it, so the client keeps talking to the
layer). While ``fault`` is set it misbehaves instead:

* ``"slow"``: every response is delayed by ``delay`` seconds (beyond the client's timeout);
* ``"500"``: every request is answered ``500`` with a plain-text body (no problem document);
* ``"500-problem"``: every request is answered ``500`` ``serverInternal`` (a problem document);
* ``"badNonce"``: every POST is answered ``400`` ``badNonce`` (a nonce storm);
* ``"rateLimited"``: newOrder is answered ``429`` ``rateLimited`` with ``Retry-After``.

``down()`` stops listening (the client gets "connection refused"), ``up()`` listens again on
the same port. ``seen`` records every request (reactor time, method, path, status sent);
``hooks`` are called with (method, path) as each request arrives (to fault something else then).
The layer never alters a JWS: it cannot sign, it only forwards or refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.acme.pebble_front import (
    Answer,
    forward,
    problem,
    read_request,
    tls_site_factory,
    write_answer,
)

__all__ = ["FAULTS", "FaultLayer", "Seen"]

FAULTS = ("slow", "500", "500-problem", "badNonce", "rateLimited")


@define
class Seen:
    """One request as the layer saw it: reactor time, method, path and the status it sent."""

    at: float
    method: str
    path: str
    status: int = 0


@define
class FaultLayer:
    """See the module docstring; ``start(reactor)`` listens, ``url`` is the directory URL."""

    pebble_url: str  # https://127.0.0.1:PORT (no path)
    ca_bundle: Path
    cert: Path
    key: Path
    fault: str | None = None
    delay: float = 2.0
    retry_after: int = 3
    seen: list[Seen] = field(factory=list)
    hooks: list[Callable[[str, str], object]] = field(factory=list)
    port: int = 0
    _reactor: Any = None
    _listener: Any = None
    _factory: Any = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self, reactor: Any) -> None:
        self._reactor = reactor
        self._factory = tls_site_factory(reactor, self.cert, self.key, _Root(self))
        self.up()

    def up(self) -> None:
        self._listener = self._reactor.listenTCP(self.port, self._factory, interface="127.0.0.1")
        self.port = self._listener.getHost().port

    def down(self) -> Deferred[None]:
        listener, self._listener = self._listener, None
        if listener is None:
            return succeed(None)
        return Deferred.fromCoroutine(_stopped(listener))

    stop = down

    def requests_to(self, path: str, method: str = "POST") -> list[Seen]:
        return [s for s in self.seen if s.path == path and s.method == method]

    # -- deciding (reactor thread) ---------------------------------------------------------
    def refusal(self, method: str, path: str) -> Answer | None:
        """The fault's answer to this request, or None to forward it to pebble."""
        if self.fault == "500":
            return Answer(500, [("Content-Type", "text/html")],
                           b"<html><body>500 Internal Server Error</body></html>")
        if self.fault == "500-problem":
            return problem(500, "serverInternal", "the CA is having a bad day")
        if self.fault == "badNonce" and method == "POST":
            return problem(400, "badNonce", "JWS has an invalid anti-replay nonce")
        if self.fault == "rateLimited" and method == "POST" and path == "/order-plz":
            return problem(429, "rateLimited", "too many new orders recently",
                            ("Retry-After", str(self.retry_after)))
        return None

    # -- forwarding (worker thread) --------------------------------------------------------
    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        host = f"127.0.0.1:{self.port}"
        return forward(self.pebble_url, self.ca_bundle, host, method, path, headers, body)


async def _stopped(listener: Any) -> None:
    await maybeDeferred(listener.stopListening)


class _Root(Resource):
    isLeaf = True

    def __init__(self, layer: FaultLayer) -> None:
        super().__init__()
        self._layer = layer

    def render(self, request: Request) -> Any:
        layer = self._layer
        reactor = layer._reactor
        method, path, headers, body = read_request(request)
        seen = Seen(reactor.seconds(), method, path)
        layer.seen.append(seen)
        for hook in layer.hooks:
            hook(method, path)
        delay = layer.delay if layer.fault == "slow" else 0.0
        refusal = layer.refusal(method, path)
        d: Deferred[Answer]
        if refusal is not None:
            d = succeed(refusal)
        else:

            def forward(_: object) -> Deferred[Answer]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), layer.forward,
                                         method, path, headers, body)

            d = deferLater(reactor, delay, lambda: None).addCallback(forward)

        def respond(answer: Answer) -> None:
            seen.status = answer.code
            write_answer(request, method, answer)

        def failed(failure: Failure) -> None:
            respond(Answer(502, [], f"layer error: {failure.getErrorMessage()}".encode()))

        d.addCallbacks(respond, failed)
        return NOT_DONE_YET
