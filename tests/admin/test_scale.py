"""The admin endpoints with 10,000 configured domains: the size of /metrics, and the time
and size of the status page and of a page of /status (issue #15: /metrics was 2.4 MB with
5,000 domains and the page one card per domain)."""

from __future__ import annotations

import gzip
import json
import re
import time

from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from tests.admin import scale
from tests.admin.fakes import FakeRequest, unbalanced_tags
from trackingproxy.admin.collector import StatusCollector
from trackingproxy.admin.listing import DomainQuery
from trackingproxy.admin.page import PROBLEMS_SHOWN, render_page

MB = 1_000_000


def metrics_text(fleet: scale.Fleet) -> bytes:
    """/metrics of ``fleet`` after an open and a click on every domain over both schemes."""
    fleet.metrics.registry.register(StatusCollector(fleet.source))
    for scheme in ("http", "https"):
        site = fleet.metrics.site(scheme)
        for name in fleet.names:
            site.request_done(FakeRequest(b"/q/x", 200, name))
            site.request_done(FakeRequest(b"/f/x", 302, name, b"HTTP/2"))
    return bytes(generate_latest(fleet.metrics.registry))


class MetricsSizeTests(SynchronousTestCase):
    def test_certificates_only(self) -> None:
        """10,000 domains, given certificates, auto: /metrics under 5.5 MB, 0.6 MB gzipped."""
        text = metrics_text(scale.fleet(acme=False))
        self.assertNotIn(b"trackingproxy_requests_total{domain=", text)
        self.assertIsNone(re.search(rb"^trackingproxy_acme_", text, re.M))  # no issuer
        self.assertEqual(len(re.findall(rb"^trackingproxy_requests_total", text, re.M)), 4)
        self.assertEqual(text.count(b"\ntrackingproxy_certificate_present{"), scale.COUNT)
        self.assertLess(len(text), 5.5 * MB)
        self.assertLess(len(gzip.compress(text, 6)), 0.6 * MB)

    def test_with_acme(self) -> None:
        """10,000 ACME domains: no zero series; /metrics under 7 MB, 0.7 MB gzipped."""
        text = metrics_text(scale.fleet())
        self.assertEqual(text.count(b"\ntrackingproxy_acme_next_attempt_seconds{"), scale.COUNT)
        self.assertEqual(
            text.count(b"\ntrackingproxy_acme_orders_total{"), scale.COUNT + len(scale.FAILING)
        )
        self.assertEqual(
            text.count(b"\ntrackingproxy_acme_consecutive_failures{"), len(scale.FAILING)
        )
        self.assertLess(len(text), 7 * MB)
        self.assertLess(len(gzip.compress(text, 6)), 0.7 * MB)


class PageScaleTests(SynchronousTestCase):
    def setUp(self) -> None:
        scale.certificates()  # built once per process, not part of what is timed
        self.fleet = scale.fleet()

    def render(self, query: DomainQuery) -> str:
        snapshot = self.fleet.source.snapshot(query, problem_limit=PROBLEMS_SHOWN, clamp=True)
        return render_page(snapshot).decode()

    def test_page_is_fast_and_small(self) -> None:
        """The page for 10,000 domains renders in under 2 s cold, 50 rows, small, balanced."""
        started = time.perf_counter()
        page = self.render(DomainQuery(per_page=50))
        cold = time.perf_counter() - started
        started = time.perf_counter()
        self.render(DomainQuery(q="click09", page=7, per_page=50))
        warm = time.perf_counter() - started
        self.assertLess(cold, 2.0)
        self.assertLess(warm, 1.0)
        self.assertEqual(page.count('<tr><td class="name">'), 50)
        self.assertIn("1&ndash;50 of 10,000 domains", page)
        self.assertIn("<span>page 1 of 200</span>", page)
        self.assertLess(len(page), 100_000)
        self.assertEqual(unbalanced_tags(page), [])

    def test_order_queue_on_the_page(self) -> None:
        """The queue of 1,000 domains is one line above the problems; the first rows, a
        wave of renewals, say their place and estimated start."""
        page = self.render(DomainQuery(per_page=50))
        line = page.index(
            "1,000 domains wait for a certificate order; 4 running; at most 90 per hour "
            "(4 in the last hour); the last should start around 11:00 UTC</p>"
        )
        self.assertLess(line, page.index('<section id="problems">'))
        for i, position, at in ((0, 6, "00:00"), (9, 15, "00:03"), (49, 55, "00:30")):
            row = page.index(f'<tr><td class="name">{scale.name(i)}</td>')
            start = page.index('<div class="queued">', row)
            self.assertLess(start, page.index("</tr>", row))
            self.assertEqual(
                page[start : page.index("</div>", start)],
                f'<div class="queued">queued #{position}, starts ~{at} UTC',
            )

    def test_problems_come_first(self) -> None:
        """The troubled domains at the end of the list open the page, most urgent first."""
        page = self.render(DomainQuery(per_page=50))
        urgent = [scale.name(i) for i in (*scale.MISSING, *scale.EXPIRING[::-1],
                                          *scale.FAILING)]
        positions = [page.index(f'<tr class="problem"><td class="name">{n}<') for n in urgent]
        self.assertEqual(positions, sorted(positions))
        self.assertLess(positions[-1], page.index(f'<td class="name">{scale.name(0)}<'))
        self.assertIn("&lt;b&gt;DNS&lt;/b&gt; points elsewhere", page)

    def test_status_json_page(self) -> None:
        """/status?page= for 10,000 domains: one page of JSON, with every problem counted."""
        started = time.perf_counter()
        status = self.fleet.source.snapshot(DomainQuery(page=200, per_page=50),
                                            problem_limit=50)
        body = json.dumps(status)
        self.assertLess(time.perf_counter() - started, 2.0)
        self.assertEqual(status["domains"][-1]["name"], scale.name(scale.COUNT - 1))
        self.assertEqual(status["problem_count"], 6)
        self.assertLess(len(body), 100_000)
        self.assertEqual(status["acme_queue"]["length"], len(scale.QUEUED))
        self.assertEqual(status["acme_queue"]["drained_at"], "2030-01-01T11:00:00+00:00")
        renewal = status["domains"][-1]["renewal"]  # the last one without a certificate
        self.assertEqual((renewal["queue_position"], renewal["queue_eta"]),
                         (5, "2030-01-01T00:00:00+00:00"))
        self.assertEqual(status["domains"][0]["renewal"]["queue_position"], None)
