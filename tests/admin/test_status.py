"""Readiness, the JSON snapshot, request rates, the scrape-time certificate metrics, the HTTP
resources and the HTML page, over in-memory doubles (no sockets)."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from attrs import define, field
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.admin.fakes import FakeRequest
from trackingproxy.acme.issuer import RenewalState
from trackingproxy.acme.testing import self_signed
from trackingproxy.admin.collector import StatusCollector
from trackingproxy.admin.metrics import ProxyMetrics
from trackingproxy.admin.page import render_page
from trackingproxy.admin.resources import admin_resource
from trackingproxy.admin.status import RateTracker, StatusSource
from trackingproxy.tls.certificates import LoadedCertificate

A, B, C = "a.example.com", "b.example.com", "c.example.com"
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
SEC = datetime.timedelta(seconds=1)


@define
class FakeCertificates:
    domains: tuple[str, ...]
    certs: dict[str, LoadedCertificate] = field(factory=dict)

    def certificate_for(self, name: str) -> LoadedCertificate | None:
        return self.certs.get(name)


@define
class FakeRenewals:
    states: dict[str, RenewalState] = field(factory=dict)

    def renewal_states(self) -> dict[str, RenewalState]:
        return self.states


@define
class FakePort:
    port: int

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)


@define
class FakeListener:
    option: str
    description: str
    port: Any = None  # a FakePort, or None: not listening




def state(
    next_attempt: datetime.datetime | None = None,
    failures: int = 0,
    error: str | None = None,
    error_at: datetime.datetime | None = None,
    **orders: int,
) -> RenewalState:
    return RenewalState(
        next_attempt=next_attempt,
        ordering=False,
        failures=failures,
        last_error=error,
        last_error_at=error_at,
        orders=orders,
    )


class StatusTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        self.certs = FakeCertificates((A, B))
        self.renewals = FakeRenewals()
        self.listeners = [
            FakeListener("--http-port", "tcp:80", FakePort(80)),
            FakeListener("--https-port", "tcp:443", FakePort(443)),
        ]
        self.metrics = ProxyMetrics(lambda: {A, B}, process_metrics=False)
        self.rates = RateTracker(self.clock, self.metrics.totals_by_kind)
        self.https = True
        self.in_flight = 0

    def source(self) -> StatusSource:
        source = StatusSource(
            clock=self.clock,
            certificates=self.certs,
            https_enabled=self.https,
            listeners=lambda: self.listeners,
            renewals=lambda: self.renewals,
            metrics=self.metrics,
            rates=self.rates,
            in_flight=lambda: self.in_flight,
            started=T0.timestamp() - 3600,
        )
        return source

    def serve(self, name: str, days_old: float = 10, lifetime: float = 90) -> LoadedCertificate:
        start = T0 - datetime.timedelta(days=days_old)
        cert = self_signed(name, start, start + datetime.timedelta(days=lifetime))
        self.certs.certs[name] = cert
        return cert


class ReadinessTests(StatusTestCase):
    def test_ready_when_listening_with_valid_certificates(self) -> None:
        """Every listener up and every domain with an unexpired certificate: ready."""
        self.serve(A)
        self.serve(B)
        self.assertEqual(self.source().ready(), (True, []))

    def test_missing_and_expired_certificates(self) -> None:
        """A domain without a certificate, or with an expired one, is a reason each."""
        cert = self.serve(A, days_old=89)
        source = self.source()
        self.assertEqual(source.ready(), (False, [f"{B}: no certificate yet"]))
        self.clock.advance(2 * 86400)
        ready, reasons = source.ready()
        self.assertFalse(ready)
        self.assertEqual(
            reasons[0],
            f"{A}: the certificate expired at {cert.not_after.isoformat(timespec='seconds')}",
        )

    def test_listener_not_listening(self) -> None:
        """A listener without a port (not yet bound, or stopped on SIGTERM) is not ready."""
        self.serve(A)
        self.serve(B)
        self.listeners[1].port = None
        self.assertEqual(self.source().ready(), (False, ["--https-port tcp:443 is not listening"]))

    def test_https_disabled_needs_no_certificates(self) -> None:
        """With --https-port none only the listeners count."""
        self.https = False
        self.listeners.pop()
        self.assertEqual(self.source().ready(), (True, []))


class SnapshotTests(StatusTestCase):
    def test_snapshot_is_json_with_the_facts(self) -> None:
        """Certificates, renewal state, requests, upstream and listeners are all there."""
        cert = self.serve(A)
        self.renewals.states[A] = state(
            T0 + 50 * DAY, 2, "a.example.com: validation failed", T0 - DAY, failed=2, issued=1
        )
        site = self.metrics.site("https")
        site.request_done(FakeRequest(b"/q/1", 200, A))
        site.request_done(FakeRequest(b"/f/1", 302, "nowhere.example"))
        site.connection_opened()
        self.in_flight = 3
        snap = json.loads(json.dumps(self.source().snapshot()))
        self.assertEqual(snap["time"], T0.timestamp())
        self.assertEqual(snap["uptime_seconds"], 3600)
        self.assertFalse(snap["ready"])
        self.assertEqual(snap["not_ready_reasons"], [f"{B}: no certificate yet"])
        a, b = snap["domains"]
        self.assertEqual(a["name"], A)
        self.assertEqual(a["certificate"]["issuer"], cert.issuer)
        self.assertEqual(a["certificate"]["not_after"], cert.not_after.isoformat())
        self.assertEqual(a["certificate"]["expires_in_seconds"], 80 * 86400)
        self.assertEqual(a["renewal"]["next_attempt_in_seconds"], 50 * 86400)
        self.assertEqual(a["renewal"]["consecutive_failures"], 2)
        self.assertEqual(a["renewal"]["last_error"], "a.example.com: validation failed")
        self.assertEqual(a["renewal"]["orders"], {"failed": 2, "issued": 1})
        self.assertEqual(a["requests"], {"open": 1, "click": 0, "other": 0})
        self.assertEqual((b["certificate"], b["renewal"]), (None, None))
        self.assertEqual(snap["requests"]["total"], {"open": 1, "click": 1, "other": 0})
        self.assertEqual(snap["requests"]["unknown_hosts"], {"open": 0, "click": 1, "other": 0})
        self.assertEqual(snap["requests"]["in_flight"], 3)
        self.assertEqual(snap["connections"], {"https": 1})
        self.assertEqual(snap["upstream"]["errors"]["timeout"], 0)
        self.assertEqual(
            [(li["option"], li["address"]) for li in snap["listeners"]],
            [("--http-port", "127.0.0.1:80"), ("--https-port", "127.0.0.1:443")],
        )


class RateTests(StatusTestCase):
    def test_rates_over_the_last_minute_and_five(self) -> None:
        """Per-second rates come from the totals sampled on the clock."""
        site = self.metrics.site("http")
        self.rates.start()
        self.addCleanup(self.rates.stop)
        for _ in range(30):  # 5 minutes: 1 open per 10 s
            site.request_done(FakeRequest(b"/q/x"))
            self.clock.advance(10)
        for _ in range(60):  # then a burst of 60 clicks within the last minute
            site.request_done(FakeRequest(b"/f/x", 302))
        self.assertEqual(self.rates.rates(60), {"open": 0.1, "click": 1.0, "other": 0.0})
        self.assertEqual(self.rates.rates(300), {"open": 0.1, "click": 0.2, "other": 0.0})

    def test_no_samples_yet(self) -> None:
        """Before the first sample every rate is 0."""
        self.assertEqual(self.rates.rates(60), {"open": 0.0, "click": 0.0, "other": 0.0})


class CollectorTests(StatusTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.metrics.registry.register(StatusCollector(self.source()))

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_certificate_and_renewal_metrics(self) -> None:
        """Validity as epoch seconds, seconds to the next attempt, orders by outcome, the last
        error as a label (one line, truncated), readiness."""
        cert = self.serve(A)
        self.renewals.states[A] = state(
            T0 + 3600 * SEC,
            1,
            "a.example.com: DNS\n  problem " + "x" * 300,
            T0 - 60 * SEC,
            failed=1,
        )
        self.renewals.states[B] = state(None)
        self.assertEqual(
            self.sample("trackingproxy_certificate_not_after_timestamp_seconds", domain=A),
            cert.not_after.timestamp(),
        )
        self.assertEqual(
            self.sample("trackingproxy_certificate_not_before_timestamp_seconds", domain=A),
            cert.not_before.timestamp(),
        )
        self.assertEqual(self.sample("trackingproxy_certificate_present", domain=B), 0.0)
        self.assertIsNone(
            self.sample("trackingproxy_certificate_not_after_timestamp_seconds", domain=B)
        )
        self.assertEqual(
            self.sample(
                "trackingproxy_certificate_info",
                domain=A,
                issuer=cert.issuer,
                serial=cert.serial_hex,
                source=cert.source,
            ),
            1.0,
        )
        self.assertEqual(self.sample("trackingproxy_acme_next_attempt_seconds", domain=A), 3600)
        self.assertEqual(self.sample("trackingproxy_acme_next_attempt_seconds", domain=B), 0)
        self.assertEqual(self.sample("trackingproxy_acme_consecutive_failures", domain=A), 1)
        self.assertEqual(
            self.sample("trackingproxy_acme_orders_total", domain=A, outcome="failed"), 1
        )
        self.assertEqual(
            self.sample("trackingproxy_acme_orders_total", domain=A, outcome="issued"), 0
        )
        error = "a.example.com: DNS problem " + "x" * 173
        self.assertEqual(
            self.sample("trackingproxy_acme_last_error_timestamp_seconds", domain=A, error=error),
            T0.timestamp() - 60,
        )
        self.assertEqual(self.sample("trackingproxy_ready"), 0.0)
        self.assertEqual(self.sample("trackingproxy_requests_in_flight"), 0.0)

    def test_no_error_series_once_renewed(self) -> None:
        """The last-error gauge disappears when the domain's state has no error."""
        self.serve(A)
        self.renewals.states[A] = state(T0 + DAY)
        names = {s.name for m in self.metrics.registry.collect() for s in m.samples}
        self.assertNotIn("trackingproxy_acme_last_error_timestamp_seconds", names)


class ResourceTests(StatusTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.serve(A)
        source = self.source()
        self.metrics.registry.register(StatusCollector(source))
        self.client = StubTreq(admin_resource(source, self.metrics.registry))

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, list[bytes]], bytes]:
        response = self.successResultOf(self.client.request(method, "http://admin.invalid" + path))
        body = self.successResultOf(response.content())
        headers = {k.decode().lower(): v for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body

    def test_healthz(self) -> None:
        """/healthz answers 200 ok, uncached."""
        code, headers, body = self.get("/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertEqual(headers["cache-control"], [b"no-store"])

    def test_readyz(self) -> None:
        """/readyz: 503 with the reason per line, then 200 once the certificate is there."""
        code, _, body = self.get("/readyz")
        self.assertEqual((code, body), (503, f"not ready:\n{B}: no certificate yet\n".encode()))
        self.serve(B)
        self.assertEqual(self.get("/readyz")[::2], (200, b"ready\n"))

    def test_metrics(self) -> None:
        """/metrics is the Prometheus text format of our registry."""
        self.metrics.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        code, headers, body = self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers["content-type"][0].startswith(b"text/plain; version="))
        self.assertIn(
            b'trackingproxy_requests_total{domain="a.example.com",kind="open",protocol="h1",'
            b'scheme="https",status="2xx"} 1.0',
            body,
        )
        self.assertIn(b'trackingproxy_certificate_present{domain="b.example.com"} 0.0', body)
        self.assertNotIn(b"python_gc", body)  # not the global registry

    def test_status_json(self) -> None:
        """/status is the snapshot as JSON."""
        code, headers, body = self.get("/status")
        self.assertEqual((code, headers["content-type"]), (200, [b"application/json"]))
        self.assertEqual([d["name"] for d in json.loads(body)["domains"]], [A, B])

    def test_page_is_self_contained(self) -> None:
        """/ is HTML that loads nothing (no src/href attributes, a CSP forbidding it)."""
        code, headers, body = self.get("/")
        self.assertEqual(headers["content-type"], [b"text/html; charset=utf-8"])
        self.assertIn(b"default-src 'none'", headers["content-security-policy"][0])
        self.assertIn(A.encode(), body)
        self.assertIsNone(re.search(rb"\b(src|href)\s*=", body))
        self.assertNotIn(b"<script", body)

    def test_other_methods_and_paths(self) -> None:
        """POST is 405, an unknown path 404, HEAD has no body."""
        code, headers, _ = self.get("/status", "POST")
        self.assertEqual((code, headers["allow"]), (405, [b"GET, HEAD"]))
        self.assertEqual(self.get("/nope")[0], 404)
        self.assertEqual(self.get("/healthz/x")[0], 200)  # leaves ignore the rest of the path
        code, headers, body = self.get("/healthz", "HEAD")
        self.assertEqual((code, body), (200, b""))


class PageTests(StatusTestCase):
    def test_timeline_marks_now_and_renewal(self) -> None:
        """The bar runs from not-before to not-after; now and the planned renewal are placed
        at their share of the lifetime."""
        self.serve(A, days_old=30, lifetime=90)  # now at 1/3
        self.renewals.states[A] = state(T0 + 30 * DAY)  # renewal at 2/3
        page = render_page(self.source().snapshot()).decode()
        self.assertIn('class="mark now" style="left:33.33%"', page)
        self.assertIn("valid from 2029-12-02 00:00 UTC to 2030-03-02 00:00 UTC", page)
        self.assertIn('class="mark renew" style="left:66.67%"', page)
        self.assertIn("renewal 2030-01-31 00:00 UTC", page)
        self.assertIn("expires in 60.0 days", page)

    def test_error_is_escaped(self) -> None:
        """The last renewal error is shown, HTML-escaped."""
        self.serve(A)
        self.renewals.states[A] = state(T0 + DAY, 1, "<script>alert(1)</script>", T0)
        page = render_page(self.source().snapshot()).decode()
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertNotIn("<script>", page)
        self.assertIn("1 failure(s) in a row", page)

    def test_not_ready_reasons_are_listed(self) -> None:
        """A page for a not-ready process says why."""
        page = render_page(self.source().snapshot()).decode()
        self.assertIn("not ready", page)
        self.assertIn(f"<li>{A}: no certificate yet</li>", page)
