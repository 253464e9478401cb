"""The admin listener of the real proxy on loopback: /healthz, /readyz before and after a
certificate exists, /metrics after proxied requests, /status, and the ACME issuer's state
(the domains' renewals and the order queue)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from tests.certs import issue, loaded, make_ca, write_pair
from tests.harness import DOMAIN, DOMAIN2, ProxyTestCase, Running, proxy_args, stop_proxy
from tests.standin import start_standin
from trackingproxy.config import config_from_options
from trackingproxy.logs.access import AccessLog
from trackingproxy.options import Options
from trackingproxy.service import build_service


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text ``text``."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


class AdminTests(ProxyTestCase):
    @inlineCallbacks
    def admin(self, path: str, port: int | None = None):
        port = port or self.running.admin_port
        response = yield treq.get(f"http://127.0.0.1:{port}{path}", persistent=False)
        body = yield response.content()
        return response.code, body

    @inlineCallbacks
    def test_health_metrics_and_status_after_proxied_requests(self):
        """An open, a click and a 421 are counted in /metrics and /status."""
        r = self.start()
        self.assertNotEqual(r.admin_port, 0)
        self.assertEqual((yield self.admin("/healthz")), (200, b"ok\n"))
        self.assertEqual((yield self.admin("/readyz")), (200, b"ready\n"))
        resp = yield self.http.get(r.url("/q/abc"))
        yield resp.content()
        resp = yield self.http.get(r.url("/f/tok", scheme="http"), allow_redirects=False)
        yield resp.content()
        self.assertEqual(resp.code, 302)
        resp = yield self.http.get("http://unknown.example.net/f/x")
        yield resp.content()
        self.assertEqual(resp.code, 421)

        code, body = yield self.admin("/metrics")
        self.assertEqual(code, 200)
        text = body.decode()
        for line in (
            f'trackingproxy_requests_total{{domain="{DOMAIN}",kind="open",protocol="h1",'
            'scheme="https",status="2xx"} 1.0',
            f'trackingproxy_requests_total{{domain="{DOMAIN}",kind="click",protocol="h1",'
            'scheme="http",status="3xx"} 1.0',
            'trackingproxy_requests_total{domain="other",kind="click",protocol="h1",'
            'scheme="http",status="4xx"} 1.0',
            "trackingproxy_upstream_requests_total 2.0",
            "trackingproxy_upstream_response_seconds_count 2.0",
            'trackingproxy_upstream_errors_total{cause="connect"} 0.0',
            "trackingproxy_ready 1.0",
        ):
            self.assertIn(line, text)
        self.assertNotIn("unknown.example.net", text)
        cert = r.service.sni.certificate_for(DOMAIN)
        self.assertEqual(
            sample(text, "trackingproxy_certificate_not_after_timestamp_seconds", domain=DOMAIN),
            cert.not_after.timestamp(),
        )
        self.assertRegex(text, r'trackingproxy_open_connections\{scheme="https"\} \d')
        self.assertIn("process_resident_memory_bytes", text)

        code, body = yield self.admin("/status")
        status = json.loads(body)
        self.assertTrue(status["ready"])
        self.assertEqual([d["name"] for d in status["domains"]], [DOMAIN, DOMAIN2])
        self.assertEqual(status["domains"][0]["requests"], {"open": 1, "click": 1, "other": 0})
        self.assertEqual(status["requests"]["total"], {"open": 1, "click": 2, "other": 0})
        self.assertEqual(status["requests"]["unknown_hosts"]["click"], 1)
        self.assertEqual(status["upstream"]["requests"], 2)
        self.assertIsNone(status["domains"][0]["renewal"])  # a certificate we were given
        self.assertIsNone(status["acme_queue"])  # --no-acme: no issuer, no order queue
        self.assertEqual(status["domains"][0]["certificate"]["issuer"], cert.issuer)
        self.assertEqual(
            {li["option"]: li["listening"] for li in status["listeners"]},
            {"--http-port": True, "--https-port": True},
        )
        code, body = yield self.admin("/")
        self.assertEqual(code, 200)
        self.assertIn(DOMAIN2.encode(), body)

    @inlineCallbacks
    def test_readyz_until_every_domain_has_a_certificate(self):
        """/readyz is 503 naming the domain without a certificate, 200 once one is served."""
        ca = make_ca()
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        cert, key = write_pair(issue(ca, DOMAIN), tmp, "one")
        r = self.start("--cert", str(cert), "--key", str(key), ca=ca)
        code, body = yield self.admin("/readyz")
        self.assertEqual(
            (code, body), (503, f"not ready:\n1 of 2 domains have a certificate\n{DOMAIN2}: no certificate yet\n".encode())
        )
        _, metrics = yield self.admin("/metrics")
        self.assertIn(b"trackingproxy_ready 0.0", metrics)
        self.assertIn(
            f'trackingproxy_certificate_present{{domain="{DOMAIN2}"}} 0.0'.encode(), metrics
        )
        r.service.sni.install(loaded(issue(ca, DOMAIN2)))  # what the issuer does once it has one
        self.assertEqual((yield self.admin("/readyz")), (200, b"ready\n"))

    @inlineCallbacks
    def test_admin_port_none(self):
        """--admin-port none: no admin listener and no metric hooks."""
        r = self.start("--admin-port", "none")
        self.assertEqual(r.admin_port, 0)
        self.assertNotIn("admin", r.service.namedServices)
        resp = yield self.http.get(r.url("/q/abc"))
        yield resp.content()
        self.assertEqual(resp.code, 200)

    @inlineCallbacks
    def test_acme_issued_certificate_makes_it_ready(self):
        """The local CA's order shows up: ready, one issued order, renewal ahead."""
        ca = make_ca()
        standin = start_standin(ca, reactor)
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        cert, key = write_pair(issue(ca, DOMAIN), tmp, "one")
        args = proxy_args(tmp, ca, standin, "--cert", str(cert), "--key", str(key))
        args = [a for a in args if a != "--no-acme"]
        args += ["--acme-directory", "local", "--state-dir", str(tmp / "state")]
        opts = Options(environ={})
        opts.parseOptions(args)
        config = config_from_options(opts, datetime.datetime.now(datetime.UTC))
        service = build_service(config, reactor, access_log=AccessLog(write=lambda line: None))
        service.startService()
        running = Running(service, standin, ca, 0, 0)
        self.addCleanup(stop_proxy, running)
        port = service.namedServices["admin"].listener.port.getHost().port
        for _ in range(200):
            code, body = yield self.admin("/readyz", port)
            if code == 200:
                break
            self.assertIn(DOMAIN2.encode(), body)
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((code, body), (200, b"ready\n"))
        _, body = yield self.admin("/metrics", port)
        text = body.decode()
        self.assertIn(
            f'trackingproxy_acme_orders_total{{domain="{DOMAIN2}",outcome="issued"}} 1.0', text
        )
        self.assertIn(f'trackingproxy_acme_next_attempt_seconds{{domain="{DOMAIN2}"}}', text)
        # no series that say nothing: no failures, outcomes that never happened, nor ACME
        # series for the domain whose certificate was given
        self.assertNotIn("trackingproxy_acme_consecutive_failures{", text)
        self.assertNotIn('outcome="failed"', text)
        self.assertNotIn(f'trackingproxy_acme_orders_total{{domain="{DOMAIN}"', text)
        _, body = yield self.admin("/status", port)
        d2 = json.loads(body)["domains"][1]
        self.assertEqual(d2["name"], DOMAIN2)
        self.assertIn("local", d2["certificate"]["issuer"])
        self.assertGreater(d2["renewal"]["next_attempt_in_seconds"], 86400)
        self.assertIsNone(d2["renewal"]["last_error"])
        self.assertEqual((d2["renewal"]["queue_position"], d2["renewal"]["queue_eta"]),
                         (None, None))  # issued: no longer waiting
        queue = json.loads(body)["acme_queue"]
        self.assertEqual((queue["length"], queue["max_orders_per_hour"], queue["drained_at"]),
                         (0, 90, None))
        self.assertEqual(queue["orders_last_hour"], 1)
