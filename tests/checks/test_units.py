"""`trackingproxy check` logic without the network: findings, port parsing, interface addresses,
the DNS verdict and the certificate verdict (trustme certificates), settings from options."""

from __future__ import annotations

import datetime
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.certs import issue, make_ca, write_pair
from trackingproxy.checks.cli import CheckOptions
from trackingproxy.checks.dnscheck import Resolution, judge
from trackingproxy.checks.findings import Finding, Level, exit_status
from trackingproxy.checks.routing import Answer, judge_probe, judge_route
from trackingproxy.checks.served import judge_certificate
from trackingproxy.checks.settings import interface_addresses, public_port, settings_from_options
from trackingproxy.upstream.target import parse_upstream

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
URL = "https://click.example.com/f/a/b/c/d"
REDIRECT = Answer(302, "msys-http", "https://www.example.com/")


def leaf_chain(ca, *names, days_left: float, lifetime: float = 90):
    not_after = NOW + datetime.timedelta(days=days_left)
    leaf = ca.issue_cert(
        *names, not_before=not_after - datetime.timedelta(days=lifetime), not_after=not_after
    )
    from cryptography import x509

    return [x509.load_pem_x509_certificate(b.bytes()) for b in leaf.cert_chain_pems]


class FindingTests(SynchronousTestCase):
    def test_line_format_and_status(self):
        """Level and kind are padded like `OK   dns  ...`; WARN and FAIL give status 1."""
        ok = Finding(Level.OK, "dns", "click.example.com -> 203.0.113.10 (this host)")
        self.assertEqual(ok.line(), "OK   dns  click.example.com -> 203.0.113.10 (this host)")
        fail = Finding(Level.FAIL, "cert", "click.example.com: expired", "renew it")
        self.assertEqual(fail.line(), "FAIL cert click.example.com: expired; renew it")
        self.assertEqual(exit_status([ok, Finding(Level.SKIP, "port", "x")]), 0)
        self.assertEqual(exit_status([ok, Finding(Level.WARN, "cert", "x")]), 1)
        self.assertEqual(exit_status([ok, fail]), 1)


class SettingsTests(SynchronousTestCase):
    def test_public_port(self):
        """Listener endpoints map to the port clients reach; haproxy: means the public default."""
        self.assertEqual(public_port("tcp:8443:interface=::", 443), 8443)
        self.assertEqual(public_port("tcp:port=8080", 80), 8080)
        self.assertEqual(public_port("haproxy:tcp:8080", 80), 80)
        self.assertEqual(public_port("tcp6:443", 443), 443)
        self.assertIsNone(public_port("none", 443))
        self.assertEqual(public_port("unix:/run/x.sock", 80), 80)

    def test_interface_addresses_from_proc(self):
        """Global IPv4/IPv6 addresses are read from /proc; loopback and link-local are not."""
        proc = Path(self.mktemp())
        proc.mkdir()
        (proc / "fib_trie").write_text(
            "Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n"
            "     |-- 192.0.2.2\n        /32 host LOCAL\n     |-- 192.0.2.255\n"
            "        /32 link BROADCAST\n"
        )
        (proc / "if_inet6").write_text(
            "fd000000000000000000000000000002 04 40 00 82     eth0\n"
            "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
            "00000000000000000000000000000001 01 80 10 80       lo\n"
        )
        self.assertEqual(interface_addresses(proc), frozenset({"192.0.2.2", "fd00::2"}))
        self.assertEqual(interface_addresses(proc / "missing"), frozenset())

    def test_expired_cert_option_is_a_finding_not_a_stop(self):
        """An expired --cert (the proxy would refuse to start) is a FAIL conf finding, and the
        checks still get their settings; the expected addresses default to the interfaces."""
        tmp = Path(self.mktemp())
        tmp.mkdir()
        ca = make_ca()
        cert, key = write_pair(
            issue(ca, "click.example.com", not_after=NOW - datetime.timedelta(days=1)), tmp, "x"
        )
        opts = CheckOptions(environ={"TRACKINGPROXY_CONNECT_TO": "::1"})
        opts.parseOptions(["--domain", "click.example.com", "--cert", str(cert), "--key", str(key)])
        settings, early = settings_from_options(opts, NOW, frozenset({"192.0.2.2"}))
        self.assertEqual([f.level for f in early], [Level.FAIL])
        self.assertIn("the proxy would refuse to start: --cert", early[0].line())
        self.assertEqual(settings.domains, ("click.example.com",))
        self.assertEqual((settings.http_port, settings.https_port), (80, 443))
        self.assertEqual(settings.expected, frozenset({"192.0.2.2"}))
        self.assertEqual(settings.connect_to, "::1")


class VerdictTests(SynchronousTestCase):
    def test_dns_without_known_addresses_warns(self):
        """With no interface address known, DNS cannot be judged: WARN asking for the address."""
        finding = judge(Resolution("click.example.com", addresses=("203.0.113.10",)), frozenset(), False)
        self.assertEqual(finding.level, Level.WARN)
        self.assertIn("pass --expect-address", finding.line())

    def test_dns_elsewhere_mentions_nat_unless_given(self):
        """Pointing elsewhere suggests --expect-address for NAT only when it was not given."""
        r = Resolution("click.example.com", addresses=("203.0.113.10",))
        self.assertIn("behind NAT", judge(r, frozenset({"10.0.0.5"}), False).line())
        self.assertNotIn("behind NAT", judge(r, frozenset({"10.0.0.5"}), True).line())

    def test_certificate_verdicts(self):
        """OK with days left; WARN under 14 days; short-lived (6-day) certificates are judged by
        a quarter of their lifetime; expired and wrong-name are FAIL, each its own line."""
        ca = make_ca()
        ca_file = Path(self.mktemp())
        ca.cert_pem.write_to_path(str(ca_file))
        trust = [str(ca_file)]
        name = "click.example.com"
        ok = judge_certificate(name, leaf_chain(ca, name, days_left=60), trust, NOW, 14)
        self.assertEqual([f.level for f in ok], [Level.OK])
        self.assertIn("expires in 60 days (2026-07-31 12:00 UTC)", ok[0].text)
        soon = judge_certificate(name, leaf_chain(ca, name, days_left=10), trust, NOW, 14)
        self.assertEqual([f.level for f in soon], [Level.WARN])
        short = leaf_chain(ca, name, days_left=3, lifetime=6)
        self.assertEqual(judge_certificate(name, short, trust, NOW, 14)[0].level, Level.OK)
        shorter = leaf_chain(ca, name, days_left=1, lifetime=6)
        self.assertEqual(judge_certificate(name, shorter, trust, NOW, 14)[0].level, Level.WARN)
        bad = judge_certificate(
            name, leaf_chain(ca, "other.example.com", days_left=-1), trust, NOW, 14
        )
        self.assertEqual([f.level for f in bad], [Level.FAIL, Level.FAIL])
        self.assertIn("is for other.example.com, not click.example.com", bad[0].text)
        self.assertIn("expired on", bad[1].text)
        untrusted = judge_certificate(name, leaf_chain(make_ca(), name, days_left=60), trust, NOW, 14)
        self.assertEqual([f.level for f in untrusted], [Level.FAIL])
        self.assertIn("chain does not verify", untrusted[0].text)



class RoutingTests(SynchronousTestCase):
    """The verdicts on the upstream's direct answer and on the proxy's answer compared with it."""

    def route(self, upstream: str, answer: Answer) -> Finding:
        return judge_route("click.example.com", parse_upstream(upstream), "/f/a/b/c/d", answer)

    def test_upstream_redirect_means_it_serves_the_domain(self):
        """A redirect for the domain's Host is OK, naming the endpoint, status and Server."""
        finding = judge_route("click.example.com", parse_upstream("us-v2"), "/f/a/b/c/d", REDIRECT)
        self.assertEqual(
            finding.line(),
            "OK   upstream https://v2.spgo.io (us-v2) serves click.example.com: GET /f/a/b/c/d "
            "with Host click.example.com -> 302 to https://www.example.com/ (Server: msys-http)",
        )

    def test_v1_endpoint_not_serving_suggests_v2(self):
        """A 404 from a V1 endpoint fails and names the same region's V2 alias to pass."""
        for upstream, other, alias in (
            ("us", "v2.spgo.io", "us-v2"),
            ("eu", "eu.v2.spgo.io", "eu-v2"),
        ):
            line = self.route(upstream, Answer(404, "msys-http")).line()
            self.assertIn("does not serve click.example.com: GET /f/a/b/c/d with Host", line)
            self.assertIn(
                "-> 404 (Server: msys-http); SparkPost probably has the domain on the "
                f"V2 endpoint {other} (domains created after December 2025 are)",
                line,
            )
            self.assertTrue(line.endswith(f"show {other}, pass --upstream {alias}"), line)

    def test_v2_endpoint_not_serving_suggests_v1(self):
        """A 421 from a V2 endpoint fails and names the same region's V1 alias to pass."""
        for upstream, other, alias in (("us-v2", "spgo.io", "us"), ("eu-v2", "eu.spgo.io", "eu")):
            line = self.route(upstream, Answer(421)).line()
            self.assertIn(
                "-> 421 (no Server header); SparkPost probably has the domain on the "
                f"V1 endpoint {other}, or not set up",
                line,
            )
            self.assertTrue(line.endswith(f"show {other}, pass --upstream {alias}"), line)

    def test_enterprise_and_other_upstreams_not_serving(self):
        """Enterprise or a plain URL that does not redirect: pass the endpoint SparkPost shows."""
        line = self.route("enterprise:acme", Answer(200, "nginx")).line()
        self.assertTrue(
            line.startswith(
                "FAIL upstream https://acme.et.e.sparkpost.com "
                "(enterprise:acme) does not serve click.example.com"
            ),
            line,
        )
        self.assertIn("on another endpoint or tenant (or not set up)", line)
        line = self.route("https://tracking.example.net", Answer(302)).line()  # no Location
        self.assertTrue(
            line.startswith("FAIL upstream https://tracking.example.net does not"), line
        )
        self.assertTrue(line.endswith("(us, eu, us-v2, eu-v2 or enterprise:TENANT)"), line)

    def test_server_error_is_not_a_routing_answer(self):
        """A 5xx from the endpoint fails as a server error, without suggesting another endpoint."""
        line = self.route("us", Answer(503, "msys-http")).line()
        self.assertIn("https://spgo.io (us) failed for click.example.com", line)
        self.assertIn("a server error, not an answer about the domain: try again later", line)
        self.assertNotIn("--upstream", line)

    def test_probe_same_as_upstream(self):
        """The proxy's redirect equal to the upstream's is OK; an equal non-redirect fails once."""
        target = parse_upstream("us")
        ok = judge_probe(
            URL, "click.example.com", Answer(302, None, "https://x/"), REDIRECT, target
        )
        self.assertEqual(
            ok.line(), f"OK   probe {URL} -> 302 to https://x/, as the upstream answers it"
        )
        same = judge_probe(URL, "click.example.com", Answer(404), Answer(404), target)
        self.assertEqual(
            same.line(),
            f"FAIL probe {URL} -> 404, not a redirect, as the upstream answers it; the proxy "
            "passes the upstream's answer on: see the upstream line for click.example.com",
        )

    def test_probe_differs_from_upstream(self):
        """A proxy answer unlike the upstream's fails with the fix for what answered."""
        target = parse_upstream("us-v2")
        for got, fix in (
            (Answer(421), "this server does not serve click.example.com: add --domain"),
            (Answer(502), "the proxy cannot reach the upstream: see the upstream line"),
            (
                Answer(404, "nginx"),
                "the proxy is misconfigured: check that trackingproxy (not another web server) "
                "answers here and that it runs with --upstream https://v2.spgo.io, the endpoint",
            ),
        ):
            line = judge_probe(URL, "click.example.com", got, REDIRECT, target).line()
            self.assertTrue(
                line.startswith(
                    f"FAIL probe {URL} -> {got.shown()}, but the upstream "
                    "answers 302 for click.example.com directly; "
                ),
                line,
            )
            self.assertIn(fix, line)
        self.assertIn("(Server: nginx)", Answer(404, "nginx").shown())

    def test_probe_without_upstream_answer_and_redirect_http(self):
        """Unasked upstream: a redirect is OK, else FAIL; HTTP sent to HTTPS is OK by itself."""
        target = parse_upstream("us")
        ok = judge_probe(URL, "click.example.com", REDIRECT, None, target)
        self.assertEqual(
            ok.line(), f"OK   probe {URL} -> {REDIRECT.shown()} (a SparkPost redirect)"
        )
        bad = judge_probe(URL, "click.example.com", Answer(200), None, target)
        self.assertIn("-> 200, not a redirect; the answer is not SparkPost's", bad.line())
        http = "http://click.example.com/f/a/b/c/d"
        to_https = Answer(301, None, "https://click.example.com/f/a/b/c/d")
        line = judge_probe(http, "click.example.com", to_https, REDIRECT, target).line()
        self.assertEqual(
            line, f"OK   probe {http} -> 301 to {to_https.location} (--redirect-http: to HTTPS)"
        )
