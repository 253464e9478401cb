"""The SNI map's bookkeeping: one shared context per intermediate chain, the default for
clients without SNI, and work linear in domains + certificates for 10,000 of each (install,
set_domains, and the SIGHUP reload that drives them)."""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.tls.manycerts import NOW, make_hierarchy, many
from trackingproxy.config import config_from_options
from trackingproxy.ops.reload import Reloader
from trackingproxy.options import Options
from trackingproxy.tls.sni import SNIContextMap

A, B, C = "a.example.com", "b.example.com", "c.example.com"


def _default_name(sni: SNIContextMap) -> str | None:
    """The name whose certificate a client without SNI gets."""
    default = sni._default
    if default is None:
        return None
    return next(n for n in sni.domains if sni.certificate_for(n) is default.cert)


class SNIMapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.first, self.second = make_hierarchy(2).intermediates

    def test_one_context_per_chain(self) -> None:
        """Certificates of the same chain share one context; a chain no name uses any more is
        dropped."""
        sni = SNIContextMap([A, B, C])
        a, b, c = self.first.loaded(A), self.first.loaded(B), self.second.loaded(C)
        for cert in (a, b, c):
            sni.install(cert)
        self.assertEqual(sni.chain_contexts, 2)
        sni.install(self.first.loaded(C))
        self.assertEqual(sni.chain_contexts, 1)
        sni.remove(A)
        sni.remove(B)
        sni.set_domains([A, B])
        self.assertEqual((sni.chain_contexts, sni.has_certificate(C)), (0, False))

    def test_one_certificate_for_several_names_is_prepared_once(self) -> None:
        """A certificate for several names (here a wildcard) is made into OpenSSL objects once,
        shared by every name it serves, in the configured order."""
        sni = SNIContextMap([B, "x.other.com", A])
        wildcard = self.first.loaded("*.example.com")
        self.assertEqual(sni.install(wildcard), (B, A))
        self.assertIs(sni._served[b"a.example.com"], sni._served[b"b.example.com"])
        self.assertEqual(sni.install(wildcard, [A]), (A,))
        self.assertIs(sni._served[b"a.example.com"], sni._served[b"b.example.com"])

    def test_install_only_names_the_certificate_covers_and_configured(self) -> None:
        """Named targets are served only if configured and covered; listeners hear each."""
        sni = SNIContextMap([A, B])
        heard: list[str] = []
        sni.add_listener(heard.append)
        cert = self.first.loaded(A, C)
        self.assertEqual(sni.install(cert, [A, B, C]), (A,))
        self.assertEqual(sni.install(self.first.loaded("z.example.net")), ())
        self.assertEqual(heard, [A])
        self.assertIs(sni.certificate_for(A), cert)
        self.assertIsNone(sni.certificate_for("é.example.com"))

    def test_default_is_the_first_configured_name_with_a_certificate(self) -> None:
        """The no-SNI default follows installs, removals and a new order of the domains."""
        sni = SNIContextMap([A, B, C])
        self.assertIsNone(_default_name(sni))
        sni.install(self.first.loaded(C))
        self.assertEqual(_default_name(sni), C)
        sni.install(self.first.loaded(B))
        self.assertEqual(_default_name(sni), B)
        sni.install(self.second.loaded(B))  # renewed: still the default, the new certificate
        self.assertEqual(_default_name(sni), B)
        sni.remove(B)
        self.assertEqual(_default_name(sni), C)
        sni.install(self.first.loaded(A))
        sni.set_domains([C, B, A])
        self.assertEqual(_default_name(sni), C)
        sni.set_domains([B])
        self.assertIsNone(_default_name(sni))

    def test_default_heap_stays_small_under_churn(self) -> None:
        """Removing and re-installing names over and over keeps the default's heap bounded."""
        names = [f"n{i}.example.com" for i in range(50)]
        sni = SNIContextMap(names)
        certs = [self.first.loaded(n) for n in names]
        for _ in range(20):
            for name, cert in zip(names[1:], certs[1:], strict=True):
                sni.remove(name)
                sni.install(cert)
        sni.install(certs[0])
        self.assertEqual(_default_name(sni), names[0])
        self.assertLessEqual(len(sni._order), 2 * len(names) + 64)


class ScaleTests(SynchronousTestCase):
    """10,000 domains, each with its own certificate, two intermediate chains."""

    def test_install_10000_certificates(self) -> None:
        """Installing 10,000 certificates takes a few seconds at most and builds two contexts
        (before: a context per certificate, and a scan of every domain per install: 46 s for
        4,000, several minutes for 10,000)."""
        _, names, certs = many()
        sni = SNIContextMap(names)
        started = time.perf_counter()
        for cert in certs:
            sni.install(cert)
        elapsed = time.perf_counter() - started
        self.assertLess(elapsed, 5.0)
        self.assertEqual(sni.chain_contexts, 2)
        self.assertTrue(all(sni.certificate_for(n) is c for n, c in zip(names, certs, strict=True)))
        self.assertEqual(_default_name(sni), names[0])

        started = time.perf_counter()
        sni.set_domains(names[::-1])
        sni.set_domains(names[::2])
        for name in names[:2000:2]:
            sni.remove(name)
        elapsed = time.perf_counter() - started
        self.assertLess(elapsed, 1.0)
        self.assertEqual(_default_name(sni), names[2000])
        self.assertFalse(sni.has_certificate(names[1]))

    def test_wildcard_over_10000_names(self) -> None:
        """One wildcard certificate for a parent of 10,000 configured names serves them all at
        once, in well under a second."""
        h, _, _ = many()
        names = [f"c{i}.example.com" for i in range(10_000)]
        sni = SNIContextMap(names)
        wildcard = h.intermediates[0].loaded("*.example.com")
        started = time.perf_counter()
        self.assertEqual(sni.install(wildcard), tuple(names))
        self.assertLess(time.perf_counter() - started, 1.0)


class ReloadScaleTests(SynchronousTestCase):
    def test_start_up_and_reload_with_10000_certificates(self) -> None:
        """Start-up (reading, checking, installing) and a SIGHUP reload of a --certs-dir of
        10,000 certificates for 10,000 domains take seconds, most of it reading the files and
        the names (before: quadratic, 8 s for 1,000 and about 170 s for 5,000 at start-up)."""
        _, names, certs = many()
        tmp = Path(self.mktemp())
        (tmp / "certs").mkdir(parents=True)
        key_pem = certs[0].key_pem()  # the leaves share one key
        for i, cert in enumerate(certs):
            (tmp / "certs" / f"{i}.pem").write_bytes(key_pem + cert.fullchain_pem())
        (tmp / "domains.txt").write_text("\n".join(names))
        opts = Options(environ={})
        opts.parseOptions(
            ["--domains-file", str(tmp / "domains.txt"), "--certs-dir", str(tmp / "certs"),
             "--no-acme"]
        )  # fmt: skip

        started = time.perf_counter()
        config = config_from_options(opts, NOW)
        sni = SNIContextMap(config.domains)
        for cert in config.certificates:
            sni.install(cert)
        self.assertEqual(len(config.user_covered), 10_000)
        start_up = time.perf_counter() - started

        clock = Clock()
        clock.advance(NOW.timestamp())
        applied: list[int] = []
        reloader = Reloader(config, clock, sni, lambda d, w: applied.append(len(d)))
        started = time.perf_counter()
        self.assertTrue(reloader.reload())
        reload = time.perf_counter() - started

        self.assertEqual(applied, [10_000])
        self.assertTrue(all(sni.has_certificate(n) for n in names))
        self.assertEqual(sni.chain_contexts, 2)
        self.assertLess(start_up, 15.0)
        self.assertLess(reload, 15.0)
