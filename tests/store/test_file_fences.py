"""The file store's fences, local copies and compatibility with state directories written
before fences existed."""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.testing import self_signed
from trackingproxy.store.contract import (
    AccountRecord,
    AriWindow,
    LockLost,
    PendingOrder,
    StoredCertificate,
)
from trackingproxy.store.files import FileStore

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
A = "a.example.com"


class FileFenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dir = Path(tempfile.mkdtemp()) / "state"
        self.addCleanup(shutil.rmtree, self.dir.parent)
        self.store = FileStore(self.dir, self.clock)
        self.cert = self_signed(A, NOW, NOW + 90 * DAY)

    def meta(self) -> dict[str, object]:
        return json.loads((self.dir / "certificates" / A / "meta.json").read_text())

    def test_fence_counter_survives_restart(self) -> None:
        """The last fence is kept in fences/<name> (also after release): a new process
        continues above it."""
        first = self.successResultOf(self.store.acquire(A, 60))
        assert first is not None
        self.successResultOf(self.store.release(first))
        self.assertEqual((self.dir / "fences" / A).read_text().strip(), str(first.fence))
        again = self.successResultOf(FileStore(self.dir, self.clock).acquire(A, 60))
        assert again is not None
        self.assertEqual(again.fence, first.fence + 1)

    def test_fences_written_with_data(self) -> None:
        """save writes the holder's fence to meta.json, save_order to order.json; seed 0."""
        lock = self.successResultOf(self.store.acquire(A, 60))
        assert lock is not None
        order = PendingOrder("https://ca/order/1", b"key", "https://ca/dir")
        self.successResultOf(self.store.save_order(lock, order))
        order_json = json.loads((self.dir / "certificates" / A / "order.json").read_text())
        self.assertEqual(order_json["fence"], lock.fence)
        self.successResultOf(self.store.save(lock, StoredCertificate(self.cert)))
        self.assertEqual(self.meta()["fence"], lock.fence)
        self.successResultOf(self.store.seed("b.example.com", StoredCertificate(self.cert)))
        meta_b = json.loads((self.dir / "certificates" / "b.example.com" / "meta.json").read_text())
        self.assertEqual(meta_b["fence"], 0)

    def test_order_with_newer_fence_refuses_older_holder(self) -> None:
        """An order written by a newer fence refuses an older holder's certificate."""
        lock = self.successResultOf(self.store.acquire(A, 60))
        assert lock is not None
        path = self.dir / "certificates" / A / "order.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"order_url": "u", "directory": "d", "key": "k",
                                    "fence": lock.fence + 1}))
        failure = self.failureResultOf(self.store.save(lock, StoredCertificate(self.cert)), LockLost)
        self.assertIn("older fence", str(failure.value))

    def test_state_without_fences_still_works(self) -> None:
        """A state directory from before fences (no fence anywhere) loads, and the next
        holder writes over it."""
        lock = self.successResultOf(self.store.acquire(A, 60))
        assert lock is not None
        self.successResultOf(self.store.save(lock, StoredCertificate(self.cert)))
        self.successResultOf(self.store.release(lock))
        meta = self.meta()
        del meta["fence"]
        (self.dir / "certificates" / A / "meta.json").write_text(json.dumps(meta))
        (self.dir / "fences" / A).unlink()
        loaded = self.successResultOf(self.store.load(A))
        assert loaded is not None
        self.assertEqual(loaded.cert.serial_hex, self.cert.serial_hex)
        newer = self.successResultOf(self.store.acquire(A, 60))
        assert newer is not None
        self.assertEqual(newer.fence, 1)
        other = self_signed(A, NOW, NOW + 90 * DAY)
        self.successResultOf(self.store.save(newer, StoredCertificate(other)))

    def test_write_copy(self) -> None:
        """write_copy writes the files like save (no lock needed), keeps the stored fence and
        drops a pending order."""
        lock = self.successResultOf(self.store.acquire(A, 60))
        assert lock is not None
        self.successResultOf(self.store.save_order(
            lock, PendingOrder("https://ca/order/1", b"key", "https://ca/dir")
        ))
        self.successResultOf(self.store.save(lock, StoredCertificate(self.cert)))
        self.successResultOf(self.store.save_order(
            lock, PendingOrder("https://ca/order/2", b"key", "https://ca/dir")
        ))
        other = self_signed(A, NOW, NOW + 90 * DAY)
        ari = AriWindow(NOW + 60 * DAY, NOW + 61 * DAY)
        self.store.write_copy(A, StoredCertificate(other, ari))
        loaded = self.successResultOf(self.store.load(A))
        assert loaded is not None
        self.assertEqual(loaded.cert.fullchain_pem(), other.fullchain_pem())
        self.assertEqual(loaded.ari, ari)
        self.assertEqual(self.meta()["fence"], lock.fence)
        self.assertIsNone(self.successResultOf(self.store.load_order(A)))
        self.store.write_copy("new.example.com", StoredCertificate(other))
        self.assertIsNotNone(self.successResultOf(self.store.load("new.example.com")))

    def test_names_and_account_directories(self) -> None:
        """names() lists the stored certificates and account_directories() the ACME
        directories with an account (for the import tool); an empty directory has none."""
        self.assertEqual((self.store.names(), self.store.account_directories()), ([], []))
        for name in ("b.example.com", A):
            self.successResultOf(self.store.seed(name, StoredCertificate(self.cert)))
        (self.dir / "certificates" / "half.example.com").mkdir()
        self.successResultOf(self.store.save_account("https://ca/dir", AccountRecord("{}")))
        self.assertEqual(self.store.names(), [A, "b.example.com"])
        self.assertEqual(self.store.account_directories(), ["https://ca/dir"])
