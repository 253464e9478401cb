"""Doubles for the order-queue tests of the issuing service: an obtainer that answers by
itself after a delay on the Clock (recording when each order started), a random source with
chosen renewal points, and an SNI map that only records (for 10,000 domains)."""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from trackingproxy.acme.obtainer import ObtainFailed, ObtainRequest
from trackingproxy.acme.testing import self_signed
from trackingproxy.store.contract import AriWindow
from trackingproxy.tls.certificates import LoadedCertificate

DAY = datetime.timedelta(days=1)


class AutoObtainer:
    """Answers each order ``delay`` clock seconds after it started, with a certificate for its
    name and key (or with ``failures[name]``, an ObtainFailed, once); ``starts`` holds
    (clock seconds, name) of every order, ``most_running`` the most orders at once."""

    description = "auto CA"

    def __init__(
        self, clock: IReactorTime, delay: float = 5.0, lifetime: datetime.timedelta = 90 * DAY
    ) -> None:
        self.clock = clock
        self.delay = delay
        self.lifetime = lifetime
        self.starts: list[tuple[float, str]] = []
        self.failures: dict[str, ObtainFailed] = {}
        self.running = 0
        self.most_running = 0
        self.renewal_info_calls: list[tuple[float, str]] = []

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def obtain(self, request: ObtainRequest) -> Deferred[bytes]:
        self.starts.append((self.clock.seconds(), request.name))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        d: Deferred[bytes] = Deferred()

        def answer() -> None:
            self.running -= 1
            failure = self.failures.pop(request.name, None)
            if failure is not None:
                d.errback(failure)
                return
            now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
            cert = self_signed(request.name, now, now + self.lifetime, key=request.key)
            d.callback(cert.fullchain_pem())

        self.clock.callLater(self.delay, answer)
        return d

    def renewal_info(self, name: str, fullchain_pem: bytes) -> Deferred[AriWindow | None]:
        self.renewal_info_calls.append((self.clock.seconds(), name))
        return succeed(None)

    def started_names(self) -> list[str]:
        return [name for _, name in self.starts]


class PointRandom(random.Random):
    """``uniform(0, 1)`` (a renewal point) gives ``points`` in turn; other draws (jitter,
    back-off) give the middle of their range."""

    def __init__(self, points: Iterable[float]) -> None:
        super().__init__(0)
        self.points = list(points)

    def uniform(self, a: float, b: float) -> float:
        if (a, b) == (0.0, 1.0):
            return self.points.pop(0)
        return (a + b) / 2


class RecordingSNI:
    """Stands in for ``SNIContextMap`` where 10,000 OpenSSL contexts would only cost time."""

    def __init__(self) -> None:
        self.served: dict[str, LoadedCertificate] = {}

    def install(self, cert: LoadedCertificate, names: Iterable[str]) -> tuple[str, ...]:
        covered = tuple(n for n in names if cert.covers(n))
        for name in covered:
            self.served[name] = cert
        return covered
