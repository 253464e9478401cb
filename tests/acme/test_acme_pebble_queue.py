"""Integration: the order queue against a real pebble: 200 domains at a set pace, and the
pause of every domain when the CA answers ``rateLimited`` (pebble never does: a fault layer
in front of it answers the first newOrder so, as ``tests/hostile`` does).

pebble issues at once, but one ``AcmeObtainer`` runs every blocking ACME call in its single
thread and certbot's ``acme`` sleeps a second while polling each order, so one client
manages about one order a second. To see the queue's pace (not the client's) the first test
puts ``CLIENTS`` real clients behind one obtainer (``PooledObtainer``), as replicas sharing
a state directory would be, and lets the issuer run that many orders at once.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from tests.acme.pebble_harness import Harness, in_thread, logs_captured, tls_serial, wait_for
from tests.hostile.acme_fault_layer import FaultLayer
from trackingproxy.acme.client import AcmeObtainer
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.obtainer import ObtainRequest
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.store.contract import AriWindow
from trackingproxy.store.files import FileStore

COUNT = 200
PER_HOUR = 18_000  # 5 a second
BURST = 10
CLIENTS = 16


class PooledObtainer:
    """Several ACME clients behind one ``Obtainer``; each order goes to a free one.
    ``starts`` holds the reactor time of every order."""

    def __init__(self, reactor: Any, clients: list[AcmeObtainer]) -> None:
        self.reactor = reactor
        self.free = list(clients)
        self.clients = clients
        self.starts: list[float] = []

    @property
    def description(self) -> str:
        return f"{len(self.clients)} clients of {self.clients[0].directory_url}"

    def start(self) -> None:
        for client in self.clients:
            client.start()

    def stop(self) -> Deferred[None]:
        d = DeferredList([c.stop() for c in self.clients])
        return d.addCallback(lambda _: None)

    def obtain(self, request: ObtainRequest) -> Deferred[bytes]:
        self.starts.append(self.reactor.seconds())
        client = self.free.pop()  # the issuer runs at most len(clients) orders at once

        def release(result: bytes | Failure) -> bytes | Failure:
            self.free.append(client)
            return result

        return client.obtain(request).addBoth(release)

    def renewal_info(self, name: str, fullchain_pem: bytes) -> Deferred[AriWindow | None]:
        return self.clients[0].renewal_info(name, fullchain_pem)


def most_in_any_window(times: list[float], span: float) -> int:
    return max((bisect.bisect_left(times, t + span) - i for i, t in enumerate(times)), default=0)


def test_two_hundred_domains_at_the_pace(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """200 domains at 5 orders a second (10 at once to begin with) against pebble: all served, orders started at the pace."""
    pebble = pebble_factory()
    domains = [f"q{i:03}.example.com" for i in range(COUNT)]
    state = tmp_path / "state"
    seen: dict[str, Any] = {}

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, domains)
        store = FileStore(state, reactor)
        responder = HTTP01Responder(domains, reactor, shared_dir=state / "challenges",
                                    refresh_interval=0.2)
        h.listen(responder)
        obtainer = PooledObtainer(reactor, [
            AcmeObtainer(reactor=reactor, clock=reactor, directory_url=pebble.directory_url,
                         store=store, responder=responder, email="ops@example.com",
                         ca_bundle=pebble.ca_bundle, poll_timeout=30)
            for _ in range(CLIENTS)
        ])
        h.service = IssuingService(
            clock=reactor, store=store, obtainer=obtainer, sni=h.sni, domains=domains,
            key_generator=lambda: ec.generate_private_key(ec.SECP256R1()), backoff_base=0.5,
            max_orders_per_hour=PER_HOUR, max_concurrent_orders=CLIENTS, order_burst=BURST,
        )
        began = time.monotonic()
        h.service.startService()
        try:
            yield wait_for(reactor, lambda: all(h.sni.has_certificate(d) for d in domains), 55)
            seen["took"] = time.monotonic() - began
            seen["starts"] = list(obtainer.starts)
            seen["summary"] = h.service.queue_summary()
            seen["failures"] = sum(s.failures for s in h.service.renewal_states().values())
            yield h.fetch_root()
            for name in (domains[0], domains[COUNT // 2], domains[-1]):
                yield in_thread(reactor, tls_serial, h.tls_port, name, h.root)
        finally:
            yield h.close()

    run_reactor(scenario, timeout=80)
    starts = sorted(seen["starts"])
    assert seen["failures"] == 0
    assert len(starts) == COUNT
    rate = PER_HOUR / 3600
    for span in (1.0, 5.0, 10.0):
        most = most_in_any_window(starts, span)
        assert most <= BURST + span * rate + 1, (span, most)
    spread = starts[-1] - starts[0]
    assert spread >= (COUNT - BURST) / rate - 1, (spread, seen["took"])
    assert seen["summary"].length == 0


def test_rate_limited_pauses_every_domain(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """A rateLimited newOrder with Retry-After: 3 holds every domain's order for 3 s (logged once); then all are served."""
    pebble = pebble_factory()
    domains = ["x.example.com", "y.example.com", "z.example.com"]
    layer = FaultLayer(
        pebble_url=f"https://127.0.0.1:{pebble.port}", ca_bundle=pebble.ca_bundle,
        cert=pebble.workdir / "pebble-api-cert.pem", key=pebble.workdir / "pebble-api-key.pem",
        fault="rateLimited", retry_after=3,
    )

    def only_the_first(method: str, path: str) -> None:
        if path == "/order-plz" and len(layer.requests_to("/order-plz")) > 1:
            layer.fault = None

    layer.hooks.append(only_the_first)
    logs = logs_captured()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        layer.start(reactor)
        h = Harness(reactor, pebble, domains)
        service = h.direct_service(tmp_path / "state", directory_url=layer.url,
                                   max_concurrent_orders=1)
        service.startService()
        try:
            yield wait_for(reactor, lambda: all(h.sni.has_certificate(d) for d in domains), 40)
        finally:
            yield h.close()
            yield layer.stop()

    try:
        run_reactor(scenario, timeout=60)
    finally:
        globalLogPublisher.removeObserver(logs)
    orders = layer.requests_to("/order-plz")
    assert [o.status for o in orders] == [429, 201, 201, 201], orders
    assert orders[1].at - orders[0].at >= layer.retry_after - 0.05, orders
    paused = [line for line in logs.lines(LogLevel.warn) if "ACME orders paused" in line]
    assert len(paused) == 1, paused
    assert "rateLimited" in paused[0]
