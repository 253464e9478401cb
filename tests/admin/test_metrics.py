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
        """Hosts that are not configured domains (and 421s, which carry none) are domain="other";
        a thousand of them create one label set and one cached slot."""
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

    def test_label_children_are_resolved_once(self) -> None:
        """Repeated requests of one kind reuse the cached child (no label lookup per request)."""
        self.https.request_done(FakeRequest(b"/q/1", 200, A))
        calls: list[tuple[str, ...]] = []
        labels = self.metrics.requests.labels

        def spy(*a: str) -> object:
            calls.append(a)
            return labels(*a)

        self.metrics.requests.labels = spy  # type: ignore[assignment]
        for _ in range(10):
            self.https.request_done(FakeRequest(b"/q/2", 200, A))
        self.assertEqual(calls, [])
        self.assertEqual(self.metrics.totals_by_kind()["open"], 11)

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
        """A failed order records the error, a rate limit counts apart, a success clears the
        error and schedules the renewal."""
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
