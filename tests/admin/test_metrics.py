"""The admin metrics: request counting by label, bounded labels, connections, upstream timing
and errors, and the issuer's renewal state, with in-memory doubles only."""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from tests.admin.fakes import FakeRequest
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.obtainer import ObtainFailed
from trackingproxy.acme.testing import FakeObtainer, FixedRandom, self_signed
from trackingproxy.admin import build_admin
from trackingproxy.admin.metrics import ERROR_CAUSES, ProxyMetrics
from trackingproxy.store.memory import MemoryStore
from trackingproxy.tls.sni import SNIContextMap
from trackingproxy.upstream.errors import UpstreamTimeout, UpstreamTLSFailed

A, B = "a.example.com", "b.example.com"


class FakeUpstream:
    def __init__(self) -> None:
        self.calls: list[Deferred[object]] = []
        self.abandoned: list[object] = []

    def request(self, method, path, headers, body):
        d: Deferred[object] = Deferred()
        self.calls.append(d)
        return d

    def abandon(self, response):
        self.abandoned.append(response)


def requests_total(metrics: ProxyMetrics, **labels: str) -> float | None:
    return metrics.registry.get_sample_value("trackingproxy_requests_total", labels)


class RequestMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = ProxyMetrics(lambda: {A, B}, process_metrics=False)
        self.https = self.metrics.site("https")

    def test_counts_by_domain_kind_status_protocol_scheme(self) -> None:
        """An open, a click and another path are counted under their own labels."""
        self.https.request_done(FakeRequest(b"/q/abc", 200, A))
        self.https.request_done(FakeRequest(b"/q/def?x=1", 200, A))
        self.https.request_done(FakeRequest(b"/f/tok", 302, A, b"HTTP/2"))
        self.metrics.site("http").request_done(FakeRequest(b"/robots.txt", 404, B))
        self.assertEqual(
            requests_total(
                self.metrics, domain=A, kind="open", status="2xx", protocol="h1", scheme="https"
            ),
            2.0,
        )
        self.assertEqual(
            requests_total(
                self.metrics, domain=A, kind="click", status="3xx", protocol="h2", scheme="https"
            ),
            1.0,
        )
        self.assertEqual(
            requests_total(
                self.metrics, domain=B, kind="other", status="4xx", protocol="h1", scheme="http"
            ),
            1.0,
        )
        self.assertEqual(self.metrics.totals_by_kind(), {"open": 2, "click": 1, "other": 1})
        self.assertEqual(
            self.metrics.totals_by_domain(),
            {A: {"open": 2, "click": 1, "other": 0}, B: {"open": 0, "click": 0, "other": 1}},
        )

    def test_unknown_hosts_share_one_label(self) -> None:
        """Unknown hosts and 421s share domain="other": one label set for 1000 hosts."""
        for i in range(1000):
            self.https.request_done(FakeRequest(b"/f/x", 421, f"h{i}.example.net"))
            self.https.request_done(FakeRequest(b"/f/x", 421, "-", b"HTTP/%d.%d" % (i, i)))
        self.assertEqual(
            requests_total(
                self.metrics,
                domain="other",
                kind="click",
                status="4xx",
                protocol="h1",
                scheme="https",
            ),
            2000.0,
        )
        labels = {
            s.labels["domain"]
            for m in self.metrics.registry.collect()
            if m.name == "trackingproxy_requests"
            for s in m.samples
        }
        self.assertEqual(labels, {"other"})
        # cached per distinct host, never per protocol string
        self.assertEqual(len(self.https.slots()), 1001)

    def test_slots_are_resolved_once(self) -> None:
        """Repeated requests reuse the cached slot: no domain read, no label lookup."""
        reads: list[int] = []

        def domains() -> set[str]:
            reads.append(1)
            return {A, B}

        metrics = ProxyMetrics(domains, process_metrics=False)
        https = metrics.site("https")
        https.request_done(FakeRequest(b"/q/1", 200, A))
        reads.clear()
        for _ in range(10):
            https.request_done(FakeRequest(b"/q/2", 200, A))
        self.assertEqual(reads, [])
        self.assertEqual(metrics.totals_by_kind()["open"], 11)

    def test_no_created_series_per_domain(self) -> None:
        """Request counters export no ``_created`` sample (it would double the series)."""
        self.https.request_done(FakeRequest(b"/q/1", 200, A))
        names = {s.name for m in self.metrics.registry.collect() for s in m.samples}
        self.assertIn("trackingproxy_requests_total", names)
        self.assertNotIn("trackingproxy_requests_created", names)

    def test_odd_status_codes_are_bounded(self) -> None:
        """Status codes outside 1xx-5xx are counted as status="other"."""
        self.https.request_done(FakeRequest(b"/q/1", 999, A))
        self.assertEqual(
            requests_total(
                self.metrics, domain=A, kind="open", status="other", protocol="h1", scheme="https"
            ),
            1.0,
        )

    def test_open_connections(self) -> None:
        """Connections opened and closed move the per-scheme gauge."""
        for _ in range(3):
            self.https.connection_opened()
        self.https.connection_closed()
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "trackingproxy_open_connections", {"scheme": "https"}
            ),
            2.0,
        )
        self.assertEqual(self.metrics.open_connections(), {"https": 2})


class UpstreamMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = ProxyMetrics(lambda: {A}, process_metrics=False)
        self.fake = FakeUpstream()
        self.upstream = self.metrics.instrument(self.fake, self.clock)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_every_cause_is_exported_at_zero(self) -> None:
        """Error counters exist from the start, so rate() alerts work before the first error."""
        for cause in ERROR_CAUSES:
            self.assertEqual(self.sample("trackingproxy_upstream_errors_total", cause=cause), 0.0)

    def test_latency_is_observed_at_response_headers(self) -> None:
        """The time from request to response is observed; the response is passed on."""
        d = self.upstream.request(b"GET", b"/q/x", Headers(), None)
        self.clock.advance(0.3)
        response = object()
        self.fake.calls[0].callback(response)
        self.assertIs(self.successResultOf(d), response)
        self.assertEqual(self.sample("trackingproxy_upstream_requests_total"), 1.0)
        self.assertEqual(self.sample("trackingproxy_upstream_response_seconds_count"), 1.0)
        self.assertAlmostEqual(self.sample("trackingproxy_upstream_response_seconds_sum"), 0.3)
        self.assertEqual(
            self.sample("trackingproxy_upstream_response_seconds_bucket", le="0.25"), 0.0
        )
        self.assertEqual(
            self.sample("trackingproxy_upstream_response_seconds_bucket", le="0.5"), 1.0
        )

    def test_errors_are_counted_by_cause_and_passed_on(self) -> None:
        """UpstreamError causes become labels; other exceptions count as internal."""
        results: list[Failure] = []
        for error in (UpstreamTimeout("slow"), UpstreamTLSFailed("bad cert"), KeyError("x")):
            d = self.upstream.request(b"GET", b"/f/x", Headers(), None)
            d.addErrback(lambda f: results.append(f))
            self.fake.calls[-1].errback(Failure(error))
        self.assertEqual(
            [type(f.value) for f in results], [UpstreamTimeout, UpstreamTLSFailed, KeyError]
        )
        self.assertEqual(self.sample("trackingproxy_upstream_errors_total", cause="timeout"), 1.0)
        self.assertEqual(self.sample("trackingproxy_upstream_errors_total", cause="tls"), 1.0)
        self.assertEqual(self.sample("trackingproxy_upstream_errors_total", cause="internal"), 1.0)
        self.assertEqual(self.sample("trackingproxy_upstream_response_seconds_count"), 0.0)
        self.assertEqual(self.metrics.error_counts["timeout"], 1)

    def test_abandon_is_passed_through(self) -> None:
        """abandon() reaches the wrapped client unchanged."""
        response = object()
        self.upstream.abandon(response)
        self.assertEqual(self.fake.abandoned, [response])


class RenewalStateTests(SynchronousTestCase):
    """IssuingService.renewal_states: what the admin endpoints report about ACME."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC).timestamp())
        self.obtainer = FakeObtainer()
        self.issuer = IssuingService(
            clock=self.clock,
            store=MemoryStore(self.clock),
            obtainer=self.obtainer,
            sni=SNIContextMap([A]),
            domains=[A],
            key_generator=lambda: ec.generate_private_key(ec.SECP256R1()),
            rng=FixedRandom(0.5),
        )
        self.addCleanup(lambda: self.issuer.running and self.issuer.stopService())

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def test_failure_then_success(self) -> None:
        """A failure records the error, a rate limit counts apart, a success clears it."""
        self.issuer.startService()
        state = self.issuer.renewal_states()[A]
        self.assertTrue(state.ordering)
        self.assertEqual((state.failures, state.last_error, state.orders), (0, None, {}))

        request, d = self.obtainer.calls[-1]
        d.errback(ObtainFailed(f"{A}: validation failed: connection refused"))
        state = self.issuer.renewal_states()[A]
        self.assertFalse(state.ordering)
        self.assertEqual(state.failures, 1)
        self.assertEqual(state.last_error, f"{A}: validation failed: connection refused")
        self.assertEqual(state.last_error_at, self.now())
        self.assertEqual(state.orders, {"failed": 1})
        self.assertIsNotNone(state.next_attempt)
        assert state.next_attempt is not None
        self.assertGreater(state.next_attempt, self.now())

        self.clock.advance((state.next_attempt - self.now()).total_seconds() + 1)
        request, d = self.obtainer.calls[-1]
        d.errback(ObtainFailed("too many", problem_type="urn:ietf:params:acme:error:rateLimited"))
        state = self.issuer.renewal_states()[A]
        self.assertEqual(state.orders, {"failed": 1, "rate_limited": 1})
        self.assertEqual(state.failures, 2)
        assert state.next_attempt is not None

        self.clock.advance((state.next_attempt - self.now()).total_seconds() + 1)
        request, d = self.obtainer.calls[-1]
        cert = self_signed(A, self.now(), self.now() + datetime.timedelta(days=90), key=request.key)
        d.callback(cert.fullchain_pem())
        state = self.issuer.renewal_states()[A]
        self.assertEqual((state.failures, state.last_error, state.last_error_at), (0, None, None))
        self.assertEqual(state.orders, {"failed": 1, "rate_limited": 1, "issued": 1})
        assert state.next_attempt is not None
        # one third of the lifetime remains at renewal
        self.assertEqual(
            state.next_attempt.date(), (self.now() + datetime.timedelta(days=60)).date()
        )


def request_labels(metrics: ProxyMetrics) -> list[dict[str, str]]:
    return [
        s.labels
        for m in metrics.registry.collect()
        if m.name == "trackingproxy_requests"
        for s in m.samples
    ]


class PerDomainTests(SynchronousTestCase):
    """--metrics-per-domain: request counters with or without the domain label."""

    def setUp(self) -> None:
        self.domains = {A, B}
        self.metrics = ProxyMetrics(lambda: self.domains, per_domain="off", process_metrics=False)
        self.https = self.metrics.site("https")

    def test_off_counts_without_the_domain(self) -> None:
        """Off: series without the domain label; unknown hosts still apart for the page."""
        self.https.request_done(FakeRequest(b"/q/1", 200, A))
        self.https.request_done(FakeRequest(b"/q/1", 200, B))
        self.https.request_done(FakeRequest(b"/f/1", 421, "-"))
        self.assertEqual(
            requests_total(self.metrics, kind="open", status="2xx", protocol="h1", scheme="https"),
            2.0,
        )
        self.assertEqual(
            sorted(tuple(sorted(labels)) for labels in request_labels(self.metrics)),
            [("kind", "protocol", "scheme", "status")] * 2,
        )
        self.assertEqual(self.metrics.totals_by_kind(), {"open": 2, "click": 1, "other": 0})
        self.assertEqual(self.metrics.totals_by_domain()["other"]["click"], 1)
        self.assertNotIn(A, self.metrics.totals_by_domain())

    def test_off_keeps_a_few_slots_for_many_domains(self) -> None:
        """Off: 10,000 domains answered both ways keep a handful of slots, not 10,000s."""
        self.domains = {f"d{i}.example.com" for i in range(10_000)}
        for name in self.domains:
            self.https.request_done(FakeRequest(b"/q/x", 200, name))
            self.https.request_done(FakeRequest(b"/f/x", 302, name, b"HTTP/2"))
        self.assertEqual(len(self.https.slots()), 2)
        self.assertEqual(len(request_labels(self.metrics)), 2)
        self.assertEqual(self.metrics.totals_by_kind(), {"open": 10_000, "click": 10_000,
                                                         "other": 0})

    def test_auto_is_on_below_100_domains(self) -> None:
        """Auto: the domain label while fewer than 100 domains are configured."""
        for count, per_domain in ((99, True), (100, False)):
            names = {f"d{i}.example.com" for i in range(count)}
            metrics = ProxyMetrics(lambda n=names: n, process_metrics=False)  # type: ignore[misc]
            metrics.site("http").request_done(FakeRequest(b"/q/x", 200, "d1.example.com"))
            self.assertEqual(metrics.per_domain, per_domain)
            self.assertEqual("domain" in request_labels(metrics)[0], per_domain)

    def test_auto_follows_a_reload(self) -> None:
        """Auto switches when a reload crosses 100 domains, both ways; totals never drop."""
        metrics = ProxyMetrics(lambda: self.domains, process_metrics=False)
        site = metrics.site("https")
        site.request_done(FakeRequest(b"/q/1", 200, A))
        self.assertEqual(request_labels(metrics)[0]["domain"], A)

        self.domains = {A, B} | {f"d{i}.example.com" for i in range(200)}
        site.request_done(FakeRequest(b"/q/1", 200, A))  # a known slot: counted as before
        self.assertEqual(request_labels(metrics), [])  # the scrape switched: series start anew
        self.assertFalse(metrics.per_domain)
        site.request_done(FakeRequest(b"/q/1", 200, B))
        self.assertEqual(
            requests_total(metrics, kind="open", status="2xx", protocol="h1", scheme="https"),
            1.0,
        )
        self.assertEqual(metrics.totals_by_kind()["open"], 3)

        self.domains = {A, B}
        site.request_done(FakeRequest(b"/f/1", 302, B))  # a new combination: re-evaluated
        self.assertTrue(metrics.per_domain)
        self.assertEqual(request_labels(metrics)[0]["domain"], B)
        self.assertEqual(metrics.totals_by_kind(), {"open": 3, "click": 1, "other": 0})

    def test_on_keeps_the_domain_for_many_domains(self) -> None:
        """On: the domain label whatever the number of domains."""
        names = {f"d{i}.example.com" for i in range(500)}
        metrics = ProxyMetrics(lambda: names, per_domain="on", process_metrics=False)
        metrics.site("http").request_done(FakeRequest(b"/q/x", 200, "d7.example.com"))
        self.assertEqual(request_labels(metrics)[0]["domain"], "d7.example.com")

    def test_unknown_mode(self) -> None:
        """A mode other than auto, on and off is a programming error."""
        self.assertRaises(ValueError, ProxyMetrics, lambda: self.domains, per_domain="yes")

    def test_build_admin_passes_the_option(self) -> None:
        """build_admin hands --metrics-per-domain to the metrics."""
        admin = build_admin("tcp:0", Clock(), lambda: self.domains, "off")
        assert admin is not None
        self.assertEqual(admin.metrics.per_domain_mode, "off")
        self.assertFalse(admin.metrics.per_domain)
