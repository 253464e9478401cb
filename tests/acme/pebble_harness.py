"""Helpers for the pebble integration tests: the port-80 challenge site, a TLS listener using
the SNI map, an issuing service wired to a pebble (or anything speaking ACME), and waits.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from trackingproxy.acme.client import AcmeObtainer
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.obtainer import ObtainRequest
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.testing import LogCapture
from trackingproxy.proxy.challenges import ChallengeResponder
from trackingproxy.store.contract import AriWindow
from trackingproxy.store.files import FileStore
from trackingproxy.tls.sni import SNIContextMap


class ChallengeSite(Resource):
    """Answers /.well-known/acme-challenge/<token> from a responder (what the port-80 site does)."""

    isLeaf = True

    def __init__(self, responder: ChallengeResponder) -> None:
        super().__init__()
        self.responder = responder
        self.hits = 0

    def render_GET(self, request: Request) -> bytes:
        parts = request.postpath or []
        host = request.getRequestHostname().decode("ascii", "replace")
        if len(parts) == 3 and parts[:2] == [b".well-known", b"acme-challenge"]:
            answer = self.responder.key_authorization(host, parts[2].decode("ascii", "replace"))
            if isinstance(answer, bytes):  # no shared store here: never a Deferred
                self.hits += 1
                return answer
        request.setResponseCode(404)
        return b"no such challenge"


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello over tls"


class CountingObtainer:
    """Wraps an obtainer and counts obtain calls."""

    def __init__(self, inner: AcmeObtainer) -> None:
        self.inner = inner
        self.obtained = 0

    @property
    def description(self) -> str:
        return self.inner.description

    def start(self) -> None:
        self.inner.start()

    def stop(self) -> Deferred[None]:
        return self.inner.stop()

    def obtain(self, request: ObtainRequest) -> Deferred[bytes]:
        self.obtained += 1
        return self.inner.obtain(request)

    def renewal_info(self, name: str, fullchain_pem: bytes) -> Deferred[AriWindow | None]:
        return self.inner.renewal_info(name, fullchain_pem)


def wait_for(reactor: Any, predicate: Callable[[], bool], timeout: float = 30.0) -> Deferred[None]:
    @inlineCallbacks
    def poll() -> Generator[Deferred[Any], Any, None]:
        waited = 0.0
        while not predicate():
            if waited > timeout:
                raise TimeoutError("condition not reached")
            yield deferLater(reactor, 0.05, lambda: None)
            waited += 0.05

    return poll()


def in_thread(reactor: Any, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def _read_response(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the response headers")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return body


def tls_connect(port: int, name: str, root: Path) -> tuple[ssl.SSLSocket, int]:
    """A verified TLS connection (chain against ``root``, hostname) and the leaf's serial."""
    ctx = ssl.create_default_context(cafile=str(root))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                           server_hostname=name)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return sock, x509.load_der_x509_certificate(der).serial_number


def tls_get(sock: ssl.SSLSocket, name: str) -> bytes:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    return _read_response(sock)


def tls_serial(port: int, name: str, root: Path) -> int:
    sock, serial = tls_connect(port, name, root)
    try:
        assert tls_get(sock, name) == b"hello over tls"
    finally:
        sock.close()
    return serial


class Harness:
    """Listeners (port-80 challenge site, TLS site) around an issuing service."""

    def __init__(self, reactor: Any, pebble: Any, domains: list[str]) -> None:
        self.reactor = reactor
        self.pebble = pebble
        self.domains = domains
        self.sni = SNIContextMap(domains)
        self.root = pebble.workdir / "pebble-root.pem"

    def listen(self, responder: ChallengeResponder) -> None:
        self.challenges = ChallengeSite(responder)
        self.http = self.reactor.listenTCP(
            self.pebble.http_port, Site(self.challenges, reactor=self.reactor),
            interface="127.0.0.1",
        )
        site = Site(Hello(), reactor=self.reactor)
        self.tls = self.reactor.listenTCP(
            0, TLSMemoryBIOFactory(self.sni, False, site, clock=self.reactor),
            interface="127.0.0.1",
        )
        self.tls_port = self.tls.getHost().port

    def direct_service(
        self,
        state: Path,
        directory_url: str | None = None,
        **issuer_options: Any,
    ) -> IssuingService:
        store = FileStore(state, self.reactor)
        responder = HTTP01Responder(
            self.domains, self.reactor, shared_dir=state / "challenges", refresh_interval=0.2
        )
        self.listen(responder)
        self.obtainer = CountingObtainer(AcmeObtainer(
            reactor=self.reactor, clock=self.reactor,
            directory_url=directory_url or self.pebble.directory_url,
            store=store, responder=responder, email="ops@example.com",
            ca_bundle=self.pebble.ca_bundle, poll_timeout=30,
        ))
        issuer_options.setdefault("backoff_base", 0.5)
        self.service = IssuingService(
            clock=self.reactor, store=store, obtainer=self.obtainer, sni=self.sni,
            domains=self.domains, key_generator=lambda: ec.generate_private_key(ec.SECP256R1()),
            **issuer_options,
        )
        return self.service

    @inlineCallbacks
    def close(self) -> Generator[Deferred[Any], Any, None]:
        if self.service.running:
            yield self.service.stopService()
        yield self.http.stopListening()
        yield self.tls.stopListening()

    def fetch_root(self) -> Deferred[None]:
        return in_thread(self.reactor, lambda: self.root.write_bytes(self.pebble.root_pem()))


def logs_captured() -> LogCapture:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    return capture
