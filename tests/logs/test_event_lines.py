"""The process log, line by line: a proxy that starts, fails an upstream DNS lookup, serves an
open over HTTP/1.1 and a click over HTTP/2, renews a certificate and stops writes exactly the
lines below (variable parts masked) and nothing of Twisted's bookkeeping.

In process, on the real reactor: the upstream stand-in, a DNS server and the proxy on loopback;
the log is observed through the same filter the twistd process installs (``logs.quiet``).
"""

from __future__ import annotations

import datetime
import re
import shutil
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.names import client, dns, error, server
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.certs import make_ca
from tests.harness import DOMAIN
from tests.standin import start_standin
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.localca import LocalCA
from trackingproxy.acme.settings import AcmeParts, key_generator
from trackingproxy.acme.testing import FixedRandom
from trackingproxy.config import config_from_options
from trackingproxy.internals.twisted_private import stop_resolv_conf_timer
from trackingproxy.logs.quiet import quiet
from trackingproxy.options import Options
from trackingproxy.proxy.challenges import NoChallenges
from trackingproxy.service import build_service, build_upstream
from trackingproxy.store.files import FileStore

reactor: Any = global_reactor
# The local CA backdates by 5 minutes: with 306 s of lifetime after issuance, half of the
# whole (606 s) is left 3 s after issuance, when the issuer renews.
LIFETIME = datetime.timedelta(seconds=306)


class _Names:
    """A DNS server's answers for ``localhost``: NXDOMAIN until ``up``."""

    def __init__(self) -> None:
        self.up = False

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred[Any]:
        name = query.name.name.decode()
        if not self.up or name != "localhost" or query.type != dns.A:
            return fail(Failure(error.DomainError(name)))
        answer = dns.RRHeader(name=name, type=dns.A, ttl=60,
                              payload=dns.Record_A("127.0.0.1", ttl=60))
        return succeed(([answer], [], []))


def _mask(line: str) -> str:
    line = re.sub(r"\b[0-9a-f]{16,}\b", "SERIAL", line)
    line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "TIME", line)
    line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line)
    line = re.sub(r"localhost:\d+", "localhost:PORT", line)
    return re.sub(r"\S*local-ca\.pem", "DIR/local-ca.pem", line)


class EventLines(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = quiet(self.events.append, LogLevel.info)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self) -> list[str]:
        """The proxy's lines (the upstream stand-in's own access log, a twisted.web Site in
        this process, left out)."""
        return [
            _mask(f"{e.get('log_namespace', '-')}#{e['log_level'].name} {formatEvent(e)}")
            for e in self.events
            if not formatEvent(e).startswith('"127.0.0.1" - - [')
        ]

    @inlineCallbacks
    def test_the_exact_lines(self) -> Any:
        """Start, DNS failure, open (HTTP/1.1), click (HTTP/2), renewal, stop: these lines."""
        if shutil.which("curl") is None:
            self.fail("curl is not installed (`make debs` installs it)")
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        ca = make_ca()
        standin = start_standin(ca, reactor)
        self.addCleanup(standin.port.stopListening)  # type: ignore[union-attr]
        names = _Names()
        dns_factory = server.DNSServerFactory(clients=[names])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(dns_factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        empty = tmp / "empty"
        empty.write_text("")
        resolver = client.createResolver(
            servers=[("127.0.0.1", udp.getHost().port)], resolvconf=str(empty), hosts=str(empty)
        )
        self.addCleanup(stop_resolv_conf_timer, resolver)
        upstream_ca = tmp / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(upstream_ca))
        opts = Options(environ={})
        opts.parseOptions([
            "--domain", DOMAIN, "--upstream", f"https://localhost:{standin.port.getHost().port}",
            "--upstream-ca-bundle", str(upstream_ca), "--state-dir", str(tmp / "state"),
            "--http-port", "tcp:0:interface=127.0.0.1", "--https-port",
            "tcp:0:interface=127.0.0.1", "--admin-port", "none", "--access-log", "off",
        ])
        config = config_from_options(opts, datetime.datetime.now(datetime.UTC))
        state = tmp / "state"
        state.mkdir(mode=0o700)

        def short_lived_ca(settings: Any, domains: Any, skip: Any, sni: Any, r: Any) -> AcmeParts:
            top = MultiService()
            issuer = IssuingService(
                clock=r, store=FileStore(state, r), obtainer=LocalCA(state, r, lifetime=LIFETIME),
                sni=sni, domains=domains, key_generator=key_generator("ecdsa-p256"),
                rng=FixedRandom(0.5),
            )
            issuer.setServiceParent(top)
            return AcmeParts(top, NoChallenges(), issuer, (issuer,))

        proxy = build_service(
            config, reactor, upstream=build_upstream(config, reactor, resolver),
            acme_builder=short_lived_ca,
        )
        proxy.privilegedStartService()
        proxy.startService()
        ports = {c.option: c.port.getHost().port for c in proxy if getattr(c, "port", None)}
        http, https = ports["--http-port"], ports["--https-port"]
        while proxy.sni.certificate_for(DOMAIN) is None:
            yield deferLater(reactor, 0.05, lambda: None)
        first = proxy.sni.certificate_for(DOMAIN)
        curl = ["--silent", "--output", "/dev/null", "--write-out", "%{http_code}"]
        out, _, _ = yield getProcessOutputAndValue(
            "curl", [*curl, "-H", f"Host: {DOMAIN}", f"http://127.0.0.1:{http}/q/open"])
        self.assertEqual(out, b"502")  # no DNS answer for the upstream yet
        names.up = True
        out, _, _ = yield getProcessOutputAndValue(
            "curl", [*curl, "-H", f"Host: {DOMAIN}", f"http://127.0.0.1:{http}/q/open"])
        self.assertEqual(out, b"200")
        out, _, _ = yield getProcessOutputAndValue("curl", [
            *curl, "--http2", "--insecure", "--resolve", f"{DOMAIN}:{https}:127.0.0.1",
            f"https://{DOMAIN}:{https}/f/click"])
        self.assertEqual(out, b"302")
        while proxy.sni.certificate_for(DOMAIN) is first:
            yield deferLater(reactor, 0.1, lambda: None)
        yield proxy.stopService()
        yield proxy.upstream.close()
        expected = {
            "trackingproxy.service#info HTTP/2 engine: libnghttp2 1.52.0",
            "trackingproxy.ops.listeners#info --http-port listening on 127.0.0.1:PORT",
            "trackingproxy.ops.listeners#info --https-port listening on 127.0.0.1:PORT",
            "trackingproxy.acme.localca#warn Using the built-in local CA: its certificates are "
            "NOT publicly trusted; clients must trust DIR/local-ca.pem",
            f"trackingproxy.acme.issuer#info Certificates for {DOMAIN} come from the built-in "
            "local CA (NOT publicly trusted)",
            f"trackingproxy.acme.issuer#info {DOMAIN}: serving certificate SERIAL from "
            "CN=trackingproxy local root (not trusted),O=trackingproxy local CA, valid until TIME",
            f"trackingproxy.proxy.forward#warn upstream dns error for {DOMAIN}: DNS lookup of "
            "localhost failed: no such domain; answered 502",
        }
        seen = self.lines()
        engine = next((s for s in seen if "HTTP/2 engine" in s), "")
        expected = {engine if "HTTP/2 engine" in e else e for e in expected}
        self.assertEqual(set(seen), expected, "\n".join(seen))
        serving = [s for s in seen if ": serving certificate" in s]
        self.assertEqual(len(serving), 2)  # the first certificate, then its renewal
