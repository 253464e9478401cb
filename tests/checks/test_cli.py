"""`trackingproxy check` on loopback: a real DNS server (twisted.names.server), the real proxy
(tests/harness.py) with the stand-in upstream, an upstream that routes by Host as SparkPost does,
bare TLS servers with bad certificates, and the console command and `twistd trackingproxy
--check` as subprocesses."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import authority, dns, server
from twisted.names.client import Resolver
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.certs import ServerTLS, issue, make_ca
from tests.harness import DOMAIN, DOMAIN2, proxy_args, start_proxy, stop_proxy
from tests.standin import StandIn, start_standin
from trackingproxy.checks.cli import CheckOptions, execute
from trackingproxy.checks.dnscheck import SPARKPOST_HOSTS, SPARKPOST_SUFFIXES, judge, resolve

ROOT = Path(__file__).resolve().parent.parent
SPGO_ADDRESS = "127.0.0.66"
V2_ADDRESS = "127.0.0.68"  # v2.spgo.io in the test zone: a Host-routing upstream listens there
PROBE = "/f/a/b/c/d"
LANDING = "https://www.example.com/landing?utm=1"
ZONE: dict[str, list[Any]] = {
    DOMAIN: [dns.Record_A("127.0.0.1", ttl=60)],
    DOMAIN2: [dns.Record_A("127.0.0.1", ttl=60)],
    "alias.example.com": [dns.Record_CNAME(b"click.example.com", ttl=60)],
    "sp.example.com": [dns.Record_CNAME(b"spgo.io", ttl=60)],
    "spv2.example.com": [dns.Record_CNAME(b"eu.v2.spgo.io", ttl=60)],
    "spent.example.com": [dns.Record_CNAME(b"acme.et.e.sparkpost.com", ttl=60)],
    "spaddr.example.com": [dns.Record_A(SPGO_ADDRESS, ttl=60)],
    "away.example.com": [dns.Record_A("198.51.100.7", ttl=60)],
    "half.example.com": [dns.Record_A("127.0.0.1", ttl=60), dns.Record_A("198.51.100.7", ttl=60)],
    "v6.example.com": [dns.Record_AAAA("::1", ttl=60)],
    "wrong.example.com": [dns.Record_A("127.0.0.1", ttl=60)],
    "old.example.com": [dns.Record_A("127.0.0.1", ttl=60)],
}
SPGO_ZONE: dict[str, list[Any]] = {
    "spgo.io": [dns.Record_A(SPGO_ADDRESS, ttl=60)],
    "eu.spgo.io": [dns.Record_A("127.0.0.67", ttl=60)],
    "v2.spgo.io": [dns.Record_A(V2_ADDRESS, ttl=60)],
}


class _Zone(authority.FileAuthority):
    """An authority for `origin` holding the records of a dict (name -> records)."""

    def __init__(self, origin: str, records: dict[str, list[Any]]) -> None:
        self._origin = origin
        self._dict = records
        super().__init__(origin)

    def loadFile(self, filename: Any) -> None:
        origin = self._origin.encode()
        self.soa = (  # type: ignore[assignment]
            origin,
            dns.Record_SOA(b"ns." + origin, b"hostmaster." + origin, serial=1, minimum=60, expire=60),
        )
        records = {k.encode(): v for k, v in self._dict.items()}
        records.setdefault(origin, []).append(self.soa[1])  # type: ignore[index]
        self.records = records  # type: ignore[assignment]


def start_dns() -> Any:
    """A DNS server on 127.0.0.1 (UDP, ephemeral port) authoritative for example.com and spgo.io."""
    factory = server.DNSServerFactory(
        authorities=[_Zone("example.com", ZONE), _Zone("spgo.io", SPGO_ZONE)]
    )
    factory.noisy = False
    return reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")


class _Redirect(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", b"https://www.example.com/")
        return b""


def start_tls_server(leaf: Any) -> Any:
    """A bare HTTPS server on 127.0.0.1 serving `leaf` for every name (no SNI logic)."""
    return reactor.listenSSL(0, Site(_Redirect()), ServerTLS(leaf), interface="127.0.0.1")


class _Routing(Resource):
    """An upstream that routes by Host as SparkPost does: a click redirect for the tracking
    domains it holds, 404 for any other Host; it records (path, Host) of every request."""

    isLeaf = True

    def __init__(self, serves: set[str]) -> None:
        super().__init__()
        self.serves = serves
        self.seen: list[tuple[bytes, bytes]] = []

    def render_GET(self, request: Any) -> bytes:
        host = request.requestHeaders.getRawHeaders(b"host", [b""])[0]
        self.seen.append((request.uri, host))
        request.setHeader(b"server", b"msys-http")
        if host.decode() not in self.serves:
            request.setResponseCode(404)
            return b"not found"
        request.setResponseCode(302)
        request.setHeader(b"location", LANDING.encode())
        return b""


def start_routing(ca: Any, *serves: str) -> tuple[StandIn, Any, _Routing]:
    """The Host-routing upstream holding `serves`, on 127.0.0.1 (as a StandIn for the proxy)
    and on V2_ADDRESS (v2.spgo.io for the check); its certificate is for both names."""
    routing = _Routing(set(serves))
    tls = ServerTLS(ca.issue_cert("127.0.0.1", "v2.spgo.io"))
    standin = StandIn(port=reactor.listenSSL(0, Site(routing), tls, interface="127.0.0.1"))
    as_v2 = reactor.listenSSL(0, Site(routing), tls, interface=V2_ADDRESS)
    return standin, as_v2, routing


def replace_upstream(args: list[str], url: str) -> list[str]:
    """The check's arguments with `--upstream` pointing at `url` instead."""
    at = args.index("--upstream") + 1
    return [*args[:at], url, *args[at + 1 :]]


class CheckTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dns_port = start_dns()
        self.addCleanup(self.dns_port.stopListening)
        self.dns_address = f"127.0.0.1:{self.dns_port.getHost().port}"
        self.tmp = Path(self.mktemp()).resolve()
        self.tmp.mkdir(parents=True)

    def resolver(self) -> Resolver:
        return Resolver(servers=[("127.0.0.1", self.dns_port.getHost().port)], reactor=reactor)

    def run_check(self, args: list[str]) -> Deferred[tuple[int, list[str]]]:
        opts = CheckOptions(environ={})
        opts.parseOptions(["--resolver", self.dns_address, "--timeout", "3", *args])
        lines: list[str] = []
        d = execute(opts, reactor, lines.append, addresses=frozenset({"192.0.2.200"}))
        return d.addCallback(lambda status: (status, lines))

    def start(self, *extra: str, **kw: Any) -> Any:
        running = start_proxy(self.tmp, *extra, **kw)
        self.addCleanup(stop_proxy, running)
        ca_file = self.tmp / "ca.pem"
        running.ca.cert_pem.write_to_path(str(ca_file))
        self.ca_file = str(ca_file)
        return running

    def check_args(self, running: Any, *domains: str) -> list[str]:
        """The proxy's own options (as a user would pass them) plus the check-only ones."""
        args = proxy_args(self.tmp, running.ca, running.standin)
        args = [a for a in args if not a.startswith("tcp:0")]
        args = [a for a in args if a not in ("--http-port", "--https-port", "--admin-port")]
        if domains:
            kept: list[str] = []
            skip = False
            for a in args:
                if skip:
                    skip = False
                    continue
                if a == "--domain":
                    skip = True
                    continue
                kept.append(a)
            args = kept + [x for d in domains for x in ("--domain", d)]
        return [
            *args,
            "--http-port",
            f"tcp:{running.http_port}",
            "--https-port",
            f"tcp:{running.https_port}:interface=127.0.0.1",
            "--expect-address",
            "127.0.0.1",
            "--ca-bundle",
            self.ca_file,
        ]

    # DNS ------------------------------------------------------------------------------------

    @inlineCallbacks
    def dns_verdict(self, name: str, expected: frozenset[str] = frozenset({"127.0.0.1"})) -> Any:
        resolution = yield Deferred.fromCoroutine(
            resolve(self.resolver(), name, (1, 2), stop_at=(*SPARKPOST_HOSTS, *SPARKPOST_SUFFIXES))
        )
        return judge(resolution, expected, True, frozenset({SPGO_ADDRESS}))

    @inlineCallbacks
    def test_dns_points_here(self):
        """An A record with this host's address is OK and says so; a CNAME chain is shown."""
        finding = yield self.dns_verdict(DOMAIN)
        self.assertEqual(finding.line(), "OK   dns  click.example.com -> 127.0.0.1 (this host)")
        finding = yield self.dns_verdict("alias.example.com")
        self.assertEqual(
            finding.line(),
            "OK   dns  alias.example.com -> CNAME click.example.com -> 127.0.0.1 (this host)",
        )
        finding = yield self.dns_verdict("v6.example.com", frozenset({"::1"}))
        self.assertEqual(finding.line(), "OK   dns  v6.example.com -> ::1 (this host)")

    @inlineCallbacks
    def test_dns_still_at_sparkpost(self):
        """A CNAME to spgo.io, or spgo.io's own address, is reported as still SparkPost."""
        finding = yield self.dns_verdict("sp.example.com")
        self.assertTrue(
            finding.line().startswith(
                "FAIL dns  sp.example.com -> CNAME spgo.io: still points at SparkPost (spgo.io)"
            ),
            finding.line(),
        )
        self.assertIn("point the domain here (127.0.0.1)", finding.line())
        finding = yield self.dns_verdict("spaddr.example.com")
        self.assertIn("still points at SparkPost (SparkPost's addresses)", finding.line())

    @inlineCallbacks
    def test_dns_still_at_a_v2_or_enterprise_endpoint(self):
        """A CNAME to a V2 endpoint or to an Enterprise tenant's endpoint is still SparkPost."""
        finding = yield self.dns_verdict("spv2.example.com")
        self.assertTrue(
            finding.line().startswith(
                "FAIL dns  spv2.example.com -> CNAME eu.v2.spgo.io: still points at SparkPost "
                "(eu.v2.spgo.io), not at this host"
            ),
            finding.line(),
        )
        finding = yield self.dns_verdict("spent.example.com")
        self.assertIn(
            "-> CNAME acme.et.e.sparkpost.com: still points at SparkPost (acme.et.e.sparkpost.com)",
            finding.line(),
        )

    @inlineCallbacks
    def test_dns_elsewhere_and_partly(self):
        """Addresses that are not this host's fail, with the fix; a mix names the stray ones."""
        finding = yield self.dns_verdict("away.example.com")
        self.assertEqual(
            finding.line(),
            "FAIL dns  away.example.com -> 198.51.100.7 (not this host); "
            "point the domain here (127.0.0.1)",
        )
        finding = yield self.dns_verdict("half.example.com")
        self.assertIn("127.0.0.1 (this host), 198.51.100.7 (not this host)", finding.line())
        self.assertIn("remove the records for 198.51.100.7", finding.line())

    @inlineCallbacks
    def test_dns_nxdomain(self):
        """A name that does not exist fails as NXDOMAIN, with what record to create."""
        finding = yield self.dns_verdict("gone.example.com")
        self.assertEqual(
            finding.line(),
            "FAIL dns  gone.example.com: no such domain (NXDOMAIN); create an A/AAAA record "
            "pointing here (127.0.0.1), or a CNAME to this host's name",
        )

    @inlineCallbacks
    def test_dns_server_unreachable(self):
        """No DNS server answering: a FAIL line (timeout), the rest skipped, status 1."""
        silent = reactor.listenUDP(0, _Silent(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        opts = CheckOptions(environ={})
        opts.parseOptions(
            [
                "--domain", DOMAIN, "--resolver", f"127.0.0.1:{silent.getHost().port}",
                "--timeout", "3", "--upstream", "https://127.0.0.1:9", "--no-acme",
            ]
        )  # fmt: skip
        lines: list[str] = []
        status = yield execute(opts, reactor, lines.append, addresses=frozenset({"127.0.0.1"}))
        self.assertEqual(status, 1)
        self.assertIn(
            "FAIL dns  click.example.com: DNS lookup failed (no answer within 3 s); check the "
            "DNS servers in /etc/resolv.conf (or --resolver) and try again",
            lines,
        )
        self.assertTrue(lines[-1].startswith("SKIP port click.example.com"), lines)
        self.assertTrue(lines[0].startswith("FAIL upstream https://127.0.0.1:9: cannot connect"))

    # The real proxy -------------------------------------------------------------------------

    @inlineCallbacks
    def test_everything_ok_exits_0(self):
        """Real proxy and stand-in: all lines OK, status 0; the upstream saw only /f/a/b/c/d."""
        running = self.start()
        status, lines = yield self.run_check(self.check_args(running))
        self.assertEqual(status, 0, "\n".join(lines))
        kinds = [line.split()[:2] for line in lines]
        self.assertEqual(
            kinds,
            [["OK", "upstream"]]
            + [["OK", "dns"], ["OK", "upstream"], ["OK", "port"], ["OK", "probe"], ["OK", "port"],
               ["OK", "cert"], ["OK", "probe"]] * 2,
        )  # fmt: skip
        upstream = f"https://127.0.0.1:{running.standin.port.getHost().port}"
        self.assertIn(
            f"OK   upstream {upstream} serves click.example.com: GET {PROBE} with Host "
            f"click.example.com -> 302 to {LANDING} (Server: msys-http)",
            lines,
        )
        self.assertIn(
            f"OK   port click.example.com: port {running.https_port} at 127.0.0.1 answers (https)",
            lines,
        )
        cert = next(line for line in lines if line.startswith("OK   cert click.example.com"))
        self.assertRegex(cert, r"valid for the name, chain verifies .* expires in \d+ days")
        self.assertIn(
            f"OK   probe https://click.example.com{PROBE} -> 302 to {LANDING}, as the upstream "
            "answers it",
            lines,
        )
        seen = running.standin.seen
        self.assertEqual([s.uri for s in seen], [PROBE.encode()] * 6)
        direct = [s for s in seen if b"x-forwarded-for" not in s.headers]  # not via the proxy
        self.assertEqual(
            [s.headers[b"host"] for s in direct], [[DOMAIN.encode()], [DOMAIN2.encode()]]
        )

    @inlineCallbacks
    def test_certificate_expiring_soon_and_untrusted(self):
        """A certificate with 3 days left is a WARN line with the fix, status 1; without the
        test CA the chain does not verify (FAIL)."""
        ca = make_ca()
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3, hours=1)
        from tests.certs import write_pair

        cert, key = write_pair(issue(ca, DOMAIN, DOMAIN2, not_after=soon), self.tmp, "soon")
        running = self.start("--cert", str(cert), "--key", str(key), ca=ca)
        status, lines = yield self.run_check(self.check_args(running, DOMAIN))
        self.assertEqual(status, 1)
        warn = [line for line in lines if not line.startswith("OK")]
        self.assertEqual(len(warn), 1, lines)
        self.assertRegex(
            warn[0],
            r"^WARN cert click\.example\.com: expires in 3 days \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\); "
            "renewal is failing or off",
        )
        args = self.check_args(running, DOMAIN)
        args = args[: args.index("--ca-bundle")]
        status, lines = yield self.run_check(args)
        self.assertEqual(status, 1)
        self.assertTrue(
            any(
                line.startswith("FAIL cert click.example.com: the certificate chain does not verify")
                for line in lines
            ),
            lines,
        )

    @inlineCallbacks
    def test_expired_and_wrong_name_certificates(self):
        """A server with an expired certificate, and one whose certificate is for another
        name, each give a FAIL cert line that says so, and status 1."""
        ca = make_ca()
        ca_file = self.tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        now = datetime.datetime.now(datetime.UTC)
        expired = ca.issue_cert(
            "old.example.com",
            not_before=now - datetime.timedelta(days=90),
            not_after=now - datetime.timedelta(days=2),
        )
        for name, leaf, expect in (
            ("old.example.com", expired, "FAIL cert old.example.com: the certificate expired on "),
            (
                "wrong.example.com",
                ca.issue_cert("other.example.net"),
                "FAIL cert wrong.example.com: the certificate served is for other.example.net, "
                "not wrong.example.com; pass a certificate that covers wrong.example.com",
            ),
        ):
            port = start_tls_server(leaf)
            self.addCleanup(port.stopListening)
            status, lines = yield self.run_check(
                [
                    "--domain", name, "--no-acme", "--upstream", "https://127.0.0.1:9",
                    "--http-port", "none", "--https-port", f"tcp:{port.getHost().port}",
                    "--expect-address", "127.0.0.1", "--ca-bundle", str(ca_file),
                ]
            )  # fmt: skip
            self.assertEqual(status, 1)
            self.assertTrue(any(line.startswith(expect) for line in lines), lines)
            self.assertIn(f"SKIP port {name}: http is disabled ('none')", lines)

    @inlineCallbacks
    def test_upstream_down(self):
        """With the upstream gone: FAIL upstream (cannot connect) and the probes FAIL with 502."""
        running = self.start()
        args = self.check_args(running, DOMAIN)
        yield running.standin.port.stopListening()
        status, lines = yield self.run_check(args)
        self.assertEqual(status, 1)
        self.assertRegex(lines[0], r"^FAIL upstream https://127\.0\.0\.1:\d+: cannot connect to ")
        self.assertIn("connection refused", lines[0].lower())
        probes = [line for line in lines if " probe " in line]
        self.assertEqual(len(probes), 2)
        for line in probes:
            self.assertIn("-> 502, not a redirect; the proxy cannot reach the upstream", line)

    @inlineCallbacks
    def test_endpoint_does_not_serve_the_domain(self):
        """An endpoint 404ing a Host FAILs naming the other alias; the proxy is not blamed."""
        ca = make_ca()
        standin, as_v2, routing = start_routing(ca, DOMAIN2)
        self.addCleanup(as_v2.stopListening)
        running = self.start(ca=ca, standin=standin)
        v2 = f"https://v2.spgo.io:{as_v2.getHost().port}"  # the test DNS has v2.spgo.io here
        status, lines = yield self.run_check(replace_upstream(self.check_args(running), v2))
        self.assertEqual(status, 1, lines)
        self.assertTrue(lines[0].startswith(f"OK   upstream {v2} (us-v2): reachable at "), lines)
        self.assertIn(
            f"FAIL upstream {v2} (us-v2) does not serve click.example.com: GET {PROBE} with Host "
            "click.example.com -> 404 (Server: msys-http); SparkPost probably has the domain on "
            "the V1 endpoint spgo.io, or not set up: if its domain settings show spgo.io, pass "
            "--upstream us",
            lines,
        )
        for scheme in ("http", "https"):
            self.assertIn(
                f"FAIL probe {scheme}://click.example.com{PROBE} -> 404, not a redirect, as the "
                "upstream answers it; the proxy passes the upstream's answer on: see the upstream "
                "line for click.example.com",
                lines,
            )
        self.assertIn(
            f"OK   upstream {v2} (us-v2) serves click2.example.com: GET {PROBE} with Host "
            f"click2.example.com -> 302 to {LANDING} (Server: msys-http)",
            lines,
        )
        self.assertEqual(
            [line.split()[:2] for line in lines if "click2.example.com" in line],
            [["OK", "dns"], ["OK", "upstream"], ["OK", "port"], ["OK", "probe"], ["OK", "port"],
             ["OK", "cert"], ["OK", "probe"]],
        )  # fmt: skip
        self.assertEqual({uri for uri, _ in routing.seen}, {PROBE.encode()})
        self.assertEqual({host for _, host in routing.seen}, {DOMAIN.encode(), DOMAIN2.encode()})

    @inlineCallbacks
    def test_proxy_answer_differs_from_upstream(self):
        """A proxy forwarding elsewhere than --upstream: each probe FAILs as misconfigured."""
        ca = make_ca()
        stale, as_v2, _ = start_routing(ca)  # what the running proxy forwards to: holds nothing
        self.addCleanup(as_v2.stopListening)
        running = self.start(ca=ca, standin=stale)
        configured = start_standin(ca)  # the upstream the options name now: holds every domain
        assert configured.port is not None
        self.addCleanup(configured.port.stopListening)
        url = f"https://127.0.0.1:{configured.port.getHost().port}"
        args = replace_upstream(self.check_args(running, DOMAIN), url)
        status, lines = yield self.run_check(args)
        self.assertEqual(status, 1, lines)
        self.assertEqual(
            [line.split()[:2] for line in lines],
            [["OK", "upstream"], ["OK", "dns"], ["OK", "upstream"], ["OK", "port"],
             ["FAIL", "probe"], ["OK", "port"], ["OK", "cert"], ["FAIL", "probe"]],
        )  # fmt: skip
        for scheme in ("http", "https"):
            self.assertIn(
                f"FAIL probe {scheme}://click.example.com{PROBE} -> 404, but the upstream answers "
                "302 for click.example.com directly; the proxy is misconfigured: check that "
                "trackingproxy (not another web server) answers here and that it runs with "
                f"--upstream {url}, the endpoint this check asked",
                lines,
            )
        self.assertEqual([s.headers[b"host"] for s in configured.seen], [[DOMAIN.encode()]])

    @inlineCallbacks
    def test_upstream_resets_the_probe(self):
        """An upstream resetting every request: the direct probe FAILs, the 502s point at it."""
        running = self.start()
        running.standin.mode = "reset"
        status, lines = yield self.run_check(self.check_args(running, DOMAIN))
        self.assertEqual(status, 1, lines)
        self.assertTrue(lines[0].startswith("OK   upstream https://127.0.0.1:"), lines)
        self.assertRegex(
            lines[2],
            rf"^FAIL upstream https://127\.0\.0\.1:\d+ for click\.example\.com: GET {PROBE} with "
            r"Host click\.example\.com: no answer \(the upstream closed the connection .*\); the "
            "endpoint closed the connection without an answer: try again",
        )
        probes = [line for line in lines if " probe " in line]
        self.assertEqual(len(probes), 2, lines)
        for line in probes:
            self.assertIn(
                "-> 502, not a redirect; the proxy cannot reach the upstream: see the upstream line",
                line,
            )

    @inlineCallbacks
    def test_connect_to_checks_this_host_before_dns_moves(self):
        """DNS still at SparkPost: without --connect-to the port checks are skipped; with it
        they run against this host (the sibling-domain step of the migration)."""
        running = self.start()
        args = [a if a != DOMAIN2 else "sp.example.com" for a in self.check_args(running, DOMAIN2)]
        status, lines = yield self.run_check(args)
        self.assertEqual(status, 1)
        self.assertTrue(lines[-1].startswith("SKIP port sp.example.com"), lines)
        status, lines = yield self.run_check([*args, "--connect-to", "127.0.0.1"])
        self.assertEqual(status, 1)
        self.assertEqual(
            [line.split()[:2] for line in lines[3:]],
            [["OK", "upstream"], ["OK", "port"], ["FAIL", "probe"], ["OK", "port"], ["FAIL", "cert"]],
        )  # reached this host; it does not serve sp.example.com yet
        self.assertTrue(lines[0].startswith("FAIL conf the proxy would refuse to start: --cert"))
        self.assertIn(
            "-> 421, but the upstream answers 302 for sp.example.com directly; this server does "
            "not serve sp.example.com: add --domain sp.example.com",
            lines[5],
        )
        self.assertIn("TLS handshake at 127.0.0.1 port", lines[7])
        self.assertIn("make sure a certificate for sp.example.com is configured", lines[7])

    @inlineCallbacks
    def test_bad_input_is_one_line(self):
        """A bad domain, resolver or address is one error line and status 1, no traceback."""
        for args, expected in (
            (["--domain", "not a domain"], "--domain 'not a domain' is not a valid domain name"),
            (["--domain", DOMAIN, "--expect-address", "x"], "--expect-address 'x' is not an IP"),
            (["--domain", DOMAIN, "--resolver", "dns.example:53"], "--resolver 'dns.example:53'"),
            (["--domain", DOMAIN, "--timeout", "-1"], "--timeout '-1'"),
        ):
            opts = CheckOptions(environ={})
            opts.parseOptions(args)
            lines: list[str] = []
            status = yield execute(opts, reactor, lines.append, resolver=self.resolver())
            self.assertEqual(status, 1)
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("trackingproxy check: error: "), lines)
            self.assertIn(expected, lines[0])

    # Commands -------------------------------------------------------------------------------

    def command(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return getProcessOutputAndValue(
            sys.executable,
            list(args),
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})},
            path=str(self.tmp),
        )

    @inlineCallbacks
    def test_console_command_failing_setup(self):
        """`python -m trackingproxy.checks.cli check ...` prints one line per finding (no traceback)
        and exits 1 when the setup is broken (NXDOMAIN, upstream refused)."""
        out, err, code = yield self.command(
            "-m", "trackingproxy.checks.cli", "check",
            "--domain", "gone.example.com", "--resolver", self.dns_address, "--timeout", "3",
            "--upstream", "https://127.0.0.1:9", "--no-acme", "--expect-address", "127.0.0.1",
        )  # fmt: skip
        lines = out.decode().splitlines()
        self.assertEqual(code, 1, (out, err))
        self.assertNotIn(b"Traceback", out + err)
        self.assertEqual([line[:4] for line in lines], ["FAIL", "FAIL", "SKIP"], lines)
        self.assertTrue(lines[1].startswith("FAIL dns  gone.example.com: no such domain"))

    @inlineCallbacks
    def test_console_command_bad_option(self):
        """An unknown option or command: one line on stderr, exit 1."""
        out, err, code = yield self.command("-m", "trackingproxy.checks.cli", "check", "--bogus")
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(len(err.decode().splitlines()), 1, err)
        self.assertIn("--bogus", err.decode())
        out, err, code = yield self.command("-m", "trackingproxy.checks.cli", "serve")
        self.assertEqual(code, 1)
        self.assertIn("unknown command 'serve'", err.decode())

    @inlineCallbacks
    def test_twistd_check_all_ok(self):
        """`twistd trackingproxy --check` (check-only options from TRACKINGPROXY_*) runs the checks
        against the real proxy, prints the lines and exits 0 without serving anything."""
        running = self.start()
        args = self.check_args(running, DOMAIN)
        args = args[: args.index("--expect-address")]
        args = [a for a in args if a not in ("--cert", "--key") and not a.endswith((".crt", ".key"))]
        out, err, code = yield self.command(
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "trackingproxy",
            "--check",
            *args,
            env={
                "TRACKINGPROXY_RESOLVER": self.dns_address,
                "TRACKINGPROXY_EXPECT_ADDRESSES": "127.0.0.1",
                "TRACKINGPROXY_CA_BUNDLE": self.ca_file,
            },
        )
        lines = out.decode().splitlines()
        self.assertEqual(code, 0, (out, err))
        self.assertEqual([line[:4] for line in lines], ["OK  "] * 8, lines)
        self.assertFalse(any(self.tmp.glob("*.pid")))

    @inlineCallbacks
    def test_twistd_check_failing(self):
        """`twistd trackingproxy --check` exits 1 on a broken setup."""
        out, err, code = yield self.command(
            "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=",
            "trackingproxy", "--check", "--domain", "away.example.com", "--no-acme",
            "--upstream", "https://127.0.0.1:9",
            env={"TRACKINGPROXY_RESOLVER": self.dns_address, "TRACKINGPROXY_TIMEOUT": "3"},
        )  # fmt: skip
        self.assertEqual(code, 1, (out, err))
        self.assertIn(b"FAIL dns  away.example.com -> 198.51.100.7 (not this host)", out)
        self.assertNotIn(b"Traceback", out + err)


class _Silent(dns.DNSDatagramProtocol):
    """A UDP port that swallows DNS queries."""

    def __init__(self) -> None:
        super().__init__(None)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        pass


os.environ.pop("TRACKINGPROXY_DOMAINS", None)
