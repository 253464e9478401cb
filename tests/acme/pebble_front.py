"""The plumbing shared by the HTTPS layers the tests put in front of pebble (``ari_proxy``,
``tests/hostile/acme_fault_layer``): a TLS listener with pebble's API certificate, reading a
request, forwarding it to pebble with the layer's own Host header (pebble builds the URLs it
hands out from it, so the client keeps talking to the layer) and writing an answer back.
Forwarding blocks (``requests``), so the layers run it in the reactor's thread pool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests
from attrs import define
from twisted.internet import ssl
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive",
               "content-encoding", "host", "date", "server"}
PROBLEM = "urn:ietf:params:acme:error:"


@define
class Answer:
    code: int
    headers: list[tuple[str, str]]
    body: bytes


def problem(code: int, typ: str, detail: str, *extra: tuple[str, str]) -> Answer:
    """An ACME problem document answer (RFC 8555 6.7)."""
    body = json.dumps({"type": PROBLEM + typ, "detail": detail, "status": code}).encode()
    return Answer(code, [("Content-Type", "application/problem+json"), *extra], body)


def tls_site_factory(reactor: Any, cert: Path, key: Path, root: Resource) -> TLSMemoryBIOFactory:
    """A TLS factory serving ``root``; ``clock=reactor`` because listenSSL would flush through
    the global reactor, which does not run in these tests."""
    options = ssl.DefaultOpenSSLContextFactory(str(key), str(cert))
    return TLSMemoryBIOFactory(options, False, Site(root, reactor=reactor), clock=reactor)


def read_request(request: Request) -> tuple[str, str, dict[str, str], bytes]:
    """(method, path, headers, body) of a request to the layer."""
    headers = {k.decode("latin-1"): v[0].decode("latin-1")
               for k, v in request.requestHeaders.getAllRawHeaders()}
    assert request.content is not None
    return request.method.decode("ascii"), request.uri.decode("ascii"), headers, \
        request.content.read()


def forward(pebble_url: str, ca_bundle: Path, host: str, method: str, path: str,
            headers: dict[str, str], body: bytes) -> Answer:
    """Pass one request to pebble (blocking) with ``host`` as its Host header."""
    sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
    sent["Host"] = host  # pebble builds its URLs and checks JWS urls with it
    response = requests.request(method, pebble_url + path, headers=sent, data=body,
                                verify=str(ca_bundle), timeout=30, allow_redirects=False)
    kept = [(k, v) for k, v in response.raw.headers.items() if k.lower() not in _HOP_BY_HOP]
    return Answer(response.status_code, kept, response.content)


def write_answer(request: Request, method: str, answer: Answer) -> None:
    """Send ``answer`` unless the client has gone (e.g. it timed out)."""
    if request.finished or request.channel is None:
        return
    request.setResponseCode(answer.code)
    for name, value in answer.headers:
        request.responseHeaders.addRawHeader(name, value)
    if method != "HEAD":
        request.write(answer.body)
    request.finish()
