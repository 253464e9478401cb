"""Integration: the issuing service against a real pebble, each scenario on a fresh reactor.

The HTTP-01 responder is served by a small twisted.web site on pebble's ``httpPort``; the TLS
side is a real listener using the SNI map, checked with Python's ``ssl`` module against
pebble's root.
"""

from __future__ import annotations

import json
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
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from trackingproxy.acme.client import AcmeObtainer
from trackingproxy.acme.filestore import FileStore
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.obtainer import ObtainRequest
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.settings import AcmeSettings, build_acme
from trackingproxy.acme.store import AriWindow
from trackingproxy.acme.testing import LogCapture
from trackingproxy.challenges import ChallengeResponder
from trackingproxy.sni import SNIContextMap

A, B, BAD = "a.example.com", "b.example.com", "bad.example.com"


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
            if answer is not None:
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

    def direct_service(self, state: Path, **issuer_options: Any) -> IssuingService:
        store = FileStore(state, self.reactor)
        responder = HTTP01Responder(
            self.domains, self.reactor, shared_dir=state / "challenges", refresh_interval=0.2
        )
        self.listen(responder)
        self.obtainer = CountingObtainer(AcmeObtainer(
            reactor=self.reactor, clock=self.reactor, directory_url=self.pebble.directory_url,
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


def _logs() -> LogCapture:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    return capture


def test_first_issuance_and_restart(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """Two domains get certificates through build_acme; the served chains verify against
    pebble's root; a restart with the same state directory orders nothing and registers no
    new account."""
    pebble = pebble_factory()
    state = tmp_path / "state"
    settings = AcmeSettings(
        email="ops@example.com", directory=pebble.directory_url, ca_bundle=pebble.ca_bundle,
        state_dir=state,
    )

    @inlineCallbacks
    def first(reactor: Any) -> Generator[Deferred[Any], Any, dict[str, int]]:
        h = Harness(reactor, pebble, [A, B])
        service, responder = build_acme(settings, [A, B], [], h.sni, reactor)
        h.listen(responder)
        h.service = service  # type: ignore[assignment]
        service.startService()
        try:
            yield wait_for(reactor, lambda: all(h.sni.has_certificate(d) for d in (A, B)), 60)
            yield h.fetch_root()
            serials = {}
            for name in (A, B):
                serials[name] = yield in_thread(reactor, tls_serial, h.tls_port, name, h.root)
            assert h.challenges.hits >= 2
        finally:
            yield h.close()
        return serials

    serials = run_reactor(first, timeout=90)
    account_files = list((state / "accounts").iterdir())
    assert len(account_files) == 1
    account_before = account_files[0].read_bytes()
    assert json.loads(account_before)["registration"]["uri"]

    logs = _logs()

    @inlineCallbacks
    def second(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A, B])
        service = h.direct_service(state)
        service.startService()
        try:
            assert all(h.sni.has_certificate(d) for d in (A, B))  # served from the store at once
            yield h.fetch_root()
            for name in (A, B):
                serial = yield in_thread(reactor, tls_serial, h.tls_port, name, h.root)
                assert serial == serials[name]
            yield deferLater(reactor, 1.0, lambda: None)  # let the ARI check load the account
        finally:
            yield h.close()
        assert h.obtainer.obtained == 0

    try:
        run_reactor(second, timeout=60)
    finally:
        globalLogPublisher.removeObserver(logs)
    assert [f.read_bytes() for f in (state / "accounts").iterdir()] == [account_before]
    assert not any("Registered ACME account" in line for line in logs.lines())


def test_renewal_in_place(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """A short-lived certificate is renewed on time; new connections get the new serial while
    the listener and an established connection stay up."""
    pebble = pebble_factory(validity=12)

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 30)
            first = h.sni.certificate_for(A)
            assert first is not None
            yield h.fetch_root()
            sock, serial = yield in_thread(reactor, tls_connect, h.tls_port, A, h.root)
            assert serial == first.leaf.serial_number
            assert (yield in_thread(reactor, tls_get, sock, A)) == b"hello over tls"
            yield wait_for(reactor, lambda: h.sni.certificate_for(A) is not first, 30)
            second = h.sni.certificate_for(A)
            assert second is not None and second.serial_hex != first.serial_hex
            new_serial = yield in_thread(reactor, tls_serial, h.tls_port, A, h.root)
            assert new_serial == second.leaf.serial_number
            # The connection made before the renewal still works, on the old certificate.
            assert (yield in_thread(reactor, tls_get, sock, A)) == b"hello over tls"
            sock.close()
        finally:
            yield h.close()

    run_reactor(scenario, timeout=60)


def test_nonce_rejection(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """With pebble rejecting 30 % of nonces, issuance still succeeds on the first attempt."""
    pebble = pebble_factory(nonce_reject=30)
    logs = _logs()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A, B])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: all(h.sni.has_certificate(d) for d in (A, B)), 60)
        finally:
            yield h.close()

    try:
        run_reactor(scenario, timeout=90)
    finally:
        globalLogPublisher.removeObserver(logs)
    assert logs.lines(LogLevel.error) == []


def test_pebble_down_at_start(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """With the CA unreachable the service keeps running and logs the failure; once the CA is
    up a retry obtains the certificate."""
    pebble = pebble_factory(start=False)
    logs = _logs()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: bool(logs.lines(LogLevel.error)), 30)
            assert "cannot reach the ACME server" in logs.lines(LogLevel.error)[0]
            assert service.running and not h.sni.has_certificate(A)
            yield in_thread(reactor, pebble.start)
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 60)
        finally:
            yield h.close()

    try:
        run_reactor(scenario, timeout=90)
    finally:
        globalLogPublisher.removeObserver(logs)


def test_failing_domain_does_not_block_others(pebble_factory, run_reactor, tmp_path) -> None:
    """A domain whose DNS points elsewhere fails validation with a clear log line; the other
    domain still gets its certificate."""
    pebble = pebble_factory()
    pebble.add_a(BAD, "127.0.0.2")
    logs = _logs()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [BAD, A])
        service = h.direct_service(tmp_path / "state", backoff_base=30)
        service.startService()
        try:
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 60)
            yield wait_for(reactor, lambda: bool(logs.lines(LogLevel.error)), 30)
            assert not h.sni.has_certificate(BAD)
        finally:
            yield h.close()

    try:
        run_reactor(scenario, timeout=90)
    finally:
        globalLogPublisher.removeObserver(logs)
    errors = logs.lines(LogLevel.error)
    assert len(errors) == 1, errors
    assert BAD in errors[0] and f"make sure DNS for {BAD} points to this host" in errors[0]
    meta = json.loads((tmp_path / "state" / "certificates" / BAD / "meta.json").read_text())
    assert BAD in meta["last_error"]


def test_strict_mode(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """Issuance works against pebble in -strict mode."""
    pebble = pebble_factory(strict=True)

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 60)
        finally:
            yield h.close()

    run_reactor(scenario, timeout=90)
