"""/readyz's cheap path: ``StatusSource.ready()`` without domain facts gives exactly the
answer of ``ready(source.domains())`` while reading only the served certificates."""

from __future__ import annotations

import datetime
import random
from typing import Any

from attrs import define, field
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.issuer import RenewalState
from trackingproxy.acme.queue import QueueSummary
from trackingproxy.acme.testing import self_signed
from trackingproxy.admin.metrics import ProxyMetrics
from trackingproxy.admin.status import StatusSource
from trackingproxy.tls.certificates import LoadedCertificate

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


@define
class Certificates:
    """The SNI map's read side; counts ``certificate_for`` calls."""

    domains: tuple[str, ...]
    certs: dict[str, LoadedCertificate] = field(factory=dict)
    lookups: int = 0

    def certificate_for(self, name: str) -> LoadedCertificate | None:
        self.lookups += 1
        return self.certs.get(name)


@define
class Renewals:
    """The issuer's renewal states; counts how often they are asked for."""

    asked: int = 0

    def renewal_states(self) -> dict[str, RenewalState]:
        self.asked += 1
        return {}

    def queue_summary(self) -> QueueSummary:
        raise AssertionError("readiness never looks at the order queue")


@define
class Listener:
    option: str
    description: str
    port: Any = None  # anything but None: listening


class CheapReadyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        rng = random.Random(1234)
        names = tuple(f"d{i}.example.com" for i in range(300))
        # a few certificates shared by many names: valid, expiring in 1 and 3 days, expired,
        # valid only from tomorrow; about one name in six has none
        kinds = [
            self_signed("valid.example", T0 - 10 * DAY, T0 + 80 * DAY),
            self_signed("soon.example", T0 - 89 * DAY, T0 + 1 * DAY),
            self_signed("later.example", T0 - 87 * DAY, T0 + 3 * DAY),
            self_signed("expired.example", T0 - 100 * DAY, T0 - 10 * DAY),
            self_signed("future.example", T0 + 1 * DAY, T0 + 91 * DAY),
        ]
        self.certs = Certificates(names)
        for name in names:
            choice = rng.randrange(6)
            if choice < len(kinds):
                self.certs.certs[name] = kinds[choice]
        self.renewals = Renewals()
        self.listeners = [Listener("--https-port", "tcp:443", object())]

    def source(self, https: bool = True) -> StatusSource:
        return StatusSource(
            clock=self.clock,
            certificates=self.certs,
            https_enabled=https,
            listeners=lambda: self.listeners,
            renewals=lambda: self.renewals,
            metrics=ProxyMetrics(lambda: set(self.certs.domains), process_metrics=False),
            started=T0.timestamp(),
        )

    def assertSameAsSlowPath(self, source: StatusSource) -> tuple[bool, list[str]]:
        cheap = source.ready()
        self.assertEqual(cheap, source.ready(source.domains()))
        return cheap

    def test_same_answer_as_the_facts(self) -> None:
        """With 300 domains, some without a certificate, some expired, some not yet valid,
        the cheap path and the facts give the same answer, now and as certificates expire,
        start, are issued and as the missing ones drop under the named limit."""
        source = self.source()
        ready, reasons = self.assertSameAsSlowPath(source)
        self.assertFalse(ready)
        self.assertRegex(reasons[0], r"^\d+ of 300 domains have a certificate$")
        self.assertIn("more without one", " ".join(reasons))
        self.assertTrue(any("expired at" in r for r in reasons))
        self.assertTrue(any("valid only from" in r for r in reasons))
        for _ in range(4):  # tomorrow: the future ones start, the 1-day ones expire, ...
            self.clock.advance(86400)
            self.assertSameAsSlowPath(source)
        missing = [n for n in self.certs.domains if n not in self.certs.certs]
        valid = self_signed("new.example", T0, T0 + 400 * DAY)
        for name in missing[:-3]:  # issued: only three left without one, all named
            self.certs.certs[name] = valid
        ready, reasons = self.assertSameAsSlowPath(source)
        self.assertIn(f"{missing[-1]}: no certificate yet", reasons)
        for name in self.certs.domains:
            self.certs.certs[name] = valid
        self.assertEqual(self.assertSameAsSlowPath(source), (True, []))

    def test_order_of_the_reasons(self) -> None:
        """The count first, then each domain in configured order; the ones past the twentieth
        without a certificate are counted where the last of them is, before later expiries."""
        names = [f"n{i}.example.com" for i in range(25)]
        expired = self_signed("old.example", T0 - 100 * DAY, T0 - 10 * DAY)
        self.certs = Certificates(("e1.example.com", *names, "e2.example.com"),
                                  {"e1.example.com": expired, "e2.example.com": expired})
        at = "2029-12-22T00:00:00+00:00"
        ready, reasons = self.assertSameAsSlowPath(self.source())
        self.assertEqual(
            reasons,
            ["2 of 27 domains have a certificate", f"e1.example.com: the certificate expired at {at}"]
            + [f"{n}: no certificate yet" for n in names[:20]]
            + ["and 5 more without one", f"e2.example.com: the certificate expired at {at}"],
        )

    def test_listeners_and_https_off(self) -> None:
        """A listener that is not listening is a reason on both paths; without HTTPS the
        certificates are not looked at."""
        self.listeners.append(Listener("--http-port", "tcp:80"))
        self.assertSameAsSlowPath(self.source())
        self.certs.lookups = 0
        self.assertEqual(
            self.source(https=False).ready(), (False, ["--http-port tcp:80 is not listening"])
        )
        self.assertEqual(self.certs.lookups, 0)

    def test_reads_only_the_certificates(self) -> None:
        """Without facts given, ``ready`` asks the certificate map once per domain and never
        asks the issuer for its renewal states (they are not part of the answer)."""
        source = self.source()
        self.certs.lookups = 0
        source.ready()
        self.assertEqual(self.certs.lookups, len(self.certs.domains))
        self.assertEqual(self.renewals.asked, 0)
