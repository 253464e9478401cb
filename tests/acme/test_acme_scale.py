"""10,000 domains on one issuing service (Clock, memory store, an obtainer answering after
20 s): orders are paced and never burst, the work per order does not grow with the number of
domains, and certificates issued together renew spread over their window."""

from __future__ import annotations

import bisect
import datetime
import random
import time
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.acme.issuer_doubles import DAY, AutoObtainer, RecordingSNI
from trackingproxy.acme.issuer import LOAD_BATCH, IssuingService
from trackingproxy.acme.schedule import lifetime_window
from trackingproxy.acme.testing import self_signed
from trackingproxy.store.contract import StoredCertificate
from trackingproxy.store.memory import MemoryStore

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
N = 10_000
DOMAINS = [f"d{i:05}.example.com" for i in range(N)]
PACE = 90  # the default --acme-max-orders-per-hour
WALL_LIMIT = 10.0  # seconds of real time per test; generous


class CountingStore(MemoryStore):
    """Counts certificate loads: the work the issuer does per domain."""

    loads = 0

    def load(self, name: str) -> Deferred[StoredCertificate | None]:
        self.loads += 1
        return super().load(name)

    def load_many(self, names: Sequence[str]) -> Deferred[dict[str, StoredCertificate]]:
        self.loads += len(names)
        return super().load_many(names)


def most_in_any_window(times: list[float], span: float) -> int:
    """The most of ``times`` (sorted) inside any half-open window [t, t + span)."""
    return max((bisect.bisect_left(times, t + span) - i for i, t in enumerate(times)), default=0)


class ScaleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.began = time.perf_counter()
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        self.store = CountingStore(self.clock)
        self.obtainer = AutoObtainer(self.clock, delay=20)
        self.sni = RecordingSNI()

    def tearDown(self) -> None:
        self.assertLess(time.perf_counter() - self.began, WALL_LIMIT)

    def make(self, **options: object) -> IssuingService:
        service = IssuingService(
            clock=self.clock, store=self.store, obtainer=self.obtainer, sni=self.sni,
            domains=DOMAINS, key_generator=lambda: ec.generate_private_key(ec.SECP256R1()),
            rng=random.Random(5), **options,  # type: ignore[arg-type]
        )
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def walk(self, seconds: float, step: float = 10.0) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def test_ten_thousand_new_domains_are_paced(self) -> None:
        """10,000 new domains: 90 orders an hour without bursts, constant work per order, and an ETA that matches the pace."""
        service = self.make(check_interval=3600.0)
        service.startService()
        self.walk(3 * 3600)
        starts = [t for t, _ in self.obtainer.starts]
        # 3 hours of clock: about 270 orders; in any span at most the 10-order allowance plus
        # one per 40 s, and never more than 90 in an hour; at most 4 at once.
        self.assertGreaterEqual(len(starts), 3 * PACE - 10)
        for span in (60, 600, 3600):  # the 10-order allowance, then one per 40 s, 90 an hour
            self.assertLessEqual(most_in_any_window(starts, span), min(PACE, 10 + span // 40))
        self.assertLessEqual(self.obtainer.most_running, 4)
        self.assertEqual(len(set(self.obtainer.started_names())), len(starts))
        self.assertEqual(len(self.sni.served), len(starts) - self.obtainer.running)
        # A full check every hour reads each domain once; orders add a few reads each.
        self.assertLess(self.store.loads, 5 * N + 10 * len(starts))

        summary = service.queue_summary()
        self.assertEqual(summary.length, N - len(starts))
        self.assertEqual(summary.orders_last_hour, PACE)
        assert summary.drained_at is not None
        drain = (summary.drained_at.timestamp() - self.clock.seconds()) / 3600
        self.assertLess(abs(drain - summary.length / PACE), 0.01 * summary.length / PACE)
        states = service.renewal_states()
        last = DOMAINS[-1]
        self.assertEqual(states[last].queue_position, summary.length)
        self.assertEqual(states[last].queue_eta, summary.drained_at)

    def test_start_up_load_lets_the_reactor_run_between_batches(self) -> None:
        """10,000 stored certificates load a batch per reactor turn (listeners answer in
        between), through load_many; one summary line, not 10,000 lines; and the first ARI
        checks are spread out, not 10,000 at once ahead of the orders."""
        cert = self_signed("*.example.com", T0 - DAY, T0 + 80 * DAY)
        for name in DOMAINS:
            self.store.certs[name] = StoredCertificate(cert)
        service = self.make(check_interval=86400.0)
        lines: list[str] = []

        def observer(event: dict[str, object]) -> None:
            if event.get("log_level") != LogLevel.debug:
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        service.startService()
        self.assertEqual(len(self.sni.served), LOAD_BATCH)
        self.assertFalse(service.loaded)
        self.clock.advance(0)
        self.assertTrue(service.loaded)
        self.assertEqual(len(self.sni.served), N)
        self.assertEqual(self.store.loads, N)
        self.assertEqual([line for line in lines if ": serving certificate" in line], [])
        self.assertEqual(
            [line for line in lines if line.startswith("Serving ")],
            ["Serving 10,000 stored certificates for 10,000 domains (loaded in 0.0 s); the "
             "others wait for an order"],
        )
        self.assertEqual(self.obtainer.renewal_info_calls, [])
        self.walk(600)  # in 10 minutes about 1,200 of the first ARI checks (2 a second)
        asked = len(self.obtainer.renewal_info_calls)
        self.assertTrue(900 < asked < 1500, asked)

    def test_certificates_issued_together_renew_spread_out(self) -> None:
        """10,000 certificates issued in the same second renew spread over their window, each at its own time, the queue staying short."""
        issued = T0 - 55 * DAY
        cert = self_signed("*.example.com", issued, issued + 90 * DAY)
        for name in DOMAINS:
            self.store.certs[name] = StoredCertificate(cert)
        start, end = lifetime_window(issued, issued + 90 * DAY)
        service = self.make(check_interval=86400.0)
        service.startService()
        self.clock.advance(0)  # the start-up load: a batch per reactor turn
        due_by_name = {n: s.next_attempt.timestamp()
                       for n, s in service.renewal_states().items() if s.next_attempt}
        due = sorted(due_by_name.values())
        self.assertEqual(len(due), N)
        self.assertTrue(start.timestamp() <= due[0] and due[-1] <= end.timestamp())
        self.assertLessEqual(most_in_any_window(due, 3600), N // 50)

        # Nothing before the window; over its first 12 hours each domain starts at (or just
        # after) its own renewal time and the queue stays short.
        self.clock.advance(start.timestamp() - self.clock.seconds() - 1)
        self.assertEqual(self.obtainer.starts, [])
        longest = 0
        for _ in range(12 * 6):
            self.walk(600)
            longest = max(longest, service.queue_summary().length)
        starts = [t for t, _ in self.obtainer.starts]
        expected = bisect.bisect_right(due, self.clock.seconds())
        self.assertGreater(len(starts), expected - 10)
        self.assertLessEqual(most_in_any_window(starts, 3600), PACE)
        self.assertLessEqual(longest, 15)
        self.assertTrue(all(t >= due_by_name[name] for t, name in self.obtainer.starts))
