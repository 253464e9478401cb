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
from trackingproxy.checks.served import judge_certificate
from trackingproxy.checks.settings import interface_addresses, public_port, settings_from_options

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)


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
