"""The issuing service on a Clock: order locks refreshed during long orders, bounded stop."""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.client import _DaemonThreadPool
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.testing import (
    FakeObtainer,
    FixedRandom,
    LogCapture,
    self_signed,
)
from trackingproxy.store.contract import CertificateStore, PendingOrder, StoredCertificate
from trackingproxy.store.files import FileStore
from trackingproxy.store.memory import MemoryStore
from trackingproxy.tls.certificates import PrivateKey
from trackingproxy.tls.sni import SNIContextMap

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
A = "a.example.com"
TTL = 1800.0


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class HangingStop(FakeObtainer):
    """An obtainer whose stop never finishes (a blocking ACME call that never returns)."""

    def stop(self) -> Deferred[None]:
        self.started = False
        return Deferred()


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        self.store = self.make_store()
        self.obtainer = FakeObtainer()
        self.sni = SNIContextMap([A])
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def make_store(self) -> CertificateStore:
        return MemoryStore(self.clock)

    def make(self, obtainer: FakeObtainer | None = None) -> IssuingService:
        service = IssuingService(
            clock=self.clock, store=self.store, obtainer=obtainer or self.obtainer, sni=self.sni,
            domains=[A], key_generator=lambda: ec.generate_private_key(ec.SECP256R1()),
            rng=FixedRandom(0.5), lock_ttl=TTL,
        )
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def answer(self, obtainer: FakeObtainer, index: int = -1) -> None:
        request, d = obtainer.calls[index]
        cert = self_signed(A, self.now(), self.now() + 90 * DAY, key=request.key)
        d.callback(cert.fullchain_pem())


class LockRefreshTests(_Base):
    def test_long_order_keeps_its_lock(self) -> None:
        """An order running for three lock lifetimes keeps the lock (refreshed every ttl/3):
        nobody else can take it, and its certificate is stored at the end."""
        self.make().startService()
        for _ in range(9):
            self.clock.advance(TTL / 3)
            self.assertIsNone(self.successResultOf(self.store.acquire(A, TTL)))
        self.answer(self.obtainer)
        self.assertIsNotNone(self.successResultOf(self.store.load(A)))
        self.assertTrue(self.sni.has_certificate(A))
        self.assertEqual(self.logs.lines(LogLevel.error), [])
        # Released at the end, and no refresh timer is left behind.
        self.assertIsNotNone(self.successResultOf(self.store.acquire(A, TTL)))

    def test_refresh_stops_when_lock_taken_over(self) -> None:
        """When the lock expired and another holder took it, refreshing stops with one
        warning and the order's result is refused (lost the order lock)."""
        self.make().startService()
        self.clock.advance(TTL / 3 - 1)
        # Simulate a long stall of this process: the lock expires and another holder takes it.
        store = self.store
        assert isinstance(store, MemoryStore)
        del store.locks[A]
        other = self.successResultOf(store.acquire(A, 10 * TTL))
        self.clock.advance(1)
        self.clock.advance(TTL)
        warnings = [w for w in self.logs.lines(LogLevel.warn) if "lock" in w]
        self.assertEqual(len(warnings), 1, warnings)
        self.answer(self.obtainer)
        self.assertIsNone(self.successResultOf(store.load(A)))
        self.assertEqual(self.logs.lines(LogLevel.error), [])  # the design working, no error
        self.assertTrue(any("the order lock passed to another replica" in line
                            for line in self.logs.lines(LogLevel.info)))
        self.assertEqual(store.locks[A], other)  # the other holder's lock is untouched


class FileStoreLockRefreshTests(LockRefreshTests):
    """The same with the state-directory store."""

    def make_store(self) -> CertificateStore:
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        return FileStore(d, self.clock)

    def test_refresh_stops_when_lock_taken_over(self) -> None:
        """When another holder took over the expired lock, refreshing stops with one warning
        and the order's certificate is not stored."""
        self.make().startService()
        # A stalled process: its first refresh runs only after the lock expired.
        self.clock.advance(TTL + 1)
        other = self.successResultOf(self.store.acquire(A, 10 * TTL))
        self.assertIsNotNone(other)
        self.clock.advance(TTL / 3)
        self.answer(self.obtainer)
        self.assertIsNone(self.successResultOf(self.store.load(A)))
        self.assertEqual(self.logs.lines(LogLevel.error), [])  # the design working, no error
        self.assertTrue(any("the order lock passed to another replica" in line
                            for line in self.logs.lines(LogLevel.info)))


class StopTests(_Base):
    def test_stop_abandons_hanging_order(self) -> None:
        """stopService returns within 5 s although an order hangs; the lock is released, the
        late result is ignored, and the next start resumes the stored order."""
        service = self.make()
        service.startService()
        request, late = self.obtainer.calls[0]
        order = PendingOrder("https://ca/order/1", _key_pem(request.key), "https://ca/dir")
        self.successResultOf(request.save_order(order))
        stopped = service.stopService()
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertFalse(self.obtainer.started)
        warnings = self.logs.lines(LogLevel.warn)
        self.assertTrue(any(A in w and "resumed" in w for w in warnings), warnings)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        lock = self.successResultOf(self.store.acquire(A, TTL))  # released
        assert lock is not None
        self.successResultOf(self.store.release(lock))

        self.answer(self.obtainer, 0)  # the abandoned job finishes in the background
        self.assertIsNone(self.successResultOf(self.store.load(A)))
        self.assertFalse(self.sni.has_certificate(A))
        self.assertEqual(self.logs.lines(LogLevel.error), [])

        successor = FakeObtainer()
        self.make(successor).startService()
        self.assertEqual(successor.calls[0][0].resume, order)

    def test_stop_bounded_when_obtainer_stop_hangs(self) -> None:
        """A certificate obtainer that never finishes stopping does not hang stopService."""
        self.store.certs[A] = StoredCertificate(self_signed(A, self.now(), self.now() + 90 * DAY))
        obtainer = HangingStop()
        service = self.make(obtainer)
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(5)
        self.successResultOf(stopped)

    def test_stop_without_work_is_immediate(self) -> None:
        """With nothing running, stopService fires at once and leaves no timer."""
        self.store.certs[A] = StoredCertificate(self_signed(A, self.now(), self.now() + 90 * DAY))
        service = self.make()
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_acme_thread_is_daemon(self) -> None:
        """The ACME worker thread is a daemon: an abandoned blocking call cannot keep the
        process from exiting."""
        thread = _DaemonThreadPool.threadFactory(target=lambda: None)
        self.assertTrue(thread.daemon)
