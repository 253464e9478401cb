"""StoreSync: a replica follows the shared store's change messages, resyncs after every
(re)subscription and after an outage, and catches a missed message with the safety check."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.store.doubles import FlakyShared
from trackingproxy.acme.sync import StoreSync
from trackingproxy.acme.testing import self_signed
from trackingproxy.store.contract import StoredCertificate, StoreUnavailable

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


class WatchedShared(FlakyShared):
    """FlakyShared with the event side: the test delivers messages and subscriptions."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.on_event: Callable[[str, str], None] | None = None
        self.on_subscribed: Callable[[], None] | None = None
        self.stopped = False

    def watch(self, on_event: Callable[[str, str], None], on_subscribed: Callable[[], None],
              call_in_reactor: Callable[..., None]) -> Any:
        self.on_event, self.on_subscribed = on_event, on_subscribed
        return self

    def stop(self) -> None:
        self.stopped = True

    def ping(self) -> Deferred[None]:
        if self.down:
            self.health.mark_down("connection refused")
            return fail(StoreUnavailable("connection refused"))
        self.health.mark_up()
        return succeed(None)


class FakeIssuer:
    def __init__(self, shared: WatchedShared, domains: tuple[str, ...]) -> None:
        self.shared = shared
        self.domains = domains
        self.served: dict[str, str] = {}
        self.reloads: list[str] = []
        self.loaded = True

    def served_serials(self) -> dict[str, str]:
        return dict(self.served)

    def reload(self, name: str) -> Deferred[None]:
        self.reloads.append(name)
        stored = self.shared.certs.get(name)
        if stored is not None:
            self.served[name] = stored.cert.serial_hex
        return succeed(None)


class StoreSyncTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.shared = WatchedShared(self.clock)
        self.issuer = FakeIssuer(self.shared, ("a.example.com", "b.example.com"))
        self.domain_lists: list[list[str]] = []
        self.sync = StoreSync(
            clock=self.clock, shared=self.shared, issuer=self.issuer,
            call_in_reactor=lambda f, *a: f(*a), on_domains=self.domain_lists.append,
            probe_interval=5, safety_interval=60,
        )
        self.sync.startService()
        self.addCleanup(self.sync.stopService)

    def _store_cert(self, name: str) -> str:
        cert = self_signed(name, NOW - DAY, NOW + 60 * DAY)
        self.shared.certs[name] = StoredCertificate(cert)
        return cert.serial_hex

    def test_cert_message_reloads_that_name(self) -> None:
        """A ``cert`` message reloads that name only; names not served are ignored."""
        assert self.shared.on_event is not None
        self.shared.on_event("cert", "a.example.com")
        self.shared.on_event("cert", "other.example.com")
        self.assertEqual(self.issuer.reloads, ["a.example.com"])

    def test_subscription_resyncs_what_differs(self) -> None:
        """Every (re)subscription reloads the domain list, then by one read of the serials
        only the names whose stored certificate is not the one served, or that the store
        lost (their reload seeds it): not every name."""
        self.issuer.domains = ("a.example.com", "b.example.com", "c.example.com",
                               "d.example.com")
        self.issuer.served["a.example.com"] = self._store_cert("a.example.com")  # same
        self.issuer.served["b.example.com"] = "1"
        self._store_cert("b.example.com")  # another one stored
        self.issuer.served["c.example.com"] = "2"  # the store lost it
        self._store_cert("d.example.com")  # stored, not served yet
        self.shared.domains = {"x.example.com"}
        assert self.shared.on_subscribed is not None
        self.shared.on_subscribed()
        self.assertEqual(sorted(self.issuer.reloads),
                         ["b.example.com", "c.example.com", "d.example.com"])
        self.assertEqual(self.domain_lists, [["x.example.com"]])
        self.assertEqual(self.shared.health.last_sync, self.clock.seconds())

    def test_subscription_during_the_start_up_load_leaves_unserved_names_to_it(self) -> None:
        """While the issuer still loads at start, a resync reloads no name it has not
        served yet (it is about to load them: 10,000 more loads would compete with it)."""
        self.issuer.loaded = False
        self._store_cert("a.example.com")
        self.issuer.served["b.example.com"] = "1"
        self._store_cert("b.example.com")
        assert self.shared.on_subscribed is not None
        self.shared.on_subscribed()
        self.assertEqual(self.issuer.reloads, ["b.example.com"])

    def test_domains_message_reads_the_list(self) -> None:
        """A ``domains`` message hands the store's new list to the callback."""
        self.shared.domains = {"x.example.com", "y.example.com"}
        assert self.shared.on_event is not None
        self.shared.on_event("domains", "")
        self.assertEqual(self.domain_lists, [["x.example.com", "y.example.com"]])

    def test_store_coming_back_resyncs(self) -> None:
        """After an outage seen by the probe, the first good probe resyncs: a name the
        store lost and one it holds another certificate for are reloaded."""
        self.issuer.served["a.example.com"] = "1"
        self.issuer.served["b.example.com"] = "2"
        self._store_cert("b.example.com")
        self.shared.down = True
        self.clock.advance(5)
        self.assertFalse(self.shared.health.up)
        self.assertEqual(self.issuer.reloads, [])
        self.shared.down = False
        self.clock.advance(5)
        self.assertTrue(self.shared.health.up)
        self.assertEqual(sorted(self.issuer.reloads), ["a.example.com", "b.example.com"])

    def test_safety_check_catches_a_missed_message(self) -> None:
        """Within the safety interval a changed serial is loaded even without a message."""
        serial = self._store_cert("b.example.com")
        self.clock.advance(55)
        self.assertEqual(self.issuer.reloads, [])
        self.clock.advance(10)
        self.assertEqual(self.issuer.reloads, ["b.example.com"])
        self.assertEqual(self.issuer.served["b.example.com"], serial)
        self.clock.advance(65)
        self.assertEqual(self.issuer.reloads, ["b.example.com"])  # nothing differs any more

    def test_stop_stops_watching_and_probing(self) -> None:
        """Stopping ends the subscription and the probe timer."""
        self.sync.stopService()
        self.assertTrue(self.shared.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
