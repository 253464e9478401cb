"""Readiness, the JSON snapshot, request rates, the scrape-time certificate metrics, the HTTP
resources and the HTML page, over in-memory doubles (no sockets)."""

from __future__ import annotations

import datetime
import gzip
import json
import re
from typing import Any

import attrs
import treq
from attrs import define, field
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from tests.admin.fakes import FakeRequest, unbalanced_tags
from trackingproxy.acme.issuer import RenewalState
from trackingproxy.acme.queue import QueueSummary
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
MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)


@define
class FakeCertificates:
    domains: tuple[str, ...]
    certs: dict[str, LoadedCertificate] = field(factory=dict)

    def certificate_for(self, name: str) -> LoadedCertificate | None:
        return self.certs.get(name)


def idle_queue(max_orders_per_hour: int = 90) -> QueueSummary:
    """The order queue with nothing waiting, running or paused."""
    return QueueSummary(
        length=0,
        running=0,
        paused_until=None,
        pause_reason=None,
        orders_last_hour=0,
        max_orders_per_hour=max_orders_per_hour,
        max_concurrent=4,
        next_start=None,
        drained_at=None,
    )


@define
class FakeRenewals:
    """The issuer's per-domain states and its order queue; counts the calls of each."""

    states: dict[str, RenewalState] = field(factory=dict)
    summary: QueueSummary = field(factory=idle_queue)
    calls: dict[str, int] = field(factory=dict)

    def renewal_states(self) -> dict[str, RenewalState]:
        self.calls["renewal_states"] = self.calls.get("renewal_states", 0) + 1
        return self.states

    def queue_summary(self) -> QueueSummary:
        self.calls["queue_summary"] = self.calls.get("queue_summary", 0) + 1
        return self.summary


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
        self.acme = True  # False: no issuer (--no-acme)
        self.in_flight = 0

    def source(self) -> StatusSource:
        source = StatusSource(
            clock=self.clock,
            certificates=self.certs,
            https_enabled=self.https,
            listeners=lambda: self.listeners,
            renewals=lambda: self.renewals if self.acme else None,
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
        self.assertEqual(
            source.ready(),
            (False, ["1 of 2 domains have a certificate", f"{B}: no certificate yet"]),
        )
        self.clock.advance(2 * 86400)
        ready, reasons = source.ready()
        self.assertFalse(ready)
        self.assertEqual(
            reasons[1],
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
        self.assertEqual(
            snap["not_ready_reasons"],
            ["1 of 2 domains have a certificate", f"{B}: no certificate yet"],
        )
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
        """Validity, next attempt, orders, last error (one line, cut), readiness."""
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
        self.assertIsNone(self.sample("trackingproxy_acme_consecutive_failures", domain=B))
        self.assertEqual(self.sample("trackingproxy_acme_consecutive_failures", domain=A), 1)
        self.assertEqual(
            self.sample("trackingproxy_acme_orders_total", domain=A, outcome="failed"), 1
        )
        self.assertIsNone(  # outcomes that never happened are not exported
            self.sample("trackingproxy_acme_orders_total", domain=A, outcome="issued")
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
        self.resource = admin_resource(source, self.metrics.registry)
        self.client = StubTreq(self.resource)

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
        self.assertEqual(
            (code, body),
            (503, f"not ready:\n1 of 2 domains have a certificate\n{B}: no certificate yet\n".encode()),
        )
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
        """/ loads nothing: no src, links only to its own pages, a CSP forbidding loads."""
        for n in range(200):  # enough problems for a "list them all" link
            self.certs.domains += (f"d{n}.example.com",)
        code, headers, body = self.get("/")
        self.assertEqual(headers["content-type"], [b"text/html; charset=utf-8"])
        self.assertIn(b"default-src 'none'", headers["content-security-policy"][0])
        self.assertIn(A.encode(), body)
        self.assertIsNone(re.search(rb"\bsrc\s*=", body))
        links = re.findall(rb'\bhref\s*=\s*"([^"]*)"', body)
        self.assertTrue(links)
        self.assertEqual([link for link in links if not link.startswith(b"?")], [])
        self.assertEqual(len(re.findall(rb"\bhref\s*=", body)), len(links))
        self.assertNotIn(b"<script", body)
        self.assertNotIn(b"<form action", body)

    def test_metrics_gzip(self) -> None:
        """/metrics is gzipped for a client that accepts it, plain for one that does not."""
        agent = RequestTraversalAgent(self.resource)

        def raw(accept: bytes) -> tuple[list[bytes] | None, bytes]:
            d = agent.request(
                b"GET", b"http://admin.invalid/metrics", Headers({b"accept-encoding": [accept]})
            )
            agent.flush()
            response = self.successResultOf(d)
            body = treq.content(response)
            agent.flush()
            return response.headers.getRawHeaders(b"content-encoding"), self.successResultOf(body)

        encoding, body = raw(b"deflate, gzip")
        self.assertEqual(encoding, [b"gzip"])
        self.assertIn(b"trackingproxy_certificate_present", gzip.decompress(body))
        encoding, body = raw(b"gzip;q=0")
        self.assertIsNone(encoding)
        self.assertIn(b"trackingproxy_certificate_present", body)

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
        """The timeline places now and the planned renewal at their share of the life."""
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

    def test_problems_come_first(self) -> None:
        """A not-ready page opens with the listener that is down and the uncertified domain."""
        self.listeners[1].port = None
        self.serve(B)
        page = render_page(self.source().snapshot()).decode()
        self.assertIn("not ready", page)
        problems = page.index('<section id="problems">')
        self.assertLess(problems, page.index('<section id="requests">'))
        self.assertLess(page.index('<section id="requests">'), page.index('id="domains"'))
        section = page[problems : page.index("</section>", problems)]
        self.assertIn("<li>--https-port tcp:443 is not listening</li>", section)
        self.assertIn(f'<td class="name">{A}</td>', section)
        self.assertIn("no certificate yet", section)
        self.assertNotIn(B, section)

    def test_no_problems(self) -> None:
        """With every certificate valid the page says there is nothing to look at."""
        self.serve(A)
        self.serve(B)
        page = render_page(self.source().snapshot()).decode()
        self.assertIn("none: every domain has a valid certificate", page)

    def test_problems_most_urgent_first(self) -> None:
        """Problems rank: no certificate, expired, expiring soonest, failing ACME."""
        d, e = "d.example.com", "e.example.com"
        self.certs.domains = (A, B, C, d, e)
        self.serve(B, days_old=88)  # expires in 2 days
        self.serve(C)  # fine, but its renewals fail
        self.renewals.states[C] = state(T0 + DAY, 2, "boom", T0, failed=2)
        self.serve(d)
        self.serve(e, days_old=91)  # expired a day ago
        snap = self.source().snapshot()
        self.assertEqual(
            [(p["name"], p["severity"]) for p in snap["problems"]],
            [(A, "error"), (e, "error"), (B, "warning"), (C, "warning")],
        )
        self.assertEqual(snap["problem_count"], 4)
        self.assertEqual(snap["problems"][3]["reasons"], ["ACME: 2 failed orders in a row"])
        self.assertEqual(snap["problems"][3]["last_error"], "boom")
        page = render_page(snap).decode()
        order = [page.index(f'<tr class="problem"><td class="name">{n}<') for n in (A, e, B, C)]
        self.assertEqual(order, sorted(order))
        self.assertIn("expires in 2.0 days", page)
        self.assertEqual(unbalanced_tags(page), [])

    def test_problems_beyond_the_limit_are_counted(self) -> None:
        """The page shows the first problems and says how many more there are."""
        self.certs.domains = tuple(f"d{i}.example.com" for i in range(7))
        page = render_page(self.source().snapshot(problem_limit=5)).decode()
        self.assertEqual(page.count('<tr class="problem">'), 5)
        self.assertIn('and 2 more domains with problems: <a href="?problems=1">', page)


class SearchAndPageTests(StatusTestCase):
    """The page and /status narrowed by ?q=, ?problems=1, ?page= and ?per_page=."""

    def setUp(self) -> None:
        super().setUp()
        self.https = False  # no certificate needed: 120 domains without any are fine
        self.certs.domains = (*(f"d{i:03d}.example.com" for i in range(120)), "<b>.example.com")
        self.client = StubTreq(admin_resource(self.source(), self.metrics.registry))

    def get(self, path: str) -> tuple[int, str]:
        response = self.successResultOf(self.client.get("http://admin.invalid" + path))
        return response.code, self.successResultOf(response.content()).decode()

    def rows(self, page: str) -> list[str]:
        return re.findall(r'<tr><td class="name">([^<]*)</td>', page)

    def test_first_page(self) -> None:
        """50 domains a page, with the count and a link to the next page only."""
        code, page = self.get("/")
        self.assertEqual(code, 200)
        self.assertEqual(self.rows(page)[:2], ["d000.example.com", "d001.example.com"])
        self.assertEqual(len(self.rows(page)), 50)
        self.assertIn("1&ndash;50 of 121 domains", page)
        self.assertIn("<span>page 1 of 3</span>", page)
        self.assertIn('<a href="?page=2" rel="next">', page)
        self.assertNotIn('rel="prev"', page)

    def test_later_page_and_past_the_end(self) -> None:
        """?page=2 links both ways; a page past the last shows the last one."""
        _, page = self.get("/?page=2")
        self.assertEqual(self.rows(page)[0], "d050.example.com")
        self.assertIn("51&ndash;100 of 121 domains", page)
        self.assertIn('<a href="?page=1" rel="prev">', page)
        self.assertIn('<a href="?page=3" rel="next">', page)
        _, page = self.get("/?page=99")
        self.assertEqual(len(self.rows(page)), 21)
        self.assertIn("<span>page 3 of 3</span>", page)

    def test_search(self) -> None:
        """?q= keeps names holding the text (any case); links and the box keep it."""
        _, page = self.get("/?q=D01&per_page=5")
        self.assertEqual(self.rows(page), [f"d01{i}.example.com" for i in range(5)])
        self.assertIn("1&ndash;5 of 10 domains matching &ldquo;d01&rdquo; (121 in all)", page)
        self.assertIn('<a href="?q=d01&amp;page=2" rel="next">', page)
        self.assertIn('name="q" value="d01"', page)
        _, page = self.get("/?q=nothing-like-it")
        self.assertIn("no domain matches", page)

    def test_search_text_is_escaped(self) -> None:
        """A search for markup is shown escaped and finds the (escaped) domain holding it."""
        _, page = self.get("/?q=%22%3E%3Cb%3E")
        self.assertNotIn("<b>.example.com", page)
        self.assertNotIn('"><b>', page)
        self.assertIn('value="&quot;&gt;&lt;b&gt;"', page)
        _, page = self.get("/?q=%3Cb%3E")
        self.assertEqual(self.rows(page), ["&lt;b&gt;.example.com"])

    def test_problems_only(self) -> None:
        """?problems=1 lists only the domains with problems, most urgent first."""
        self.renewals.states["d007.example.com"] = state(T0 + DAY, 1, "x", T0, failed=1)
        _, page = self.get("/?problems=1")
        self.assertEqual(self.rows(page), ["d007.example.com"])
        self.assertIn("1&ndash;1 of 1 domains with problems (121 in all)", page)
        self.assertIn('type="checkbox" name="problems" value="1" checked', page)

    def test_bad_parameters(self) -> None:
        """A page number that is not one is a 400 saying which parameter is wrong."""
        for path in ("/?page=x", "/status?page=0", "/status?per_page=100000"):
            code, body = self.get(path)
            self.assertEqual(code, 400, path)
            self.assertIn("page", body)

    def test_status_json_default_is_complete(self) -> None:
        """/status without parameters still lists every domain, with the listing facts."""
        status = json.loads(self.get("/status")[1])
        self.assertEqual(len(status["domains"]), 121)
        self.assertEqual(
            status["listing"],
            {"q": "", "problems_only": False, "page": 1, "pages": 1, "per_page": None,
             "matched": 121, "total": 121},
        )

    def test_status_json_pages(self) -> None:
        """/status?page=&per_page= and ?q= give one page; past the end it is empty."""
        status = json.loads(self.get("/status?q=d1&page=2&per_page=7")[1])
        self.assertEqual([d["name"] for d in status["domains"]][:2], ["d107.example.com",
                                                                      "d108.example.com"])
        self.assertEqual((status["listing"]["matched"], status["listing"]["pages"]), (20, 3))
        self.assertEqual(len(json.loads(self.get("/status?page=4&per_page=50")[1])["domains"]),
                         0)
        self.assertEqual(len(json.loads(self.get("/status?page=2")[1])["domains"]), 50)


class ReadyzAtScaleTests(StatusTestCase):
    def test_readyz_counts_and_names_at_most_twenty(self) -> None:
        """With 1,000 domains without a certificate, /readyz says how many have one and names
        the first 20, then counts the rest (it does not list 1,000 lines)."""
        names = [f"d{i}.example.com" for i in range(1000)]
        self.certs = FakeCertificates(tuple(names))
        ready, reasons = self.source().ready()
        self.assertFalse(ready)
        self.assertEqual(reasons[0], "0 of 1000 domains have a certificate")
        self.assertEqual(reasons[1:21], [f"{n}: no certificate yet" for n in names[:20]])
        self.assertEqual(reasons[21:], ["and 980 more without one"])


def queued(st: RenewalState, position: int, eta: datetime.datetime) -> RenewalState:
    """``st`` waiting in the order queue at ``position``, estimated to start at ``eta``."""
    return attrs.evolve(st, queue_position=position, queue_eta=eta)


class OrderQueueTests(StatusTestCase):
    """The ACME order queue in /status and on the page: the whole queue in one line, each
    waiting domain's place and estimated start in its row."""

    def setUp(self) -> None:
        super().setUp()
        self.certs.domains = (A, B, C)
        self.serve(B)
        self.serve(C, days_old=85)  # expires in 5 days: ordered first
        self.renewals.states[A] = queued(state(None), 2, T0 + 14 * HOUR + 5 * MINUTE)
        self.renewals.states[B] = state(T0 + 50 * DAY, issued=1)
        self.renewals.states[C] = queued(state(T0 - HOUR, issued=1), 1, T0)
        self.renewals.summary = attrs.evolve(
            idle_queue(),
            length=2,
            running=1,
            orders_last_hour=12,
            next_start=T0,
            drained_at=T0 + 14 * HOUR + 5 * MINUTE,
        )

    def get(self, path: str) -> str:
        client = StubTreq(admin_resource(self.source(), self.metrics.registry))
        response = self.successResultOf(client.get("http://admin.invalid" + path))
        self.assertEqual(response.code, 200)
        return str(self.successResultOf(response.content()).decode())

    def row(self, page: str, name: str) -> str:
        start = page.index(f'<tr><td class="name">{name}</td>')
        return page[start : page.index("</tr>", start)]

    def test_status_json(self) -> None:
        """/status has the queue's summary (ISO times) and, in each domain's renewal, its
        place and estimated start (null when it does not wait); one read of each per request."""
        status = json.loads(self.get("/status"))
        self.assertEqual(
            status["acme_queue"],
            {
                "length": 2,
                "running": 1,
                "paused_until": None,
                "pause_reason": None,
                "orders_last_hour": 12,
                "max_orders_per_hour": 90,
                "max_concurrent": 4,
                "next_start": "2030-01-01T00:00:00+00:00",
                "drained_at": "2030-01-01T14:05:00+00:00",
            },
        )
        places = {
            d["name"]: (d["renewal"]["queue_position"], d["renewal"]["queue_eta"])
            for d in status["domains"]
        }
        self.assertEqual(
            places,
            {A: (2, "2030-01-01T14:05:00+00:00"), B: (None, None),
             C: (1, "2030-01-01T00:00:00+00:00")},
        )
        self.assertEqual(self.renewals.calls, {"renewal_states": 1, "queue_summary": 1})

    def test_a_page_of_status_has_the_whole_queue(self) -> None:
        """One page of /status (here: the first problem) still has the summary of the whole
        queue, and the place of the domain it lists."""
        status = json.loads(self.get("/status?problems=1&per_page=1"))
        self.assertEqual(status["acme_queue"]["length"], 2)
        [a] = status["domains"]
        self.assertEqual((a["name"], a["renewal"]["queue_position"]), (A, 2))

    def test_no_issuer(self) -> None:
        """Without an issuer (--no-acme) ``acme_queue`` is null and the page has no line."""
        self.acme = False
        self.assertIsNone(json.loads(self.get("/status"))["acme_queue"])
        page = self.get("/")
        self.assertNotIn('id="acme-queue"', page)
        self.assertNotIn("queued #", page)

    def test_idle_queue_has_no_line(self) -> None:
        """Nothing waiting and no pause: the summary is in /status, the page says nothing."""
        self.renewals.summary = idle_queue()
        self.assertEqual(json.loads(self.get("/status"))["acme_queue"]["length"], 0)
        self.assertNotIn('id="acme-queue"', self.get("/"))

    def test_page_line_and_places(self) -> None:
        """The line above the problems says how many wait, run and may start per hour and
        when the last should start; a waiting domain's row says its place and start, the
        others keep their renewal time."""
        page = self.get("/")
        line = (
            '<section id="acme-queue"><p class="facts">2 domains wait for a certificate '
            "order; 1 running; at most 90 per hour (12 in the last hour); the last should "
            "start around 14:05 UTC</p></section>"
        )
        self.assertIn(line, page)
        self.assertLess(page.index(line), page.index('<section id="problems">'))
        self.assertIn('<div class="queued">queued #2, starts ~14:05 UTC</div>', self.row(page, A))
        self.assertIn('<div class="queued">queued #1, starts ~00:00 UTC</div>', self.row(page, C))
        self.assertNotIn("queued", self.row(page, B))
        self.assertIn("renewal 2030-02-20 00:00 UTC", self.row(page, B))
        self.assertEqual(unbalanced_tags(page), [])

    def test_paused_by_the_ca(self) -> None:
        """A pause is in /status and in the line with the CA's reason (escaped); times on
        another day than today carry the date."""
        later = T0 + DAY + 3 * HOUR
        self.renewals.states[C] = state(T0 + 50 * DAY, issued=2)
        self.renewals.states[A] = queued(state(None), 1, later)
        self.renewals.summary = attrs.evolve(
            idle_queue(),
            length=1,
            paused_until=later,
            pause_reason="rateLimited: too many new orders <recently>",
            orders_last_hour=90,
            next_start=later,
            drained_at=later,
        )
        status = json.loads(self.get("/status"))
        self.assertEqual(status["acme_queue"]["paused_until"], "2030-01-02T03:00:00+00:00")
        page = self.get("/")
        self.assertIn(
            '<p class="facts">1 domain waits for a certificate order; 0 running; at most 90 '
            "per hour (90 in the last hour); the last should start around 2030-01-02 03:00 "
            'UTC; <span class="badge bad">paused by the CA until 2030-01-02 03:00 UTC</span>'
            '</p><div class="sub">the CA said: rateLimited: too many new orders '
            "&lt;recently&gt;</div>",
            page,
        )
        self.assertIn("queued #1, starts ~2030-01-02 03:00 UTC", self.row(page, A))
        self.renewals.summary = attrs.evolve(self.renewals.summary, length=0, drained_at=None)
        self.assertIn(
            "no domain waits for a certificate order; 0 running; at most 90 per hour (90 in "
            'the last hour); <span class="badge bad">paused by the CA until', self.get("/")
        )

    def test_waiting_domains_keep_their_problem_rank(self) -> None:
        """Waiting changes no problem: the one without a certificate stays an error, first,
        the expiring one a warning, the fine one none; nothing is said of the queue there."""
        snap = self.source().snapshot()
        self.assertEqual(
            [(p["name"], p["severity"]) for p in snap["problems"]], [(A, "error"), (C, "warning")]
        )
        self.assertEqual(snap["problems"][0]["reasons"], ["no certificate yet"])
