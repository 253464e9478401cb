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

import requests
from attrs import define, field
from twisted.internet import ssl
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = ["AriProxy", "NewOrderSeen"]

_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive",
               "content-encoding", "host", "date", "server"}
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
class _Answer:
    code: int
    headers: list[tuple[str, str]]
    body: bytes


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
        options = ssl.DefaultOpenSSLContextFactory(str(self.key), str(self.cert))
        root = _Root(self)
        # TLSMemoryBIOFactory with clock=reactor: listenSSL would flush through the global
        # reactor, which does not run in these tests.
        factory = TLSMemoryBIOFactory(options, False, Site(root, reactor=reactor), clock=reactor)
        self._listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listener.getHost().port

    def stop(self) -> Any:
        return self._listener.stopListening()

    # -- called in a worker thread ---------------------------------------------------------
    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        if method == "GET" and path.startswith("/renewal-info/"):
            cert_id = path.rsplit("/", 1)[1]
            self.ari_requests.append(cert_id)
            start, end = self.window(cert_id)
            window = {"suggestedWindow": {"start": _rfc3339(start), "end": _rfc3339(end)}}
            return _Answer(200, [("Content-Type", "application/json"),
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

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        sent["Host"] = self.host  # pebble builds its URLs and checks JWS urls with it
        response = requests.request(method, self.pebble_url + path, headers=sent, data=body,
                                    verify=str(self.ca_bundle), timeout=30,
                                    allow_redirects=False)
        kept = [(k, v) for k, v in response.raw.headers.items() if k.lower() not in _HOP_BY_HOP]
        return _Answer(response.status_code, kept, response.content)

    def _already_replaced(self, replaces: str) -> _Answer:
        nonce = self._forward("HEAD", "/nonce-plz", {}, b"")
        problem = {"type": "urn:ietf:params:acme:error:alreadyReplaced",
                   "detail": f"certificate {replaces} was already replaced", "status": 409}
        headers = [("Content-Type", "application/problem+json")]
        headers += [(k, v) for k, v in nonce.headers if k.lower() == "replay-nonce"]
        return _Answer(409, headers, json.dumps(problem).encode())


class _Root(Resource):
    isLeaf = True

    def __init__(self, proxy: AriProxy) -> None:
        super().__init__()
        self._proxy = proxy

    def render(self, request: Request) -> Any:
        method = request.method.decode("ascii")
        path = request.uri.decode("ascii")
        headers = {k.decode("latin-1"): v[0].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        assert request.content is not None
        body = request.content.read()
        reactor = self._proxy._reactor
        d = deferToThreadPool(reactor, reactor.getThreadPool(), self._proxy.answer,
                              method, path, headers, body)

        def respond(answer: _Answer) -> None:
            request.setResponseCode(answer.code)
            for name, value in answer.headers:
                request.responseHeaders.addRawHeader(name, value)
            if method != "HEAD":
                request.write(answer.body)
            request.finish()

        def failed(failure: Failure) -> None:
            request.setResponseCode(502)
            request.write(f"proxy error: {failure.getErrorMessage()}".encode())
            request.finish()

        d.addCallbacks(respond, failed)
        return NOT_DONE_YET
