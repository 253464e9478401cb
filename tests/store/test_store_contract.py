"""The certificate store contract, run against the file store and the memory store."""

from __future__ import annotations

import datetime
import json
import os
import stat
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.testing import LogCapture, self_signed
from trackingproxy.store.contract import (
    AccountRecord,
    AriWindow,
    CertificateStore,
    LockLost,
    PendingOrder,
    StoredCertificate,
)
from trackingproxy.store.files import FileStore
from trackingproxy.store.memory import MemoryStore

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


class StoreContract:
    """Behaviour every CertificateStore implementation must have."""

    clock: Clock

    def make_store(self) -> CertificateStore:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = self.make_store()

    def test_missing(self) -> None:
        """Nothing stored: load, load_order and load_account give None."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        t.assertIsNone(t.successResultOf(self.store.load("a.example.com")))
        t.assertIsNone(t.successResultOf(self.store.load_order("a.example.com")))
        t.assertIsNone(t.successResultOf(self.store.load_account("https://ca/dir")))

    def test_save_and_load(self) -> None:
        """A saved certificate loads back with the same key, chain and ARI window."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        cert = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        ari = AriWindow(NOW + 60 * DAY, NOW + 61 * DAY, NOW + DAY)
        lock = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert lock is not None
        t.successResultOf(self.store.save(lock, StoredCertificate(cert, ari)))
        loaded = t.successResultOf(self.store.load("a.example.com"))
        assert loaded is not None
        t.assertEqual(loaded.cert.fullchain_pem(), cert.fullchain_pem())
        t.assertEqual(loaded.cert.key_pem(), cert.key_pem())
        t.assertEqual(loaded.ari, ari)

    def test_lock_excludes_others_until_expiry(self) -> None:
        """A held lock refuses a second holder; after its expiry a new holder gets it."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        first = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert first is not None
        t.assertIsNone(t.successResultOf(self.store.acquire("a.example.com", 60)))
        t.assertIsNotNone(t.successResultOf(self.store.acquire("b.example.com", 60)))
        self.clock.advance(61)
        second = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert second is not None
        t.assertNotEqual(first.token, second.token)

    def test_write_after_lock_lost(self) -> None:
        """Writes with an expired or taken-over lock fail with LockLost and write nothing."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        first = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert first is not None
        self.clock.advance(61)
        cert = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        t.failureResultOf(self.store.save(first, StoredCertificate(cert)), LockLost)
        second = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert second is not None
        t.failureResultOf(self.store.save(first, StoredCertificate(cert)), LockLost)
        order = PendingOrder("https://ca/order/1", b"key", "https://ca/dir")
        t.failureResultOf(self.store.save_order(first, order), LockLost)
        t.failureResultOf(self.store.refresh(first, 60), LockLost)
        t.assertIsNone(t.successResultOf(self.store.load("a.example.com")))
        t.assertIsNone(t.successResultOf(self.store.load_order("a.example.com")))

    def test_refresh_and_release(self) -> None:
        """Refresh extends the lock; release frees it; releasing a lost lock keeps the new one."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        lock = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert lock is not None
        self.clock.advance(50)
        lock = t.successResultOf(self.store.refresh(lock, 60))
        self.clock.advance(50)
        t.assertIsNone(t.successResultOf(self.store.acquire("a.example.com", 60)))
        t.successResultOf(self.store.release(lock))
        other = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert other is not None
        t.successResultOf(self.store.release(lock))
        t.assertIsNone(t.successResultOf(self.store.acquire("a.example.com", 60)))

    def test_pending_order_cleared_by_save(self) -> None:
        """A pending order is kept until the certificate it produced is saved."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        lock = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert lock is not None
        order = PendingOrder("https://ca/order/1", b"-----KEY-----", "https://ca/dir")
        t.successResultOf(self.store.save_order(lock, order))
        t.assertEqual(t.successResultOf(self.store.load_order("a.example.com")), order)
        cert = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        t.successResultOf(self.store.save(lock, StoredCertificate(cert)))
        t.assertIsNone(t.successResultOf(self.store.load_order("a.example.com")))

    def test_ari_only_for_same_serial(self) -> None:
        """save_ari updates the window of the stored certificate only when the serial matches."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        cert = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        lock = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert lock is not None
        t.successResultOf(self.store.save(lock, StoredCertificate(cert)))
        ari = AriWindow(NOW + 60 * DAY, NOW + 61 * DAY)
        t.successResultOf(self.store.save_ari("a.example.com", "abc", ari))
        loaded = t.successResultOf(self.store.load("a.example.com"))
        assert loaded is not None
        t.assertIsNone(loaded.ari)
        t.successResultOf(self.store.save_ari("a.example.com", cert.serial_hex, ari))
        loaded = t.successResultOf(self.store.load("a.example.com"))
        assert loaded is not None
        t.assertEqual(loaded.ari, ari)

    def test_accounts_per_directory(self) -> None:
        """Accounts are kept per ACME directory URL."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        a = AccountRecord(key_json='{"kty": "EC", "x": "1"}', registration_json=None)
        b = AccountRecord(key_json='{"kty": "EC", "x": "2"}', registration_json='{"uri": "u"}')
        t.successResultOf(self.store.save_account("https://one/dir", a))
        t.successResultOf(self.store.save_account("https://two/dir", b))
        t.assertEqual(t.successResultOf(self.store.load_account("https://one/dir")), a)
        t.assertEqual(t.successResultOf(self.store.load_account("https://two/dir")), b)

    def test_record_error(self) -> None:
        """record_error succeeds with or without a stored certificate."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        t.successResultOf(self.store.record_error("a.example.com", "boom", NOW))


class MemoryStoreTests(StoreContract, SynchronousTestCase):
    def make_store(self) -> CertificateStore:
        return MemoryStore(self.clock)


class FileStoreTests(StoreContract, SynchronousTestCase):
    def make_store(self) -> CertificateStore:
        self.dir = Path(tempfile.mkdtemp()) / "state"
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir.parent))
        return FileStore(self.dir, self.clock)

    def _save(self, name: str = "a.example.com") -> None:
        cert = self_signed(name, NOW, NOW + 90 * DAY)
        lock = self.successResultOf(self.store.acquire(name, 60))
        assert lock is not None
        self.successResultOf(self.store.save(lock, StoredCertificate(cert)))

    def test_permissions(self) -> None:
        """Every directory is 0700 and every file 0600, whatever the umask."""
        old = os.umask(0o022)
        try:
            self._save()
            self.successResultOf(
                self.store.save_account("https://ca/dir", AccountRecord(key_json="{}"))
            )
        finally:
            os.umask(old)
        seen = 0
        for root, _dirs, files in os.walk(self.dir):
            self.assertEqual(stat.S_IMODE(os.stat(root).st_mode), 0o700, root)
            for f in files:
                seen += 1
                self.assertEqual(stat.S_IMODE(os.stat(Path(root, f)).st_mode), 0o600, f)
        self.assertGreaterEqual(seen, 5)

    def test_layout_and_metadata(self) -> None:
        """The documented files exist and meta.json names issuer, serial and validity."""
        self._save()
        d = self.dir / "certificates" / "a.example.com"
        meta = json.loads((d / "meta.json").read_text())
        self.assertTrue((d / "privkey.pem").exists())
        self.assertTrue((d / "fullchain.pem").exists())
        self.assertEqual(meta["not_after"], (NOW + 90 * DAY).isoformat())
        self.assertIn("CN=a.example.com", meta["issuer"])
        self.assertIsNone(meta["last_error"])

    def test_corrupt_chain_is_missing_and_reported_once(self) -> None:
        """A truncated fullchain.pem loads as missing, with one log line however often read."""
        self._save()
        path = self.dir / "certificates" / "a.example.com" / "fullchain.pem"
        path.write_bytes(path.read_bytes()[:100])
        capture = LogCapture()
        globalLogPublisher.addObserver(capture)
        self.addCleanup(globalLogPublisher.removeObserver, capture)
        self.assertIsNone(self.successResultOf(self.store.load("a.example.com")))
        self.assertIsNone(self.successResultOf(self.store.load("a.example.com")))
        lines = capture.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("fullchain.pem is unusable", lines[0])

    def test_key_chain_mismatch_is_missing(self) -> None:
        """A private key that does not match the chain (half-written pair) loads as missing."""
        self._save()
        d = self.dir / "certificates" / "a.example.com"
        other = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        (d / "privkey.pem").write_bytes(other.key_pem())
        self.assertIsNone(self.successResultOf(self.store.load("a.example.com")))

    def test_corrupt_meta_and_lock_and_account(self) -> None:
        """Bad JSON in meta, lock or account files never raises: the data counts as missing."""
        self._save()
        (self.dir / "certificates" / "a.example.com" / "meta.json").write_text("{nope")
        loaded = self.successResultOf(self.store.load("a.example.com"))
        assert loaded is not None
        self.assertIsNone(loaded.ari)
        (self.dir / "locks" / "b.example.com.lock").parent.mkdir(exist_ok=True)
        (self.dir / "locks" / "b.example.com.lock").write_text("garbage")
        self.assertIsNotNone(self.successResultOf(self.store.acquire("b.example.com", 60)))
        self.successResultOf(self.store.save_account("https://ca/dir", AccountRecord("{}")))
        for f in (self.dir / "accounts").iterdir():
            f.write_text("[1, 2")
        self.assertIsNone(self.successResultOf(self.store.load_account("https://ca/dir")))

    def test_two_stores_share_locks(self) -> None:
        """Two stores on one directory (two processes) never hold the same name at once."""
        other = FileStore(self.dir, self.clock)
        mine = self.successResultOf(self.store.acquire("a.example.com", 60))
        self.assertIsNotNone(mine)
        self.assertIsNone(self.successResultOf(other.acquire("a.example.com", 60)))
        self.clock.advance(61)
        self.assertIsNotNone(self.successResultOf(other.acquire("a.example.com", 60)))

    def test_rejects_path_names(self) -> None:
        """Names that could escape the state directory are refused."""
        self.failureResultOf(self.store.load("../etc"), ValueError)
        self.failureResultOf(self.store.acquire("a/b", 60), ValueError)
