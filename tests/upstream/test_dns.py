"""The caching resolver: TTLs, shared queries and stale answers, on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.upstream.dns import CachingResolver
from trackingproxy.upstream.errors import DNSLookupFailed


class ScriptedDNS(ResolverBase):
    """An IResolver whose answers the test gives, query by query."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[str, int, Deferred[Any]]] = []

    def _lookup(self, name: Any, cls: Any, type: Any, timeout: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        text = name.decode() if isinstance(name, bytes) else str(name)
        self.pending.append((text, type, d))
        return d

    def answer(self, a: list[str], aaaa: tuple[str, ...] | list[str] = (), ttl: int = 60) -> None:
        """Answer the oldest outstanding A and AAAA queries."""
        for rtype, addresses in ((dns.A, a), (dns.AAAA, aaaa)):
            name, _, d = self._take(rtype)
            records = [
                dns.RRHeader(name, rtype, dns.IN, ttl, (dns.Record_A if rtype == dns.A else dns.Record_AAAA)(x, ttl))
                for x in addresses
            ]
            d.callback((records, [], []))

    def fail(self, error: Exception) -> None:
        """Fail the oldest outstanding A and AAAA queries."""
        for rtype in (dns.A, dns.AAAA):
            self._take(rtype)[2].errback(error)

    def _take(self, rtype: int) -> tuple[str, int, Deferred[Any]]:
        for i, item in enumerate(self.pending):
            if item[1] == rtype:
                return self.pending.pop(i)
        raise AssertionError(f"no outstanding query of type {rtype}")


class CachingResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dns = ScriptedDNS()
        self.resolver = CachingResolver(self.dns, self.clock)

    def resolved(self, host: str = "spgo.io") -> list[str]:
        return self.successResultOf(self.resolver.resolve(host))

    def test_ip_literals_need_no_query(self) -> None:
        """An IPv4 or IPv6 literal resolves to itself without a query."""
        self.assertEqual(self.resolved("127.0.0.1"), ["127.0.0.1"])
        self.assertEqual(self.resolved("::1"), ["::1"])
        self.assertEqual(self.dns.pending, [])

    def test_a_and_aaaa_answers_are_combined(self) -> None:
        """A and AAAA are both queried; IPv4 addresses come first."""
        d = self.resolver.resolve("spgo.io")
        self.assertNoResult(d)
        self.assertEqual(sorted(t for _, t, _ in self.dns.pending), sorted([dns.A, dns.AAAA]))
        self.dns.answer(["192.0.2.1", "192.0.2.2"], ["2001:db8::1"])
        self.assertEqual(self.successResultOf(d), ["192.0.2.1", "192.0.2.2", "2001:db8::1"])

    def test_answer_is_cached_for_its_ttl(self) -> None:
        """Within the TTL no new query is made; after it, the name is queried again."""
        d = self.resolver.resolve("spgo.io")
        self.dns.answer(["192.0.2.1"], ttl=60)
        self.successResultOf(d)
        self.clock.advance(59)
        self.assertEqual(self.resolved(), ["192.0.2.1"])
        self.assertEqual(self.dns.pending, [])
        self.clock.advance(1)
        self.resolved()
        self.assertEqual(len(self.dns.pending), 2)

    def test_expired_answer_is_used_while_refreshing(self) -> None:
        """An expired answer is returned at once while one refresh runs; the new answer follows."""
        self.resolver.resolve("spgo.io")
        self.dns.answer(["192.0.2.1"], ttl=60)
        self.clock.advance(61)
        self.assertEqual(self.resolved(), ["192.0.2.1"])
        self.assertEqual(self.resolved(), ["192.0.2.1"])
        self.assertEqual(len(self.dns.pending), 2)  # one refresh (A + AAAA), not two
        self.dns.answer(["192.0.2.9"])
        self.assertEqual(self.resolved(), ["192.0.2.9"])

    def test_ttl_is_clamped(self) -> None:
        """TTLs below 5 s count as 5 s and above 300 s as 300 s."""
        self.resolver.resolve("spgo.io")
        self.dns.answer(["192.0.2.1"], ttl=0)
        self.clock.advance(4.9)
        self.resolved()
        self.assertEqual(self.dns.pending, [])
        self.clock.advance(0.1)
        self.resolved()
        self.dns.answer(["192.0.2.1"], ttl=86400)
        self.clock.advance(299.9)
        self.resolved()
        self.assertEqual(self.dns.pending, [])
        self.clock.advance(0.1)
        self.resolved()
        self.assertEqual(len(self.dns.pending), 2)

    def test_concurrent_lookups_share_one_query(self) -> None:
        """Many lookups of a name that is not cached yet wait for one query."""
        waiting = [self.resolver.resolve("spgo.io") for _ in range(5)]
        self.assertEqual(len(self.dns.pending), 2)
        self.dns.answer(["192.0.2.1"])
        for d in waiting:
            self.assertEqual(self.successResultOf(d), ["192.0.2.1"])

    def test_failure_with_nothing_cached(self) -> None:
        """A failed lookup with no earlier answer fails every waiter with DNSLookupFailed."""
        waiting = [self.resolver.resolve("nx.example") for _ in range(2)]
        self.dns.fail(DNSNameError("nx.example"))
        for d in waiting:
            error = self.failureResultOf(d, DNSLookupFailed).value
            self.assertEqual(error.cause, "dns")
            self.assertIn("nx.example", str(error))
            self.assertIn("no such domain", str(error))

    def test_no_address_records_is_a_failure(self) -> None:
        """An answer without A or AAAA records is a lookup failure."""
        d = self.resolver.resolve("spgo.io")
        self.dns.answer([], [])
        self.assertIn("no A or AAAA", str(self.failureResultOf(d, DNSLookupFailed).value))

    def test_one_family_failing_is_enough(self) -> None:
        """If the AAAA query fails but A answers, the A addresses are used."""
        d = self.resolver.resolve("spgo.io")
        name, _, a = self.dns._take(dns.A)
        self.dns._take(dns.AAAA)[2].errback(DNSServerError("servfail"))
        a.callback(([dns.RRHeader(name, dns.A, dns.IN, 60, dns.Record_A("192.0.2.1", 60))], [], []))
        self.assertEqual(self.successResultOf(d), ["192.0.2.1"])

    def test_stale_answer_survives_failed_refresh(self) -> None:
        """When a refresh fails, the old answer stays in use (logged once) and is retried later."""
        self.resolver.resolve("spgo.io")
        self.dns.answer(["192.0.2.1"], ttl=60)
        self.clock.advance(61)
        self.assertEqual(self.resolved(), ["192.0.2.1"])
        self.dns.fail(DNSServerError("servfail"))
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.assertEqual(self.resolved(), ["192.0.2.1"])
        self.assertEqual(self.dns.pending, [])  # no retry before the minimum TTL
        self.clock.advance(5)
        self.assertEqual(self.resolved(), ["192.0.2.1"])
        self.dns.fail(DNSServerError("servfail"))
        self.clock.advance(5)
        self.resolved()
        self.dns.answer(["192.0.2.7"])
        self.assertEqual(self.resolved(), ["192.0.2.7"])

    def test_stale_answer_is_logged_once_per_outage(self) -> None:
        """Repeated refresh failures log one warning, and recovery logs once."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.resolver.resolve("spgo.io")
        self.dns.answer(["192.0.2.1"], ttl=5)
        for _ in range(3):
            self.clock.advance(5)
            self.resolved()
            self.dns.fail(DNSServerError("servfail"))
        self.clock.advance(5)
        self.resolved()
        self.dns.answer(["192.0.2.1"])
        formats = [e.get("log_format", "") for e in events]
        self.assertEqual(sum("still using" in f for f in formats), 1)
        self.assertEqual(sum("answers again" in f for f in formats), 1)

    def test_cancelled_waiter_does_not_disturb_others(self) -> None:
        """Cancelling one waiter (request timed out) leaves the shared query to the others."""
        first = self.resolver.resolve("spgo.io")
        second = self.resolver.resolve("spgo.io")
        first.cancel()
        self.failureResultOf(first)
        self.dns.answer(["192.0.2.1"])
        self.assertEqual(self.successResultOf(second), ["192.0.2.1"])
