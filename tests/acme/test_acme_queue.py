"""The order queue on a Clock: pace, concurrency, the rateLimited pause of every domain,
queue order, positions and estimated starts, and the renewal point kept per certificate."""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.acme.issuer_doubles import DAY, AutoObtainer, PointRandom
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.obtainer import Obtainer, ObtainFailed
from trackingproxy.acme.queue import OrderQueue, Pacer, Wakeups
from trackingproxy.acme.testing import FakeObtainer, FixedRandom, LogCapture, self_signed
from trackingproxy.store.contract import AriWindow, StoredCertificate
from trackingproxy.store.memory import MemoryStore
from trackingproxy.tls.sni import SNIContextMap

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
LIMITED = "urn:ietf:params:acme:error:rateLimited"


def names(n: int) -> list[str]:
    return [f"d{i:02}.example.com" for i in range(n)]


class PacerTests(SynchronousTestCase):
    def test_burst_then_one_per_interval(self) -> None:
        """60 an hour with a burst of 3: three start at once, then one a minute."""
        pacer = Pacer(per_hour=60, burst=3)
        for _ in range(3):
            self.assertEqual(pacer.next_start(0.0), 0.0)
            pacer.take(0.0)
        self.assertEqual(pacer.next_start(0.0), 60.0)
        pacer.take(60.0)
        self.assertEqual(pacer.next_start(60.0), 120.0)

    def test_never_more_than_per_hour_in_any_hour(self) -> None:
        """A burst as large as the hourly budget spends it: the next start waits for the hour."""
        pacer = Pacer(per_hour=4, burst=4)
        for _ in range(4):
            pacer.take(0.0)
        self.assertEqual(pacer.next_start(0.0), 3600.0)
        self.assertEqual(pacer.in_last_hour(3599.0), 4)
        self.assertEqual(pacer.in_last_hour(3600.0), 0)

    def test_give_back(self) -> None:
        """A start that placed no order is forgotten: its slot is free again."""
        pacer = Pacer(per_hour=2, burst=1)
        pacer.take(10.0)
        self.assertEqual(pacer.next_start(10.0), 1810.0)
        pacer.give_back(10.0)
        self.assertEqual(pacer.next_start(10.0), 10.0)
        self.assertEqual(pacer.in_last_hour(10.0), 0)


class OrderQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.started: list[tuple[str, Deferred[bool]]] = []
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def start(self, name: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.started.append((name, d))
        return d

    def make(self, per_hour: int = 3600, concurrency: int = 1, burst: int = 10) -> OrderQueue:
        queue = OrderQueue(self.clock, self.start, per_hour=per_hour, concurrency=concurrency,
                           burst=burst)
        self.addCleanup(queue.halt)
        return queue

    def test_key_order_then_first_added(self) -> None:
        """Smaller keys start first; equal keys in the order they were added, even re-added."""
        queue = self.make()
        queue.add("c", (2.0,))
        queue.add("a", (1.0,))
        queue.add("b", (1.0,))
        queue.add("a", (1.0,))  # unchanged: keeps its place
        queue.begin()
        for _ in range(3):
            self.started[-1][1].callback(True)
        self.assertEqual([n for n, _ in self.started], ["a", "b", "c"])

    def test_concurrency(self) -> None:
        """No more than ``concurrency`` orders run; a finished one makes room for the next."""
        queue = self.make(concurrency=2)
        for name in "abcd":
            queue.add(name, (0.0,))
        queue.begin()
        self.assertEqual([n for n, _ in self.started], ["a", "b"])
        self.started[0][1].callback(True)
        self.assertEqual([n for n, _ in self.started], ["a", "b", "c"])
        self.assertEqual((queue.running, len(queue)), (2, 1))

    def test_pause_holds_every_start_and_is_logged_once(self) -> None:
        """While paused nothing starts; a later pause extends it without a second line."""
        queue = self.make()
        queue.begin()
        self.assertTrue(queue.pause(100.0, "too many new orders"))
        self.assertFalse(queue.pause(200.0, "too many new orders again"))
        queue.add("a", (0.0,))
        queue.pump()
        self.clock.advance(199)
        self.assertEqual(self.started, [])
        self.assertEqual(queue.summary().pause_reason, "too many new orders again")
        self.clock.advance(1)
        self.assertEqual([n for n, _ in self.started], ["a"])
        warnings = [line for line in self.logs.lines(LogLevel.warn) if "paused" in line]
        self.assertEqual(len(warnings), 1)
        self.assertIn("too many new orders", warnings[0])
        self.assertIsNone(queue.summary().paused_until)

    def test_start_that_placed_nothing_gives_its_slot_back(self) -> None:
        """A start answered False does not count against the pace."""
        queue = self.make(per_hour=1, burst=1)
        queue.add("a", (0.0,))
        queue.add("b", (1.0,))
        queue.begin()
        self.started[0][1].callback(False)
        self.assertEqual([n for n, _ in self.started], ["a", "b"])
        self.started[1][1].callback(True)
        self.assertEqual(queue.summary().orders_last_hour, 1)

    def test_synchronous_starts_do_not_recurse(self) -> None:
        """Thousands of starts that finish at once are handled in a loop, not a recursion."""
        queue = OrderQueue(self.clock, lambda name: _fired(False), per_hour=10, concurrency=4)
        for i in range(5000):
            queue.add(f"n{i}", (float(i),))
        queue.begin()
        self.assertEqual(len(queue), 0)
        queue.halt()

    def test_places_and_estimates(self) -> None:
        """Positions count from 1 and the estimated starts follow the pace and the pause."""
        queue = self.make(per_hour=36, concurrency=10, burst=1)
        for name in "abc":
            queue.add(name, (0.0,))
        places = queue.places()
        self.assertEqual({n: (p.position, p.eta.timestamp()) for n, p in places.items()},
                         {"a": (1, 0.0), "b": (2, 100.0), "c": (3, 200.0)})
        queue.begin()
        places = queue.places()
        self.assertEqual({n: (p.position, p.eta.timestamp()) for n, p in places.items()},
                         {"b": (1, 100.0), "c": (2, 200.0)})
        queue.pause(1000.0, "slow down")
        places = queue.places()
        self.assertEqual({n: (p.position, p.eta.timestamp()) for n, p in places.items()},
                         {"b": (1, 1000.0), "c": (2, 1100.0)})
        summary = queue.summary()
        self.assertEqual((summary.length, summary.running, summary.orders_last_hour), (2, 1, 1))
        assert summary.drained_at is not None and summary.paused_until is not None
        self.assertEqual(summary.drained_at.timestamp(), 1100.0)
        self.assertEqual(summary.paused_until.timestamp(), 1000.0)


def _fired(value: bool) -> Deferred[bool]:
    d: Deferred[bool] = Deferred()
    d.callback(value)
    return d


class WakeupsTests(SynchronousTestCase):
    def test_names_fire_at_their_time_in_batches(self) -> None:
        """Names fire at their planned time, together when due together; replanned or cancelled ones move or never fire."""
        clock = Clock()
        fired: list[tuple[float, list[str]]] = []
        wakeups = Wakeups(clock, lambda batch: fired.append((clock.seconds(), sorted(batch))))
        wakeups.start()
        wakeups.plan("a", 10.0)
        wakeups.plan("b", 10.0)
        wakeups.plan("c", 50.0)
        wakeups.plan("d", 30.0)
        wakeups.plan("c", 5.0)
        wakeups.plan("d", None)
        clock.advance(100)
        self.assertEqual(fired, [(100.0, ["a", "b", "c"])])  # one advance: all due at once
        wakeups.plan("e", 120.0)
        wakeups.plan("f", 110.0)
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(fired[1:], [(110.0, ["f"]), (120.0, ["e"])])
        wakeups.plan("g", 200.0)
        wakeups.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class IssuerQueueTests(SynchronousTestCase):
    """The issuing service with the memory store: what the queue does to orders."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        self.store = MemoryStore(self.clock)
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def make(self, domains: list[str], obtainer: Obtainer, served: list[str] | None = None,
             **options: object) -> IssuingService:
        options.setdefault("rng", FixedRandom(0.5))
        service = IssuingService(
            clock=self.clock, store=self.store, obtainer=obtainer,
            sni=SNIContextMap(served or domains),
            domains=domains, key_generator=lambda: ec.generate_private_key(ec.SECP256R1()),
            **options,  # type: ignore[arg-type]
        )
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def preload(self, name: str, age: datetime.timedelta, lifetime: datetime.timedelta = 90 * DAY
                ) -> None:
        cert = self_signed(name, self.now() - age, self.now() - age + lifetime)
        self.store.certs[name] = StoredCertificate(cert)

    def test_orders_start_at_the_pace(self) -> None:
        """30 missing domains at 60 an hour: 10 start at once (4 at a time), then exactly one a minute; nothing is left after stop."""
        obtainer = AutoObtainer(self.clock, delay=5)
        service = self.make(names(30), obtainer, max_orders_per_hour=60)
        service.startService()
        for _ in range(1300):
            self.clock.advance(1)
        offsets = [t - T0.timestamp() for t, _ in obtainer.starts]
        self.assertEqual(offsets, [0.0] * 4 + [5.0] * 4 + [10.0] * 2
                         + [60.0 * k for k in range(1, 21)])
        self.assertEqual(obtainer.most_running, 4)
        self.assertEqual(len(self.store.certs), 30)
        self.assertEqual(service.queue_summary().length, 0)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rate_limited_pauses_every_domain(self) -> None:
        """rateLimited with Retry-After holds every domain's order until then, logged once however often it comes."""
        obtainer = FakeObtainer()
        domains = names(5)
        service = self.make(domains, obtainer, max_concurrent_orders=2)
        service.startService()
        self.assertEqual(len(obtainer.calls), 2)
        obtainer.calls[0][1].errback(ObtainFailed(
            f"{domains[0]}: too many new orders", self.now() + HOUR, LIMITED))
        obtainer.calls[1][1].errback(ObtainFailed(
            f"{domains[1]}: too many new orders", self.now() + 2 * HOUR, LIMITED))
        summary = service.queue_summary()
        self.assertEqual(summary.paused_until, T0 + 2 * HOUR)
        self.assertIn("too many new orders", summary.pause_reason or "")
        self.assertEqual(service.renewal_states()[domains[2]].queue_eta, T0 + 2 * HOUR)
        self.clock.advance(2 * HOUR.total_seconds() - 1)
        self.assertEqual(len(obtainer.calls), 2)
        self.clock.advance(1)
        self.assertEqual(len(obtainer.calls), 4)
        paused = [line for line in self.logs.lines(LogLevel.warn) if "paused" in line]
        self.assertEqual(len(paused), 1, paused)
        self.assertIn(domains[0], paused[0])
        self.assertEqual(len(self.logs.lines(LogLevel.error)), 2)

    def test_rate_limited_without_retry_after_pauses_for_the_backoff(self) -> None:
        """rateLimited without Retry-After pauses every domain until the failed one's back-off (1 minute)."""
        obtainer = FakeObtainer()
        domains = names(2)
        service = self.make(domains, obtainer, max_concurrent_orders=1)
        service.startService()
        obtainer.calls[0][1].errback(ObtainFailed("slow down", None, "rateLimited"))
        self.assertEqual(service.queue_summary().paused_until, T0 + datetime.timedelta(minutes=1))
        self.clock.advance(59)
        self.assertEqual(len(obtainer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(obtainer.calls), 2)

    def test_other_failures_do_not_pause(self) -> None:
        """A failed validation backs off its own domain only; the others go on."""
        obtainer = FakeObtainer()
        domains = names(3)
        service = self.make(domains, obtainer, max_concurrent_orders=1)
        service.startService()
        obtainer.calls[0][1].errback(ObtainFailed("connection refused", None, "connection"))
        self.assertEqual(len(obtainer.calls), 2)
        self.assertIsNone(service.queue_summary().paused_until)

    def test_queue_order(self) -> None:
        """Renewals near expiry first, then domains without a certificate (oldest first), then renewals by renewal time."""
        late, early, urgent, old, new = ("late.example.com", "early.example.com",
                                         "urgent.example.com", "old.example.com",
                                         "new.example.com")
        self.preload(late, 65 * DAY)  # due 5 days ago
        self.preload(early, 70 * DAY)  # due 10 days ago
        self.preload(urgent, 86 * DAY)  # expires in 4 days
        obtainer = FakeObtainer()
        service = self.make([late, early, urgent, old], obtainer, max_concurrent_orders=1,
                            served=[late, early, urgent, old, new])
        service.startService()
        self.assertEqual(obtainer.calls[0][0].name, urgent)
        self.clock.advance(60)
        service.set_domains([late, early, urgent, old, new])
        self.clock.advance(0)
        places = {n: s.queue_position for n, s in service.renewal_states().items()}
        self.assertEqual(places, {urgent: None, old: 1, new: 2, early: 3, late: 4})
        for i in range(4):
            request, d = obtainer.calls[i]
            cert = self_signed(request.name, self.now(), self.now() + 90 * DAY, key=request.key)
            d.callback(cert.fullchain_pem())
        self.assertEqual([r.name for r, _ in obtainer.calls], [urgent, old, new, early, late])

    def test_positions_and_estimated_starts(self) -> None:
        """Waiting domains show their position and estimated start at the pace; the summary shows the queue as a whole."""
        obtainer = FakeObtainer()
        domains = names(5)
        service = self.make(domains, obtainer, max_orders_per_hour=36, order_burst=1)
        service.startService()
        states = service.renewal_states()
        self.assertTrue(states[domains[0]].ordering)
        self.assertIsNone(states[domains[0]].queue_position)
        self.assertEqual(
            [(states[d].queue_position, states[d].queue_eta) for d in domains[1:]],
            [(k, T0 + datetime.timedelta(seconds=100 * k)) for k in range(1, 5)],
        )
        summary = service.queue_summary()
        self.assertEqual(
            (summary.length, summary.running, summary.orders_last_hour,
             summary.max_orders_per_hour, summary.max_concurrent),
            (4, 1, 1, 36, 4),
        )
        self.assertEqual((summary.next_start, summary.drained_at),
                         (T0 + datetime.timedelta(seconds=100), T0 + datetime.timedelta(seconds=400)))
        self.clock.advance(100)
        states = service.renewal_states()
        self.assertTrue(states[domains[1]].ordering)
        self.assertEqual((states[domains[2]].queue_position, states[domains[2]].queue_eta),
                         (1, T0 + datetime.timedelta(seconds=200)))

    def test_busy_domain_does_not_spend_the_pace(self) -> None:
        """An order that finds the lock held elsewhere costs no pace: the next domain starts at once even at 1 an hour."""
        a, b = names(2)
        other = self.successResultOf(self.store.acquire(a, 1800))
        assert other is not None
        obtainer = FakeObtainer()
        service = self.make([a, b], obtainer, max_orders_per_hour=1, order_burst=1,
                            max_concurrent_orders=1)
        service.startService()
        self.assertEqual([r.name for r, _ in obtainer.calls], [b])
        self.assertEqual(service.renewal_states()[a].orders, {"busy": 1})
        self.assertEqual(service.queue_summary().orders_last_hour, 1)

    def test_renewal_point_kept_per_certificate(self) -> None:
        """The renewal point is drawn once per certificate: checks and ARI windows keep it, a new certificate draws again."""
        a = "a.example.com"
        self.preload(a, DAY)
        issued = self.now() - DAY
        obtainer = FakeObtainer()
        service = self.make([a], obtainer, rng=PointRandom([0.1, 0.9]))
        service.startService()
        expected = issued + 56.25 * DAY + 0.1 * 7.5 * DAY
        self.assertEqual(service.renewal_states()[a].next_attempt, expected)
        self.successResultOf(service.check())
        self.clock.advance(3600)
        self.assertEqual(service.renewal_states()[a].next_attempt, expected)
        obtainer.ari[a] = AriWindow(self.now() + 10 * DAY, self.now() + 20 * DAY)
        self.clock.advance(6 * 3600)
        self.assertEqual(service.renewal_states()[a].next_attempt,
                         obtainer.ari[a].start + DAY)  # 0.1 of the 10-day window
        obtainer.ari[a] = None
        renewed = self_signed(a, self.now(), self.now() + 90 * DAY)
        self.store.certs[a] = StoredCertificate(renewed)
        self.successResultOf(service.reload(a))
        self.assertEqual(service.renewal_states()[a].next_attempt,
                         self.now() + 56.25 * DAY + 0.9 * 7.5 * DAY)
