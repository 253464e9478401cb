"""The HTML status page in a real browser: headless Chromium (Debian's ``chromium``) loads the
admin page of a running proxy, one with a failing renewal, and one of 10,000 domains (problems
first, then a page of the table); all are screenshotted.

Set TRACKINGPROXY_STATUS_SCREENSHOT=docs/status-page.png to refresh the README's screenshot.
Chromium is installed with apt-get when missing (``make debs`` lists it too); under CI=true a
missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import datetime
import html
import os
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
    def test_status_page_of_a_running_proxy(self):
        """The real proxy's admin page renders both domains with their issuer and timeline."""
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

    @inlineCallbacks
    def test_status_page_with_a_failing_renewal(self):
        """Three domains on the real admin Site: the error and the planned retry are shown."""
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
        rates.sample()
        sites = (metrics.site("https"), metrics.site("http"))
        for i in range(3600):
            site = sites[i % 5 == 0]
            domain = (a, a, b, c)[i % 4]
            if i % 3 == 0:
                site.request_done(FakeRequest(b"/f/x", 302, domain))
            else:
                site.request_done(FakeRequest(b"/q/x", 200, domain, b"HTTP/2"))
            if i % 10 == 0:
                clock.advance(10)
                rates.sample()
        sites[0].request_done(FakeRequest(b"/f/x", 421, "-"))
        for _ in range(12):
            sites[0].connection_opened()
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
        admin = AdminSite(admin_resource(source, metrics.registry), reactor)
        port = reactor.listenTCP(0, admin, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        png = self.tmp / "status-page.png"
        dom = yield self.look(f"http://127.0.0.1:{port.getHost().port}/", png)
        self.assertIn("last renewal error", dom)
        self.assertIn("points to 203.0.113.7", dom)
        self.assertIn("R11 (Let's Encrypt)", dom)
        self.assertIn("retry 2026-11-27 10:17 UTC", dom)
        self.assertIn("certificate you provide", dom)
        target = os.environ.get("TRACKINGPROXY_STATUS_SCREENSHOT")
        if target:
            shutil.copyfile(png, target)

    @inlineCallbacks
    def test_status_page_of_10000_domains(self):
        """10,000 domains load in Chromium, problems before the table; pages and search work."""
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

        last = dom_text((yield self.look(base + "?page=200", self.tmp / "last.png")))
        self.assertIn("9,951\u201310,000 of 10,000 domains", last)
        self.assertIn(scale.name(9950), last)
        found = dom_text((yield self.look(base + "?q=click0999", self.tmp / "q.png")))
        self.assertIn("1\u201310 of 10 domains matching \u201cclick0999\u201d (10,000 in all)", found)


def dom_text(dom: str) -> str:
    """The text of a DOM dump in document order (tags dropped, entities decoded)."""
    body = dom[dom.index("<body") :]
    return html.unescape(re.sub(r"<[^>]+>", " ", body))
