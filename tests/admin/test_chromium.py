"""The HTML status page in a real browser: headless Chromium (Debian's ``chromium``) loads the
admin page of a running proxy, one with a failing renewal after an hour of traffic (on a fake
clock: the charts of the last hour are full), and one of 10,000 domains (the order queue's
line, problems first, then a page of the table with places in the queue); all are
screenshotted. The charts' size as laid out is measured in a copy of the DOM with a script
added (the page itself has none and may run none).

Set TRACKINGPROXY_STATUS_SCREENSHOT=docs/status-page.png to refresh the README's screenshot
(the page after the hour of traffic).
Chromium is installed with apt-get when missing (``make debs`` lists it too); under CI=true a
missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import datetime
import html
import math
import os
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.admin import scale
from tests.admin.test_status import (
    FakeCertificates,
    FakeListener,
    FakePort,
    FakeRenewals,
    FakeRequest,
    state,
)
from tests.harness import DOMAIN, DOMAIN2, client, start_proxy, stop_proxy
from trackingproxy.admin.collector import StatusCollector
from trackingproxy.admin.history import History, counters_of
from trackingproxy.admin.metrics import ProxyMetrics
from trackingproxy.admin.resources import AdminSite, admin_resource
from trackingproxy.admin.status import RateTracker, StatusSource
from trackingproxy.tls.certificates import LoadedCertificate

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)
DAY = datetime.timedelta(days=1)
CHARTS = ("chart-requests", "chart-errors", "chart-latency")
MEASURE = """<script>
const sizes = Array.from(document.querySelectorAll("svg"), (svg) => {
  const box = svg.getBoundingClientRect();
  return `${svg.id} ${Math.round(box.width)} ${Math.round(box.height)}`;
});
const pre = document.createElement("pre");
pre.id = "svg-sizes";
pre.textContent = sizes.join("\\n");
document.body.appendChild(pre);
</script>"""


def chromium() -> str:
    """The browser's path; installs Debian's chromium when missing and we may."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=False, timeout=900
        )
        found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise AssertionError(
                "chromium is not installed: run `make debs` (apt-get install chromium)"
            )
        raise SkipTest("chromium is not installed (apt-get install chromium)")
    return found


def png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the first rows) of an 8-bit RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return width, height, len(set(raw[: 4 * width * 200]))


def cert(
    name: str, issuer: x509.Name, start: datetime.datetime, days: int, source: str = ""
) -> LoadedCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return LoadedCertificate(key=key, chain=(leaf,), source=source or f"ACME ({name})")


def issuer(cn: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


class ChromiumTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.browser = chromium()
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir(parents=True)

    def run_browser(self, *args: str) -> Any:
        profile = self.tmp / f"profile-{len(list(self.tmp.iterdir()))}"
        return getProcessOutputAndValue(
            self.browser,
            [*FLAGS, f"--user-data-dir={profile}", *args],
            env=dict(os.environ),
        )

    @inlineCallbacks
    def look(self, url: str, png: Path):
        """The page's DOM as Chromium built it, and a 1100x1000 screenshot in ``png``."""
        out, err, code = yield self.run_browser("--dump-dom", url)
        self.assertEqual(code, 0, err[-2000:])
        out2, err2, code2 = yield self.run_browser(
            f"--screenshot={png}", "--window-size=1100,1000", url
        )
        self.assertEqual(code2, 0, err2[-2000:])
        width, height, colours = png_facts(png.read_bytes())
        self.assertEqual((width, height), (1100, 1000))
        self.assertGreater(colours, 20)  # not a blank or error page
        return out.decode()

    @inlineCallbacks
    def svg_sizes(self, dom: str):
        """{id: (width, height)} of every ``<svg>`` of ``dom`` as Chromium lays it out in a
        1100x1000 window (a copy of the DOM with a measuring script, opened from a file)."""
        page = self.tmp / f"measure-{len(list(self.tmp.iterdir()))}.html"
        page.write_text(dom.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
        out, err, code = yield self.run_browser(
            "--window-size=1100,1000", "--dump-dom", page.resolve().as_uri()
        )
        self.assertEqual(code, 0, err[-2000:])
        found = re.search(r'<pre id="svg-sizes">(.*?)</pre>', out.decode(), re.S)
        assert found is not None, out[-2000:]
        sizes = {}
        for line in found.group(1).splitlines():
            name, width, height = line.split()
            sizes[name] = (int(width), int(height))
        return sizes

    @inlineCallbacks
    def assert_charts_drawn(self, dom: str):
        """The three charts are in ``dom`` and laid out side by side at a readable size."""
        for name in CHARTS:
            self.assertIn(f'id="{name}"', dom)
        sizes = yield self.svg_sizes(dom)
        self.assertEqual(sorted(sizes), sorted(CHARTS))
        for name, (width, height) in sizes.items():
            self.assertGreater(width, 250, name)
            self.assertGreater(height, 140, name)

    @inlineCallbacks
    def test_status_page_of_a_running_proxy(self):
        """The real proxy's page: both domains, issuer, timeline, and charts of this minute."""
        running = start_proxy(self.tmp)
        self.addCleanup(stop_proxy, running)
        http = client(running)
        for path, scheme in (("/q/a", "https"), ("/f/b", "http"), ("/q/c", "https")):
            resp = yield http.get(running.url(path, scheme), allow_redirects=False)
            yield resp.content()
        dom = yield self.look(f"http://127.0.0.1:{running.admin_port}/", self.tmp / "proxy.png")
        self.assertIn("<h1>trackingproxy</h1>", dom)
        self.assertIn('class="badge ok">ready<', dom)
        for name in (DOMAIN, DOMAIN2):
            self.assertIn(f'<td class="name">{name}</td>', dom)
        self.assertIn("trustme", dom)  # the issuer
        self.assertIn('class="mark now', dom)
        self.assertIn("opens (/q/)", dom)
        yield self.assert_charts_drawn(dom)
        charts = dom[dom.index('<section id="charts">') :]
        requests = charts[: charts.index('id="figure-errors"')]
        self.assertIn("(so far): opens (/q/) 2, clicks (/f/) 1", requests)  # this minute
        self.assertIn('<rect x="', requests)
        latency = charts[charts.index('id="chart-latency"') :]
        self.assertRegex(latency, r"p50 [\d.]+ ms, p99 [\d.]+ ms \(\d responses\)")

    @inlineCallbacks
    def test_status_page_with_a_failing_renewal(self):
        """Three domains after an hour of traffic: the error, the retry and the charts show."""
        now = datetime.datetime(2026, 11, 27, 9, 30, tzinfo=datetime.UTC)
        clock = Clock()
        clock.advance(now.timestamp() - 3600)
        le = issuer("R11", "Let's Encrypt")
        a, b, c = "click.example.com", "click.example.org", "links.example.net"
        certs = FakeCertificates(
            (a, b, c),
            {
                a: cert(a, le, now - 31 * DAY, 90),
                b: cert(b, le, now - 80 * DAY, 90),
                c: cert(
                    c,
                    issuer("Sectigo RSA DV CA", "Sectigo Limited"),
                    now - 200 * DAY,
                    397,
                    "--cert /etc/ssl/links.example.net.pem",
                ),
            },
        )
        renewals = FakeRenewals(
            {
                a: state(now + 29 * DAY + 5 * 3600 * datetime.timedelta(seconds=1), issued=2),
                b: state(
                    now + 47 * 60 * datetime.timedelta(seconds=1),
                    3,
                    f"{b}: validation failed: DNS for {b} points to 203.0.113.7, not here; make "
                    f"sure DNS for {b} points to this host and port 80 is reachable",
                    now - 2 * 3600 * datetime.timedelta(seconds=1),
                    issued=1,
                    failed=3,
                ),
            }
        )
        metrics = ProxyMetrics(lambda: {a, b, c}, process_metrics=False)
        rates = RateTracker(clock, metrics.totals_by_kind)
        history = History(clock, counters_of(metrics))
        an_hour_of_traffic(clock, metrics, rates, history, (a, a, b, c), now.timestamp())
        for _ in range(12):
            metrics.site("https").connection_opened()
        source = StatusSource(
            clock=clock,
            certificates=certs,
            https_enabled=True,
            listeners=lambda: [
                FakeListener("--http-port", "tcp:80", FakePort(80)),
                FakeListener("--https-port", "tcp:443", FakePort(443)),
            ],
            renewals=lambda: renewals,
            metrics=metrics,
            rates=rates,
            in_flight=lambda: 3,
            started=now.timestamp() - 5 * 86400,
        )
        admin = AdminSite(admin_resource(source, metrics.registry, history), reactor)
        port = reactor.listenTCP(0, admin, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        png = self.tmp / "status-page.png"
        dom = yield self.look(f"http://127.0.0.1:{port.getHost().port}/", png)
        self.assertIn("last renewal error", dom)
        self.assertIn("points to 203.0.113.7", dom)
        self.assertIn("R11 (Let's Encrypt)", dom)
        self.assertIn("retry 2026-11-27 10:17 UTC", dom)
        self.assertIn("certificate you provide", dom)
        yield self.assert_charts_drawn(dom)
        charts = dom_text(dom)
        charts = charts[charts.index("Last hour") : charts.index("Domains and certificates")]
        for label in ("4xx answers", "502 upstream connect", "504 upstream timeout", "other 5xx"):
            self.assertIn(label, charts)
        self.assertIn("08:29 to 09:30 UTC", charts)
        for tick in ("08:40", "09:00", "09:20"):
            self.assertIn(tick, charts)
        requests = dom[dom.index('id="chart-requests"') : dom.index('id="figure-errors"')]
        self.assertEqual(requests.count("UTC: opens"), 60)  # one bar a minute
        self.assertEqual(requests.count("UTC (so far): opens"), 1)  # and this one
        target = os.environ.get("TRACKINGPROXY_STATUS_SCREENSHOT")
        if target:
            shutil.copyfile(png, target)

    @inlineCallbacks
    def test_status_page_of_10000_domains(self):
        """10,000 domains load in Chromium: the order queue's line, problems, then the table
        (with places in the queue); pages and search work."""
        scale.certificates()
        fleet = scale.fleet()
        fleet.metrics.registry.register(StatusCollector(fleet.source))
        admin = AdminSite(admin_resource(fleet.source, fleet.metrics.registry), reactor)
        port = reactor.listenTCP(0, admin, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}/"
        dom = yield self.look(base, self.tmp / "fleet.png")
        text = dom_text(dom)
        problems = [
            scale.name(i) for i in (*scale.MISSING, *scale.EXPIRING[::-1], *scale.FAILING)
        ]
        order = [text.index(n) for n in ("Problems", *problems, "Domains and certificates")]
        self.assertEqual(order, sorted(order))
        self.assertLess(order[-1], text.index(scale.name(0)))
        self.assertIn("1\u201350 of 10,000 domains", text)
        self.assertIn("page 1 of 200", text)
        self.assertIn("points elsewhere", text)
        self.assertEqual(len(re.findall(r'<tr><td class="name">', dom)), 50)
        queue = text.index("1,000 domains wait for a certificate order; 4 running;")
        self.assertLess(queue, order[0])  # the order queue's line opens the page
        row = text[text.index(scale.name(0), order[-1]) : text.index(scale.name(1), order[-1])]
        self.assertIn("queued #6, starts ~00:00 UTC", row)

        last = dom_text((yield self.look(base + "?page=200", self.tmp / "last.png")))
        self.assertIn("9,951\u201310,000 of 10,000 domains", last)
        self.assertIn(scale.name(9950), last)
        found = dom_text((yield self.look(base + "?q=click0999", self.tmp / "q.png")))
        self.assertIn("1\u201310 of 10 domains matching \u201cclick0999\u201d (10,000 in all)", found)


def an_hour_of_traffic(
    clock: Clock,
    metrics: ProxyMetrics,
    rates: RateTracker,
    history: History,
    domains: tuple[str, ...],
    end: float,
) -> None:
    """Sixty minutes of opens and clicks (in waves), a few 404s and 421s, connection failures
    at minute 22, a burst of timeouts and slow answers at 41-45 and SparkPost's own 503s at
    52, sampled as the admin listener would (``rates`` every 10 s, ``history`` every
    minute), then 25 s of the minute in progress; ``clock`` ends at ``end``."""
    rnd = random.Random(16)
    https, http = metrics.site("https"), metrics.site("http")

    def answer(path: bytes, code: int, seconds: float | None, cause: str | None) -> None:
        host = "-" if code == 421 else rnd.choice(domains)
        if seconds is not None:
            metrics.upstream_count += 1
            metrics.upstream_latency.observe(seconds)
        if cause is not None:
            metrics.upstream_count += 1
            metrics.upstream_error(cause)
        site = http if rnd.random() < 0.15 else https
        protocol = b"HTTP/2" if rnd.random() < 0.6 else b"HTTP/1.1"
        site.request_done(FakeRequest(path, code, host, protocol))

    def minute(m: int, seconds: float) -> None:
        share = seconds / 60
        wave = 1 + 0.45 * math.sin(m / 60 * 2 * math.pi * 1.2 + 0.6)
        slow = 41 <= m <= 45
        events: list[tuple[bytes, int, float | None, str | None]] = []
        for path, code, mean in ((b"/q/x", 200, 46), (b"/f/x", 302, 21)):
            for _ in range(int(share * (mean * wave + rnd.randint(0, 8)))):
                latency = rnd.lognormvariate(math.log(0.28 if slow else 0.07), 0.45)
                if rnd.random() < (0.08 if slow else 0.015):
                    latency += rnd.uniform(0.3, 6.0 if slow else 1.2)
                events.append((path, code, latency, None))
        events += [(b"/favicon.ico", 404, None, None)] * rnd.randint(0, 2)
        events += [(b"/q/x", 421, None, None)] * (rnd.random() < 0.2)
        events += [(b"/f/x", 504, None, "timeout")] * (rnd.randint(3, 9) if slow else 0)
        events += [(b"/f/x", 502, None, "connect")] * (rnd.randint(2, 4) if m in (22, 23) else 0)
        events += [(b"/q/x", 503, 0.05, None)] * (3 if m == 52 else 0)
        rnd.shuffle(events)
        steps = max(1, round(seconds / 10))
        for step in range(steps):
            for event in events[step::steps]:
                answer(*event)
            clock.advance(seconds / steps)
            rates.sample()

    clock.advance(end - 3600 - 25 - clock.seconds())
    rates.sample()
    history.sample()
    for m in range(60):
        minute(m, 60)
        history.sample()
    minute(60, 25)


def dom_text(dom: str) -> str:
    """The text of a DOM dump in document order (tags dropped, entities decoded)."""
    body = dom[dom.index("<body") :]
    return html.unescape(re.sub(r"<[^>]+>", " ", body))
