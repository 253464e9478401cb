"""The certificate store contract, run against the memory, file and Redis stores.

Time moves through ``advance``: the memory and file stores read the test's Clock; for Redis the
remaining PTTL of every key is shortened instead (expiry runs on Redis's own clock).
"""

from __future__ import annotations

import datetime
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.redis_server import RedisServer
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
from trackingproxy.store.redis import RedisStore, synchronous

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


class StoreContract:
    """Behaviour every CertificateStore implementation must have."""

    clock: Clock

    def make_store(self) -> CertificateStore:
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store's locks."""
        self.clock.advance(seconds)

    def set_stored_fence(self, name: str, fence: int) -> None:
        """Make the data stored for ``name`` look written by a holder with ``fence``."""
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
        self.advance(61)
        second = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert second is not None
        t.assertNotEqual(first.token, second.token)

    def test_write_after_lock_lost(self) -> None:
        """Writes with an expired or taken-over lock fail with LockLost and write nothing."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        first = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert first is not None
        self.advance(61)
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
        self.advance(50)
        lock = t.successResultOf(self.store.refresh(lock, 60))
        self.advance(50)
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

    def test_fences_grow(self) -> None:
        """Every acquisition of a name gets a fence above all earlier ones (release, expiry);
        a refresh keeps the fence."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        first = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert first is not None
        t.successResultOf(self.store.release(first))
        second = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert second is not None
        t.assertGreater(second.fence, first.fence)
        refreshed = t.successResultOf(self.store.refresh(second, 60))
        t.assertEqual(refreshed.fence, second.fence)
        self.advance(61)
        third = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert third is not None
        t.assertGreater(third.fence, second.fence)

    def test_older_fence_refused(self) -> None:
        """A holder whose fence is older than the one stored with the data (a newer holder
        wrote since) cannot save or save an order, even with its token still valid."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        lock = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert lock is not None
        kept = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        t.successResultOf(self.store.save(lock, StoredCertificate(kept)))
        self.set_stored_fence("a.example.com", lock.fence + 10)
        other = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        failure = t.failureResultOf(self.store.save(lock, StoredCertificate(other)), LockLost)
        t.assertIn("older fence", str(failure.value))
        order = PendingOrder("https://ca/order/1", b"key", "https://ca/dir")
        t.failureResultOf(self.store.save_order(lock, order), LockLost)
        loaded = t.successResultOf(self.store.load("a.example.com"))
        assert loaded is not None
        t.assertEqual(loaded.cert.serial_hex, kept.serial_hex)
        t.assertIsNone(t.successResultOf(self.store.load_order("a.example.com")))
        t.successResultOf(self.store.release(lock))
        newer = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert newer is not None
        t.assertGreater(newer.fence, lock.fence + 10)
        t.successResultOf(self.store.save(newer, StoredCertificate(other)))

    def test_refusals_say_why(self) -> None:
        """LockLost says whether the lock expired or was taken over by another holder."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        cert = StoredCertificate(self_signed("a.example.com", NOW, NOW + 90 * DAY))
        first = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert first is not None
        self.advance(61)
        expired = t.failureResultOf(self.store.save(first, cert), LockLost)
        t.assertIn("expired", str(expired.value))
        t.assertIsNotNone(t.successResultOf(self.store.acquire("a.example.com", 60)))
        taken = t.failureResultOf(self.store.save(first, cert), LockLost)
        t.assertIn("taken over", str(taken.value))

    def test_seed_only_when_empty(self) -> None:
        """seed writes only where nothing is stored; a holder may replace a seeded
        certificate, and seed never overwrites a saved one."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        seeded = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        t.assertTrue(t.successResultOf(self.store.seed("a.example.com", StoredCertificate(seeded))))
        other = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        t.assertFalse(t.successResultOf(self.store.seed("a.example.com", StoredCertificate(other))))
        loaded = t.successResultOf(self.store.load("a.example.com"))
        assert loaded is not None
        t.assertEqual(loaded.cert.serial_hex, seeded.serial_hex)
        lock = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert lock is not None
        t.successResultOf(self.store.save(lock, StoredCertificate(other)))
        t.assertFalse(t.successResultOf(self.store.seed("a.example.com", StoredCertificate(seeded))))
        loaded = t.successResultOf(self.store.load("a.example.com"))
        assert loaded is not None
        t.assertEqual(loaded.cert.serial_hex, other.serial_hex)

    def test_serials(self) -> None:
        """serials maps each name that has a certificate to its serial, and skips the rest."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        a = self_signed("a.example.com", NOW, NOW + 90 * DAY)
        b = self_signed("b.example.com", NOW, NOW + 90 * DAY)
        lock = t.successResultOf(self.store.acquire("a.example.com", 60))
        assert lock is not None
        t.successResultOf(self.store.save(lock, StoredCertificate(a)))
        t.successResultOf(self.store.seed("b.example.com", StoredCertificate(b)))
        found = t.successResultOf(
            self.store.serials(["a.example.com", "b.example.com", "c.example.com"])
        )
        t.assertEqual(found, {"a.example.com": a.serial_hex, "b.example.com": b.serial_hex})
        t.assertEqual(t.successResultOf(self.store.serials([])), {})


    def test_load_many(self) -> None:
        """load_many gives, by name, what load gives for each name that has a certificate
        (ARI window included) and leaves the others out, in batches larger than one."""
        t: SynchronousTestCase = self  # type: ignore[assignment]
        names = [f"n{i}.example.com" for i in range(7)]
        ari = AriWindow(NOW + 60 * DAY, NOW + 61 * DAY, NOW + DAY)
        for i, name in enumerate(names[:5]):
            cert = self_signed(name, NOW, NOW + 90 * DAY)
            t.successResultOf(self.store.seed(name, StoredCertificate(cert)))
            if i == 0:
                t.successResultOf(self.store.save_ari(name, cert.serial_hex, ari))
        found = t.successResultOf(self.store.load_many(names))
        t.assertEqual(sorted(found), names[:5])
        for name in names[:5]:
            one = t.successResultOf(self.store.load(name))
            assert one is not None
            t.assertEqual(found[name].cert.serial_hex, one.cert.serial_hex)
            t.assertEqual(found[name].ari, one.ari)
        t.assertEqual(found[names[0]].ari, ari)
        t.assertEqual(t.successResultOf(self.store.load_many([])), {})


class MemoryStoreTests(StoreContract, SynchronousTestCase):
    def make_store(self) -> CertificateStore:
        return MemoryStore(self.clock)

    def set_stored_fence(self, name: str, fence: int) -> None:
        assert isinstance(self.store, MemoryStore)
        self.store.fences[name] = fence


class RedisStoreTests(StoreContract, SynchronousTestCase):
    """The contract against a real redis-server (calls run synchronously)."""

    server: RedisServer

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.server = redis_server

    def make_store(self) -> CertificateStore:
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        return RedisStore(
            self.client, run=synchronous, clock=self.clock, prefix="test:", node_id="node-a",
            description=f"redis://127.0.0.1:{self.server.port}/0",
        )

    def advance(self, seconds: float) -> None:
        """Shorten every expiring key's remaining time (Redis's clock), then the Clock."""
        for key in self.client.scan_iter(match="test:*"):
            left = self.client.pttl(key)
            if left < 0:
                continue
            if left <= seconds * 1000:
                self.client.delete(key)
            else:
                self.client.pexpire(key, left - round(seconds * 1000))
        self.clock.advance(seconds)

    def set_stored_fence(self, name: str, fence: int) -> None:
        self.client.hset(f"test:{{{name}}}:cert", "fence", fence)


class FileStoreTests(StoreContract, SynchronousTestCase):
    def make_store(self) -> CertificateStore:
        self.dir = Path(tempfile.mkdtemp()) / "state"
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir.parent))
        return FileStore(self.dir, self.clock)

    def set_stored_fence(self, name: str, fence: int) -> None:
        path = self.dir / "certificates" / name / "meta.json"
        meta = json.loads(path.read_text())
        meta["fence"] = fence
        path.write_text(json.dumps(meta))

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
        self.advance(61)
        self.assertIsNotNone(self.successResultOf(other.acquire("a.example.com", 60)))

    def test_rejects_path_names(self) -> None:
        """Names that could escape the state directory are refused."""
        self.failureResultOf(self.store.load("../etc"), ValueError)
        self.failureResultOf(self.store.acquire("a/b", 60), ValueError)
