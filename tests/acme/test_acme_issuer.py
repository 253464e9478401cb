"""The issuing service on a Clock, with the memory store and a fake obtainer."""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.obtainer import ObtainFailed, ObtainRequest
from trackingproxy.acme.testing import (
    FakeObtainer,
    FixedRandom,
    LogCapture,
    self_signed,
)
from trackingproxy.store.contract import AriWindow, PendingOrder, StoredCertificate
from trackingproxy.store.memory import MemoryStore
from trackingproxy.tls.certificates import PrivateKey
from trackingproxy.tls.sni import SNIContextMap

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
A, B = "a.example.com", "b.example.com"


class IssuerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        self.store = MemoryStore(self.clock)
        self.obtainer = FakeObtainer()
        self.sni = SNIContextMap([A, B])
        self.changed: list[str] = []
        self.sni.add_listener(self.changed.append)
        self.panics: list[tuple[str, str]] = []
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def make(self, domains: tuple[str, ...] = (A, B), skip: tuple[str, ...] = ()) -> IssuingService:
        service = IssuingService(
            clock=self.clock,
            store=self.store,
            obtainer=self.obtainer,
            sni=self.sni,
            domains=domains,
            skip_domains=skip,
            key_generator=lambda: ec.generate_private_key(ec.SECP256R1()),
            panic=lambda name, msg: self.panics.append((name, msg)),
            rng=FixedRandom(0.5),
        )
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def answer(self, index: int = -1, lifetime: datetime.timedelta = 90 * DAY) -> ObtainRequest:
        """Fire obtain call ``index`` with a certificate for its name and key."""
        request, d = self.obtainer.calls[index]
        cert = self_signed(request.name, self.now(), self.now() + lifetime, key=request.key)
        d.callback(cert.fullchain_pem())
        return request

    def refuse(self, index: int = -1, retry_after: datetime.datetime | None = None) -> None:
        request, d = self.obtainer.calls[index]
        d.errback(ObtainFailed(f"{request.name}: ACME error connection: refused", retry_after))

    def preload(self, name: str, lifetime: datetime.timedelta, age: datetime.timedelta) -> None:
        cert = self_signed(name, self.now() - age, self.now() - age + lifetime)
        self.store.certs[name] = StoredCertificate(cert)

    def test_start_orders_missing(self) -> None:
        """At start each domain without a certificate is ordered, then stored and served."""
        service = self.make()
        service.startService()
        self.assertEqual(sorted(r.name for r, _ in self.obtainer.calls), [A, B])
        self.answer(0)
        self.answer(1)
        self.assertTrue(self.sni.has_certificate(A) and self.sni.has_certificate(B))
        self.assertEqual(sorted(self.changed), [A, B])
        self.assertEqual(sorted(self.store.certs), [A, B])
        self.assertEqual(self.store.locks, {})

    def test_start_serves_stored_without_ordering(self) -> None:
        """Valid stored certificates are served at once and nothing is ordered."""
        self.preload(A, 90 * DAY, DAY)
        self.preload(B, 90 * DAY, DAY)
        self.make().startService()
        self.assertEqual(self.obtainer.calls, [])
        self.assertEqual(sorted(self.changed), [A, B])

    def test_renewal_exactly_on_time(self) -> None:
        """A 60-second certificate is renewed at 30 seconds, not at the 10-minute tick."""
        service = self.make(domains=(A,))
        service.startService()
        self.answer(lifetime=datetime.timedelta(seconds=60))
        first = self.sni.certificate_for(A)
        self.clock.advance(29)
        self.assertEqual(len(self.obtainer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.obtainer.calls), 2)
        request = self.answer(lifetime=datetime.timedelta(seconds=60))
        assert first is not None
        self.assertEqual(request.replaces, first.fullchain_pem())
        second = self.sni.certificate_for(A)
        assert second is not None
        self.assertNotEqual(first.serial_hex, second.serial_hex)

    def test_due_stored_certificate_is_renewed_at_start(self) -> None:
        """A stored certificate past two thirds of its life is served and renewed at start."""
        self.preload(A, 90 * DAY, 70 * DAY)
        self.make(domains=(A,)).startService()
        self.assertTrue(self.sni.has_certificate(A))
        self.assertEqual(len(self.obtainer.calls), 1)

    def test_failure_keeps_certificate_and_backs_off(self) -> None:
        """A failed renewal keeps the old certificate served and retries after 1, then 2 min."""
        self.preload(A, 90 * DAY, 70 * DAY)
        self.make(domains=(A,)).startService()
        served = self.sni.certificate_for(A)
        self.refuse()
        self.assertIs(self.sni.certificate_for(A), served)
        errors = self.logs.lines(LogLevel.error)
        self.assertEqual(len(errors), 1)
        self.assertIn("connection: refused", errors[0])
        self.assertIn("current certificate stays in use", errors[0])
        self.assertIn(A, self.store.errors)
        self.clock.advance(59)
        self.assertEqual(len(self.obtainer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.obtainer.calls), 2)
        self.refuse()
        self.clock.advance(119)
        self.assertEqual(len(self.obtainer.calls), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.obtainer.calls), 3)
        self.answer()
        self.assertIsNot(self.sni.certificate_for(A), served)
        self.assertEqual(len(self.logs.lines(LogLevel.error)), 2)

    def test_retry_after_honoured(self) -> None:
        """A rateLimited failure with Retry-After is not retried before that time."""
        self.make(domains=(A,)).startService()
        self.refuse(retry_after=self.now() + datetime.timedelta(hours=2))
        self.clock.advance(2 * 3600 - 1)
        self.assertEqual(len(self.obtainer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.obtainer.calls), 2)

    def test_failing_domain_does_not_block_others(self) -> None:
        """One domain failing over and over does not delay the other's certificate."""
        self.make().startService()
        by_name = {r.name: i for i, (r, _) in enumerate(self.obtainer.calls)}
        self.refuse(by_name[A])
        self.answer(by_name[B])
        self.assertTrue(self.sni.has_certificate(B))
        self.assertFalse(self.sni.has_certificate(A))

    def test_concurrent_orders_deduplicated(self) -> None:
        """ensure() while an order for the same name runs does not start a second one."""
        service = self.make(domains=(A,))
        service.startService()
        d1 = service.ensure(A)
        d2 = service.check()
        self.assertEqual(len(self.obtainer.calls), 1)
        self.answer()
        self.successResultOf(d1)
        self.successResultOf(d2)

    def test_skip_domains_never_ordered(self) -> None:
        """Domains covered by user-supplied certificates are never ordered nor replaced."""
        self.preload(B, 90 * DAY, 89 * DAY)
        self.make(skip=(B,)).startService()
        self.assertEqual([r.name for r, _ in self.obtainer.calls], [A])
        self.clock.advance(3 * DAY.total_seconds())
        self.assertNotIn(B, [r.name for r, _ in self.obtainer.calls])
        self.assertFalse(self.sni.has_certificate(B))

    def test_lock_held_by_other_process(self) -> None:
        """While another holder has the lock nothing is ordered; its result is picked up."""
        other = self.successResultOf(self.store.acquire(A, 1800))
        assert other is not None
        self.make(domains=(A,)).startService()
        self.assertEqual(self.obtainer.calls, [])
        cert = self_signed(A, self.now(), self.now() + 90 * DAY)
        self.successResultOf(self.store.save(other, StoredCertificate(cert)))
        self.successResultOf(self.store.release(other))
        self.clock.advance(60)
        self.assertEqual(self.obtainer.calls, [])
        served = self.sni.certificate_for(A)
        assert served is not None
        self.assertEqual(served.serial_hex, cert.serial_hex)

    def test_store_change_served_on_next_check(self) -> None:
        """A certificate another process stored is served at the next periodic check."""
        self.preload(A, 90 * DAY, DAY)
        self.make(domains=(A,)).startService()
        self.changed.clear()
        self.preload(A, 90 * DAY, 0 * DAY)
        self.clock.advance(660)
        self.assertEqual(self.changed, [A])

    def test_resumes_pending_order(self) -> None:
        """A stored pending order is resumed with its stored key."""
        key: PrivateKey = ec.generate_private_key(ec.SECP256R1())
        pem = self_signed(A, T0, T0 + DAY, key=key).key_pem()
        self.store.orders[A] = PendingOrder("https://ca/order/7", pem, "https://ca/dir")
        self.make(domains=(A,)).startService()
        request, _ = self.obtainer.calls[0]
        self.assertEqual(request.resume, self.store.orders[A])
        self.assertEqual(self_signed(A, T0, T0 + DAY, key=request.key).key_pem(), pem)
        self.answer()
        self.assertNotIn(A, self.store.orders)

    def test_save_order_needs_lock(self) -> None:
        """The save_order callback writes the pending order under the order's lock."""
        self.make(domains=(A,)).startService()
        request, _ = self.obtainer.calls[0]
        order = PendingOrder("https://ca/order/1", b"k", "https://ca/dir")
        self.successResultOf(request.save_order(order))
        self.assertEqual(self.store.orders[A], order)

    def test_ari_window_moves_renewal(self) -> None:
        """An ARI window earlier than the lifetime rule triggers renewal inside the window."""
        self.preload(A, 90 * DAY, DAY)
        stored = self.store.certs[A]
        self.obtainer.ari[A] = AriWindow(self.now() + 10 * DAY, self.now() + 12 * DAY)
        self.make(domains=(A,)).startService()
        self.assertEqual(self.obtainer.calls, [])
        self.assertEqual(self.store.certs[A].ari, self.obtainer.ari[A])
        self.clock.advance(11 * DAY.total_seconds() - 1)
        self.assertEqual(self.obtainer.calls, [])
        self.clock.advance(1)
        self.assertEqual(len(self.obtainer.calls), 1)
        self.assertEqual(self.obtainer.calls[0][0].replaces, stored.cert.fullchain_pem())

    def test_panic_near_expiry(self) -> None:
        """Failing within 7 days of expiry logs CRITICAL and calls panic, at most daily."""
        self.preload(A, 90 * DAY, 85 * DAY)
        self.make(domains=(A,)).startService()
        self.refuse()
        self.assertEqual(len(self.panics), 1)
        self.assertEqual(self.panics[0][0], A)
        self.assertEqual(len(self.logs.lines(LogLevel.critical)), 1)
        self.clock.advance(60)
        self.refuse()
        self.assertEqual(len(self.panics), 1)

    def test_no_panic_far_from_expiry(self) -> None:
        """Failing renewals of a certificate with weeks left do not panic."""
        self.preload(A, 90 * DAY, 61 * DAY)
        self.make(domains=(A,)).startService()
        self.refuse()
        self.assertEqual(self.panics, [])

    def test_wrong_certificate_from_ca_is_a_failure(self) -> None:
        """A chain whose key does not match the order's key is refused and retried."""
        self.make(domains=(A,)).startService()
        _, d = self.obtainer.calls[0]
        d.callback(self_signed(A, self.now(), self.now() + 90 * DAY).fullchain_pem())
        self.assertFalse(self.sni.has_certificate(A))
        self.assertIn("unusable certificate", self.logs.lines(LogLevel.error)[0])

    def test_stop_waits_and_stops_obtainer(self) -> None:
        """stopService cancels the timer and stops the obtainer after running orders end."""
        service = self.make(domains=(A,))
        service.startService()
        d = service.stopService()
        self.assertNoResult(d)
        self.answer()
        self.successResultOf(d)
        self.assertFalse(self.obtainer.started)
        self.assertEqual(self.clock.getDelayedCalls(), [])
