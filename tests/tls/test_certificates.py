"""Which names a certificate covers: read from the leaf once, looked up in sets, and checked
against thousands of configured domains in time linear in certificates + domains."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cryptography import x509

from tests.tls.manycerts import NOW, make_hierarchy, many
from trackingproxy.domains import covers
from trackingproxy.errors import ConfigError
from trackingproxy.tls.certificates import (
    LoadedCertificate,
    check_usable,
    covered_domains,
    parse_pem,
)

PATTERNS = ("click.example.com", "*.example.org", "Upper.Example.NET", "dot.example.com.",
            "*.deep.example.io.")  # fmt: skip
HOSTS = ("click.example.com", "x.click.example.com", "a.example.org", "example.org",
         "a.b.example.org", "upper.example.net", "dot.example.com", "x.deep.example.io",
         "deep.example.io", ".example.org", "other.example.com")  # fmt: skip


class _CountingLeaf:
    """A real leaf certificate that counts how often it is read (any attribute)."""

    def __init__(self, leaf: x509.Certificate) -> None:
        self._leaf = leaf
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        self.reads += 1
        return getattr(self._leaf, name)


def test_covers_reads_names_as_domains_covers_does() -> None:
    """For exact, wildcard, upper-case and trailing-dot names, a certificate covers exactly the
    hosts ``trackingproxy.domains.covers`` says one of its names covers."""
    cert = make_hierarchy(1).intermediates[0].loaded(*PATTERNS)
    assert cert.exact_names == {"click.example.com", "upper.example.net", "dot.example.com"}
    assert cert.wildcard_suffixes == {"example.org", "deep.example.io"}
    for host in HOSTS:
        assert cert.covers(host) == any(covers(p, host) for p in cert.names), host
    assert cert.covered(HOSTS) == tuple(h for h in HOSTS if cert.covers(h))


def test_names_are_read_from_the_leaf_once() -> None:
    """The names are read when the value is made; ``covers`` never reads the leaf again."""
    real = make_hierarchy(1).intermediates[0].loaded("a.example.com", "*.example.org")
    leaf = _CountingLeaf(real.leaf)
    cert = LoadedCertificate(key=real.key, chain=(leaf, *real.chain[1:]), source="counted")  # type: ignore[arg-type]
    read_when_made = leaf.reads
    assert cert.names == ("a.example.com", "*.example.org")
    for _ in range(1000):
        assert cert.covers("a.example.com") and cert.covers("x.example.org")
        assert not cert.covers("b.example.com")
    assert leaf.reads == read_when_made


def test_common_name_without_subject_alt_name() -> None:
    """A leaf without subjectAltName covers its common name (lower case)."""
    chain_pem, key_pem = make_hierarchy(1).intermediates[0].issue("CN.Example.com", san=False)
    cert = parse_pem(chain_pem, key_pem, "cn")
    assert cert.names == ("cn.example.com",)
    assert cert.covers("cn.example.com") and not cert.covers("x.cn.example.com")


def test_check_usable_is_linear_for_10000_certificates() -> None:
    """10,000 certificates against 10,000 domains are checked in well under a second (the
    check was quadratic before: every certificate re-parsed its names for every domain, 16 s
    for 2,000, 70 s for 4,000, several minutes for 10,000)."""
    _, names, certs = many()
    started = time.perf_counter()
    check_usable(certs, names, NOW)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"check_usable took {elapsed:.2f}s for 10,000"


def test_covered_domains_is_linear_for_10000_certificates() -> None:
    """Which of 10,000 domains the 10,000 certificates cover (plus a wildcard) is found in
    well under a second, in the domains' order (before: one covers() per certificate and
    domain, 10^8 calls)."""
    h, names, certs = many()
    wildcard = h.intermediates[0].loaded("*.example3.com")
    extra = ["new.example3.com", "new.example4.com", "a.b.example3.com"]
    started = time.perf_counter()
    found = covered_domains([*certs, wildcard], names + extra)
    elapsed = time.perf_counter() - started
    assert found == (*names, "new.example3.com")
    assert elapsed < 1.0, f"covered_domains took {elapsed:.2f}s for 10,000"


def test_certificate_covering_none_of_10000_domains_is_refused_in_one_short_line() -> None:
    """A certificate for no configured name is refused; the message names a few domains and
    how many more, not all 10,000."""
    h, names, certs = many()
    stray = h.intermediates[1].loaded("stray.example.net", "*.example.org")
    with pytest.raises(ConfigError) as info:
        check_usable([*certs, stray], names, NOW)
    message = str(info.value)
    assert "stray.example.net, *.example.org, which covers none" in message
    assert "click0.example0.com" in message and "and 9995 more" in message
    assert len(message) < 400 and "\n" not in message


def test_wildcard_certificate_is_usable_for_a_name_one_label_below() -> None:
    """A wildcard certificate is usable when a configured name sits one label under it, and
    refused when the only names are the parent itself or two labels below."""
    cert = make_hierarchy(1).intermediates[0].loaded("*.example.com")
    check_usable([cert], ["a.example.com"], NOW)
    for domains in (["example.com"], ["a.b.example.com"]):
        with pytest.raises(ConfigError):
            check_usable([cert], domains, NOW)


def test_expired_certificate_is_refused() -> None:
    """An expired certificate is refused before its names are looked at."""
    _, names, certs = many()
    expired_at = certs[0].not_after
    with pytest.raises(ConfigError, match="expired"):
        check_usable(certs[:1], names, expired_at)
