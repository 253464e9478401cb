"""Outage mode end to end: the real proxy in process, the recording stand-in behind a loopback
relay that is taken down and brought back, real clients (HTTP/1.1 and HTTP/2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.harness import DOMAIN, DOMAIN2, Running, client, curl, start_proxy, stop_proxy
from tests.outage.faults import Relay, sleep, start_outage_proxy, stop_all, wait_for
from tests.standin import GIF
from trackingproxy.outage.records import HEADER, JournaledRequest, add_record, mark_record
from trackingproxy.outage.replay import PROBE_TARGET

LANDING = "https://www.example.com/landing?utm=1"


class OutageCase(TestCase):
    timeout = 60

    def start(self, *extra: str) -> tuple[Running, Relay]:
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        self.tmp = tmp
        running, relay = start_outage_proxy(tmp, *extra)
        self.addCleanup(stop_all, running, relay)
        self.http = client(running)
        return running, relay

    @inlineCallbacks
    def get(self, running: Running, path: str, client_ip: str, ua: str,
            host: str = DOMAIN, scheme: str = "https") -> Any:
        resp = yield self.http.get(
            running.url(path, scheme=scheme, host=host), allow_redirects=False,
            headers={"X-Forwarded-For": client_ip, "User-Agent": ua},
        )
        body = yield resp.content()
        return resp, body

    @inlineCallbacks
    def metrics(self, running: Running) -> Any:
        pool = HTTPConnectionPool(reactor, persistent=False)
        resp = yield treq.get(f"http://127.0.0.1:{running.admin_port}/metrics", pool=pool)
        text = yield resp.text()
        return text

    def replayed(self, running: Running, since: int) -> list[Any]:
        """What the stand-in received after ``since``, without probes."""
        return [s for s in running.standin.seen[since:] if s.uri != PROBE_TARGET]


class DownAndBack(OutageCase):
    @inlineCallbacks
    def test_opens_and_clicks_during_an_outage_and_one_resend_after_it(self):
        """Upstream down under a mix of opens and clicks (HTTP/1.1 and HTTP/2, two Hosts):
        opens 200 with the GIF, remembered clicks 302 to their learned Location, others 503
        with Retry-After, a target= attempt 503; after recovery every journaled request
        reaches the stand-in exactly once with its Host, path, query, client address and
        User-Agent; a repeat within 10 s is not re-sent."""
        r, relay = self.start()
        resp, _ = yield self.get(r, "/f/known?a=1", "203.0.113.1", "Mail/1")
        self.assertEqual(resp.code, 302)  # learned while up
        yield relay.down()
        outage_start = len(r.standin.seen)

        expected: dict[bytes, tuple[bytes, bytes, bytes]] = {}  # uri -> host, client, UA
        for n in range(6):
            host = DOMAIN if n % 2 else DOMAIN2
            path = f"/q/open-{n}?x={n}&y=%2F"
            resp, body = yield self.get(r, path, f"203.0.113.{10 + n}", f"Mail/{n}", host=host,
                                        scheme="https" if n % 3 else "http")
            self.assertEqual((resp.code, body), (200, GIF))
            self.assertEqual(resp.headers.getRawHeaders("cache-control"), ["no-store"])
            self.assertEqual(resp.headers.getRawHeaders("content-type"), ["image/gif"])
            expected[path.encode()] = (host.encode(), f"203.0.113.{10 + n}".encode(),
                                       f"Mail/{n}".encode())
        out, _, code = yield curl(
            r, "--http2", "-H", "X-Forwarded-For: 203.0.113.30", "-A", "H2Mail/1",
            "-o", "/dev/null", "-w", "%{http_code} %{http_version} %{size_download}",
            f"https://{DOMAIN}:{r.https_port}/q/open-h2",
        )
        self.assertEqual((code, out), (0, b"200 2 44"))
        expected[b"/q/open-h2"] = (DOMAIN.encode(), b"203.0.113.30", b"H2Mail/1")

        resp, _ = yield self.get(r, "/f/known?a=1", "203.0.113.2", "Mail/2")
        self.assertEqual((resp.code, resp.headers.getRawHeaders("location")), (302, [LANDING]))
        expected[b"/f/known?a=1"] = (DOMAIN.encode(), b"203.0.113.2", b"Mail/2")
        resp, body = yield self.get(r, "/f/unknown?b=2", "203.0.113.3", "Mail/3")
        self.assertEqual(resp.code, 503)
        self.assertEqual(resp.headers.getRawHeaders("retry-after"), ["30"])
        self.assertIn(b"work again shortly", body)
        expected[b"/f/unknown?b=2"] = (DOMAIN.encode(), b"203.0.113.3", b"Mail/3")
        evil = "/f/x?target=https%3A%2F%2Fevil.example%2F"
        resp, body = yield self.get(r, evil, "203.0.113.4", "Mail/4")
        self.assertEqual((resp.code, resp.headers.getRawHeaders("location")), (503, None))
        self.assertNotIn(b"evil", body)
        expected[evil.encode()] = (DOMAIN.encode(), b"203.0.113.4", b"Mail/4")
        resp, _ = yield self.get(r, "/q/open-1?x=1&y=%2F", "203.0.113.11", "Mail/1",
                                 host=DOMAIN)  # a repeat within 10 s: answered, not journaled
        self.assertEqual(resp.code, 200)
        self.assertEqual(len(r.standin.seen), outage_start)  # nothing got through

        relay.up()
        resp, _ = yield self.get(r, "/q/live", "203.0.113.99", "Live/1")  # answered: recovery
        self.assertEqual(resp.code, 200)
        yield wait_for(lambda: len(self.replayed(r, outage_start)) >= len(expected) + 1)
        yield sleep(0.5)  # anything sent twice would arrive by now
        seen = [s for s in self.replayed(r, outage_start) if s.uri != b"/q/live"]
        self.assertEqual(sorted(s.uri for s in seen), sorted(expected))
        for s in seen:
            want_host, want_client, want_ua = expected[s.uri]
            self.assertEqual(s.headers[b"host"], [want_host])
            self.assertEqual(s.headers[b"x-forwarded-for"], [want_client])
            self.assertEqual(s.headers[b"user-agent"], [want_ua])
            self.assertEqual(s.method, b"GET")

        text = yield self.metrics(r)
        for line in (
            'trackingproxy_outage_local_answers_total{kind="open"} 8.0',
            'trackingproxy_outage_local_answers_total{kind="remembered_click"} 1.0',
            'trackingproxy_outage_local_answers_total{kind="unavailable"} 2.0',
            f"trackingproxy_outage_journaled_total {len(expected)}.0",
            "trackingproxy_outage_repeats_total 1.0",
            f"trackingproxy_outage_replayed_total {len(expected)}.0",
            "trackingproxy_engagement_ambiguous_total 0.0",
            "trackingproxy_outage_journal_entries 0.0",
            "trackingproxy_outage_upstream_down 0.0",
        ):
            self.assertIn(line, text)
        yield sleep(0.3)  # the compaction after the last re-send
        [journal] = (self.tmp / "state" / "outage").glob("journal-?")
        self.assertNotIn(b"open-", journal.read_bytes())  # nothing of the requests left
        self.assertEqual(journal.stat().st_mode & 0o777, 0o600)

    @inlineCallbacks
    def test_requests_cut_after_they_were_written_are_never_resent(self):
        """The stand-in resets connections after reading the full request: the open and the
        click are answered locally, counted ambiguous, and never re-sent after recovery,
        while a request journaled in the same outage is."""
        r, relay = self.start()
        r.standin.mode = "reset"
        resp, body = yield self.get(r, "/q/cut-1", "203.0.113.5", "Mail/5")
        self.assertEqual((resp.code, body), (200, GIF))
        resp, _ = yield self.get(r, "/f/cut-2", "203.0.113.5", "Mail/5")
        self.assertEqual(resp.code, 503)
        r.standin.mode = "normal"
        yield relay.down()
        resp, _ = yield self.get(r, "/q/never-arrived", "203.0.113.6", "Mail/6")
        self.assertEqual(resp.code, 200)
        relay.up()
        yield self.get(r, "/q/live", "203.0.113.99", "Live/1")
        yield wait_for(lambda: any(s.uri == b"/q/never-arrived" for s in r.standin.seen))
        yield sleep(0.5)
        uris = [s.uri for s in r.standin.seen]
        self.assertEqual(uris.count(b"/q/cut-1"), 1)
        self.assertEqual(uris.count(b"/f/cut-2"), 1)
        self.assertEqual(uris.count(b"/q/never-arrived"), 1)
        text = yield self.metrics(r)
        self.assertIn("trackingproxy_engagement_ambiguous_total 2.0", text)
        self.assertIn("trackingproxy_outage_journaled_total 1.0", text)

    @inlineCallbacks
    def test_a_request_never_written_from_the_busy_queue_is_resent_once(self):
        """One upstream connection, held by a slow answer: the next open waits, times out in
        the queue without being written (pixel answered here, journaled), and is re-sent
        exactly once when the upstream answers again."""
        r, _ = self.start("--upstream-max-connections", "1", "--upstream-timeout", "2")
        r.standin.holding = True
        slow = self.get(r, "/q/slow", "203.0.113.7", "Mail/7")
        yield wait_for(lambda: len(r.standin.held) == 1)
        resp, body = yield self.get(r, "/q/queued", "203.0.113.8", "Mail/8")
        self.assertEqual((resp.code, body), (200, GIF))
        self.assertNotIn(b"/q/queued", [s.uri for s in r.standin.seen])
        r.standin.holding = False
        r.standin.release()
        resp, _ = yield slow
        self.assertEqual(resp.code, 200)
        yield wait_for(lambda: any(s.uri == b"/q/queued" for s in r.standin.seen))
        yield sleep(0.5)
        queued = [s for s in r.standin.seen if s.uri == b"/q/queued"]
        self.assertEqual(len(queued), 1)
        self.assertEqual(queued[0].headers[b"x-forwarded-for"], [b"203.0.113.8"])


class OffByDefault(OutageCase):
    @inlineCallbacks
    def test_without_outage_mode_an_unreachable_upstream_answers_502(self):
        """Outage mode off (the default): today's 502, nothing journaled, no journal file."""
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        r = start_proxy(tmp, "--state-dir", str(tmp / "state"))
        self.addCleanup(stop_proxy, r)
        self.http = client(r)
        yield r.standin.port.stopListening()
        resp = yield self.http.get(r.url("/q/x"))
        body = yield resp.content()
        self.assertEqual((resp.code, body), (502, b"502 Bad Gateway\n"))
        self.assertFalse((tmp / "state" / "outage").exists())
        self.assertIsNone(r.service.namedServices.get("outage"))


class AfterACrash(OutageCase):
    @inlineCallbacks
    def test_entries_marked_sending_are_dropped_and_the_rest_resent_once(self):
        """A journal left by a killed process (one entry marked sending, one pending, one
        done): at start the pending one is re-sent once; the others never."""
        tmp = Path(self.mktemp())
        journal_dir = tmp / "state" / "outage"
        journal_dir.mkdir(parents=True, mode=0o700)
        now = time.time()

        def entry(n: int, path: bytes) -> bytes:
            return add_record(n, JournaledRequest(b"GET", DOMAIN, path, f"203.0.113.{n}",
                                                  b"Mail/1", b"https", now - 60))

        (journal_dir / "journal-0").write_bytes(
            HEADER + entry(1, b"/q/was-sending") + entry(2, b"/q/pending") + entry(3, b"/f/done")
            + mark_record("s", 1) + mark_record("s", 3) + mark_record("d", 3)
            + entry(4, b"/q/cut-by-the-crash")[:-7]
        )
        running, relay = start_outage_proxy(tmp)
        self.addCleanup(stop_all, running, relay)
        yield wait_for(lambda: any(s.uri == b"/q/pending" for s in running.standin.seen))
        yield sleep(0.5)
        uris = [s.uri for s in running.standin.seen if s.uri != PROBE_TARGET]
        self.assertEqual(uris, [b"/q/pending"])
        self.assertEqual(running.standin.seen[-1].headers[b"x-forwarded-for"], [b"203.0.113.2"])


class StatusShowsIt(OutageCase):
    @inlineCallbacks
    def test_status_and_page_show_the_mode_and_the_journal(self):
        """/status and the status page show outage mode, the upstream down and the journal's
        size while a request waits in it (and no request data)."""
        running, relay = self.start()
        yield relay.down()
        resp, _ = yield self.get(running, "/q/status-open", "198.51.100.9", "ua-status")
        self.assertEqual(resp.code, 200)
        pool = HTTPConnectionPool(reactor, persistent=False)
        base = f"http://127.0.0.1:{running.admin_port}"
        resp = yield treq.get(base + "/status", pool=pool)
        status = yield resp.json()
        outage = status["outage"]
        self.assertEqual((outage["mode"], outage["upstream"]), ("replay", "down"))
        self.assertEqual(outage["journal"]["entries"], 1)
        self.assertNotIn("status-open", str(outage))
        resp = yield treq.get(base + "/", pool=pool)
        page = yield resp.text()
        self.assertIn("<h2>Outage mode</h2>", page)
        self.assertIn("1 request(s)", page)
        relay.up()
