"""The shared store's local write-through copy: reads fall back to it while the shared store
is down, writes go through to it, and an emptied shared store is re-seeded from it."""

from __future__ import annotations

import datetime
import tempfile
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.store.doubles import FlakyShared
from trackingproxy.acme.testing import self_signed
from trackingproxy.store.contract import StoredCertificate, StoreUnavailable
from trackingproxy.store.files import FileStore
from trackingproxy.store.localcopy import COPY_BATCH, COPY_INTERVAL, LocalCopyStore

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
NAME = "a.example.com"


class LocalCopyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.shared = FlakyShared(self.clock)
        self.state = Path(tempfile.mkdtemp())
        self.local = FileStore(self.state, self.clock)
        self.store = LocalCopyStore(self.shared, self.local, self.clock, self.state)
        self.cert = self_signed(NAME, NOW - DAY, NOW + 60 * DAY)

    def _save_shared(self) -> None:
        lock = self.successResultOf(self.store.acquire(NAME, 60))
        assert lock is not None
        self.successResultOf(self.store.save(lock, StoredCertificate(self.cert)))

    def _serial(self, load: Callable[[str], Deferred[StoredCertificate | None]]) -> str | None:
        stored = self.successResultOf(load(NAME))
        return None if stored is None else stored.cert.serial_hex

    def test_save_writes_through(self) -> None:
        """A certificate saved in the shared store is also in the local copy."""
        self._save_shared()
        self.assertEqual(self._serial(self.local.load), self.cert.serial_hex)

    def test_load_copies_what_another_replica_saved(self) -> None:
        """Loading a certificate another replica saved writes the local copy."""
        self.successResultOf(self.shared.seed(NAME, StoredCertificate(self.cert)))
        self.assertIsNone(self._serial(self.local.load))
        self.assertEqual(self._serial(self.store.load), self.cert.serial_hex)
        self.assertEqual(self._serial(self.local.load), self.cert.serial_hex)

    def test_store_down_serves_the_local_copy_and_refuses_locks(self) -> None:
        """With the shared store down, load answers from the local copy; acquire fails."""
        self._save_shared()
        self.shared.down = True
        self.assertEqual(self._serial(self.store.load), self.cert.serial_hex)
        self.failureResultOf(self.store.acquire(NAME, 60), StoreUnavailable)

    def test_emptied_store_is_reseeded_from_the_local_copy(self) -> None:
        """A shared store that lost everything gets the local copy back, not a new order."""
        self._save_shared()
        self.shared.certs.clear()
        self.assertEqual(self._serial(self.store.load), self.cert.serial_hex)
        self.assertEqual(self._serial(self.shared.load), self.cert.serial_hex)

    def test_expired_local_copy_is_not_seeded(self) -> None:
        """An expired local copy is never written back to the shared store."""
        old = self_signed(NAME, NOW - 90 * DAY, NOW - DAY)
        self.local.write_copy(NAME, StoredCertificate(old))
        self.assertIsNone(self.successResultOf(self.store.load(NAME)))
        self.assertIsNone(self.successResultOf(self.shared.load(NAME)))

    def test_seed_race_loads_the_winner(self) -> None:
        """When another replica seeded first, its certificate is loaded and copied."""
        mine = self_signed(NAME, NOW - DAY, NOW + 30 * DAY)
        self.local.write_copy(NAME, StoredCertificate(mine))
        original_seed = self.shared.seed

        def lose(name: str, cert: StoredCertificate) -> Deferred[bool]:
            original_seed(name, StoredCertificate(self.cert))  # the other replica, first
            return original_seed(name, cert)

        self.shared.seed = lose  # type: ignore[method-assign]
        self.assertEqual(self._serial(self.store.load), self.cert.serial_hex)
        self.assertEqual(self._serial(self.local.load), self.cert.serial_hex)

    def test_load_many_copies_falls_back_and_seeds(self) -> None:
        """load_many copies what the shared store holds, seeds the shared store from the local
        copy for a name it lacks, and answers from the local copies while it is down."""
        other = "b.example.com"
        b = self_signed(other, NOW - DAY, NOW + 60 * DAY)
        self.successResultOf(self.shared.seed(NAME, StoredCertificate(self.cert)))
        self.local.write_copy(other, StoredCertificate(b))
        found = self.successResultOf(self.store.load_many([NAME, other, "c.example.com"]))
        self.assertEqual({n: s.cert.serial_hex for n, s in found.items()},
                         {NAME: self.cert.serial_hex, other: b.serial_hex})
        self.assertIsNone(self._serial(self.local.load))  # written after, not in the way
        self.clock.advance(COPY_INTERVAL)
        self.assertEqual(self._serial(self.local.load), self.cert.serial_hex)
        self.assertEqual(self._serial(self.shared.load), self.cert.serial_hex)
        seeded = self.successResultOf(self.shared.load(other))
        assert seeded is not None and seeded.cert.serial_hex == b.serial_hex
        self.shared.down = True
        found = self.successResultOf(self.store.load_many([NAME, other]))
        self.assertEqual(sorted(found), [NAME, other])

    def test_bulk_copies_are_written_at_a_pace_and_never_over_a_newer_one(self) -> None:
        """After load_many, the local copies are written COPY_BATCH every COPY_INTERVAL; a
        certificate saved meanwhile is not overwritten by the older one still waiting."""
        names = [f"n{i}.example.com" for i in range(COPY_BATCH * 3 + 5)]
        for name in names:
            self.successResultOf(self.shared.seed(
                name, StoredCertificate(self_signed(name, NOW - DAY, NOW + 60 * DAY))))
        self.successResultOf(self.store.load_many(names))
        newer = self_signed(names[-1], NOW, NOW + 80 * DAY)
        lock = self.successResultOf(self.store.acquire(names[-1], 60))
        assert lock is not None
        self.successResultOf(self.store.save(lock, StoredCertificate(newer)))
        self.clock.advance(COPY_INTERVAL)
        written = [n for n in names if self.successResultOf(self.local.load(n)) is not None]
        self.assertEqual(len(written), COPY_BATCH + 1)  # a batch, and the one saved
        self.clock.pump([COPY_INTERVAL] * 3)
        stored = self.successResultOf(self.local.load(names[-1]))
        assert stored is not None
        self.assertEqual(stored.cert.serial_hex, newer.serial_hex)
        self.assertTrue(all(self.successResultOf(self.local.load(n)) for n in names))

    def test_copy_is_written_once_per_serial(self) -> None:
        """An unchanged certificate is not written to the local copy again (what the copy
        holds is read from its meta.json)."""
        self.successResultOf(self.shared.seed(NAME, StoredCertificate(self.cert)))
        self.successResultOf(self.store.load(NAME))
        written: list[str] = []
        original = self.local.write_copy

        def counted(name: str, cert: StoredCertificate) -> None:
            written.append(name)
            original(name, cert)

        self.local.write_copy = counted  # type: ignore[method-assign]
        fresh = LocalCopyStore(self.shared, self.local, self.clock, self.state)
        self.successResultOf(fresh.load_many([NAME]))
        self.successResultOf(fresh.load(NAME))
        self.assertEqual(written, [])

    def test_domain_list_is_remembered_and_restored_after_a_wipe(self) -> None:
        """The list is kept locally; a store that lost it (and its certificates) gets it
        back, while a list emptied on purpose (certificates still there) stays empty."""
        self.successResultOf(self.shared.add_domain(NAME))
        self.assertEqual(self.successResultOf(self.store.list_domains()), [NAME])
        self.shared.domains.clear()
        self.shared.certs.clear()
        self.assertEqual(self.successResultOf(self.store.list_domains()), [NAME])
        self.assertEqual(self.shared.domains, {NAME})
        self._save_shared()
        self.successResultOf(self.shared.remove_domain(NAME))
        self.assertEqual(self.successResultOf(self.store.list_domains()), [])
        self.assertEqual(self.shared.domains, set())
