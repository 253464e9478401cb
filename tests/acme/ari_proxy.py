"""A fake ACME Renewal Information layer (RFC 9773) in front of pebble, which has none.

``AriProxy`` listens with TLS on loopback (pebble's API certificate, so the client trusts it
through the same ``--acme-ca-bundle``) and passes every request to pebble with the proxy's
own Host header: pebble builds every URL it hands out from that header (so the client keeps
talking to the proxy) and checks each JWS ``url`` against it. On top it

* adds ``renewalInfo`` to the directory and answers ``GET renewalInfo/<cert-id>`` with the
  window ``window(cert_id)`` returns and a ``Retry-After``;
* records the ``replaces`` of every newOrder (decoding the JWS payload; the proxy cannot
  sign, so it never alters a JWS) and, while ``refuse_replaces`` is set, answers such an
  order 409 ``alreadyReplaced`` with a fresh nonce fetched from pebble (nonces stay pebble's).
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import define, field
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

__all__ = ["AriProxy", "NewOrderSeen"]

Window = tuple[datetime.datetime, datetime.datetime]


@define
class NewOrderSeen:
    """One newOrder request: when (clock seconds), its ``replaces`` and whether it was refused."""

    at: float
    replaces: str | None
    refused: bool


def _jws_payload(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)["payload"]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    decoded = json.loads(raw) if raw else {}
    return decoded if isinstance(decoded, dict) else {}


def _rfc3339(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@define
class AriProxy:
    """See the module docstring; ``start(reactor)`` listens, ``url`` is the directory URL."""

    pebble_url: str  # https://127.0.0.1:PORT (no path)
    ca_bundle: Path
    cert: Path
    key: Path
    window: Callable[[str], Window]
    retry_after: int = 3600
    refuse_replaces: bool = False
    orders: list[NewOrderSeen] = field(factory=list)
    ari_requests: list[str] = field(factory=list)
    port: int = 0
    _reactor: Any = None
    _listener: Any = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}/dir"

    def start(self, reactor: Any) -> None:
        self._reactor = reactor
        factory = tls_site_factory(reactor, self.cert, self.key, _Root(self))
        self._listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listener.getHost().port

    def stop(self) -> Any:
        return self._listener.stopListening()

    # -- called in a worker thread ---------------------------------------------------------
    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if method == "GET" and path.startswith("/renewal-info/"):
            cert_id = path.rsplit("/", 1)[1]
            self.ari_requests.append(cert_id)
            start, end = self.window(cert_id)
            window = {"suggestedWindow": {"start": _rfc3339(start), "end": _rfc3339(end)}}
            return Answer(200, [("Content-Type", "application/json"),
                                 ("Retry-After", str(self.retry_after))],
                           json.dumps(window).encode())
        if method == "POST" and path == "/order-plz":
            replaces = _jws_payload(body).get("replaces")
            refused = replaces is not None and self.refuse_replaces
            self.orders.append(NewOrderSeen(self._reactor.seconds(), replaces, refused))
            if refused:
                return self._already_replaced(replaces)
        answer = self._forward(method, path, headers, body)
        if method == "GET" and path == "/dir" and answer.code == 200:
            directory = json.loads(answer.body)
            directory["renewalInfo"] = f"https://{self.host}/renewal-info/"
            answer.body = json.dumps(directory).encode()
        return answer

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        return forward(self.pebble_url, self.ca_bundle, self.host, method, path, headers, body)

    def _already_replaced(self, replaces: str) -> Answer:
        nonce = self._forward("HEAD", "/nonce-plz", {}, b"")
        fresh = [(k, v) for k, v in nonce.headers if k.lower() == "replay-nonce"]
        return problem(409, "alreadyReplaced", f"certificate {replaces} was already replaced",
                       *fresh)


class _Root(Resource):
    isLeaf = True

    def __init__(self, proxy: AriProxy) -> None:
        super().__init__()
        self._proxy = proxy

    def render(self, request: Request) -> Any:
        method, path, headers, body = read_request(request)
        reactor = self._proxy._reactor
        d = deferToThreadPool(reactor, reactor.getThreadPool(), self._proxy.answer,
                              method, path, headers, body)

        def failed(failure: Failure) -> None:
            error = f"proxy error: {failure.getErrorMessage()}".encode()
            write_answer(request, method, Answer(502, [], error))

        d.addCallbacks(lambda answer: write_answer(request, method, answer), failed)
        return NOT_DONE_YET
