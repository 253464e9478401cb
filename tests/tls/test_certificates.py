"""Which names a certificate covers: read from the leaf once, looked up in sets, and checked
against thousands of configured domains in time linear in certificates + domains."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.tls.manycerts import NOW, make_hierarchy, many
from trackingproxy.domains import covers
from trackingproxy.errors import ConfigError
from trackingproxy.tls import certificates
from trackingproxy.tls.certificates import (
    LoadedCertificate,
    check_usable,
    covered_domains,
    parse_pem,
)

PATTERNS = ("click.example.com", "*.example.org", "Upper.Example.NET", "dot.example.com.",
            "*.deep.example.io.")  # fmt: skip
_LEAF_NAMES = certificates.leaf_names
HOSTS = ("click.example.com", "x.click.example.com", "a.example.org", "example.org",
         "a.b.example.org", "upper.example.net", "dot.example.com", "x.deep.example.io",
         "deep.example.io", ".example.org", "other.example.com")  # fmt: skip


def test_covers_reads_names_as_domains_covers_does() -> None:
    """For exact, wildcard, upper-case and trailing-dot names, a certificate covers exactly the
    hosts ``trackingproxy.domains.covers`` says one of its names covers."""
    cert = make_hierarchy(1).intermediates[0].loaded(*PATTERNS)
    assert cert.exact_names == {"click.example.com", "upper.example.net", "dot.example.com"}
    assert cert.wildcard_suffixes == {"example.org", "deep.example.io"}
    for host in HOSTS:
        assert cert.covers(host) == any(covers(p, host) for p in cert.names), host
    assert cert.covered(HOSTS) == tuple(h for h in HOSTS if cert.covers(h))


def test_names_are_read_from_the_leaf_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names are read when the value is made; ``covers`` never reads them again."""
    real = make_hierarchy(1).intermediates[0].loaded("a.example.com", "*.example.org")
    reads: list[object] = []

    def counted(leaf: x509.Certificate) -> tuple[str, ...]:
        reads.append(leaf)
        return _LEAF_NAMES(leaf)

    monkeypatch.setattr(certificates, "leaf_names", counted)
    cert = LoadedCertificate(key=real.key, chain=real.chain, source="counted")
    assert len(reads) == 1
    assert cert.names == ("a.example.com", "*.example.org")
    for _ in range(1000):
        assert cert.covers("a.example.com") and cert.covers("x.example.org")
        assert not cert.covers("b.example.com")
    assert len(reads) == 1


def test_value_keeps_no_cryptography_copy_and_shares_intermediates() -> None:
    """The value holds the leaf and key once, as OpenSSL objects; the facts read from the leaf
    equal the leaf's own; certificates of one chain share one parsed intermediate; the PEM
    written back is the PEM read."""
    hierarchy = make_hierarchy(1)
    chain_pem, key_pem = hierarchy.intermediates[0].issue("a.example.com")
    one = parse_pem(chain_pem, key_pem, "one")
    other = parse_pem(*hierarchy.intermediates[0].issue("b.example.com"), "other")
    assert one.intermediates[0] is other.intermediates[0]
    assert not any(isinstance(v, x509.Certificate) for v in (one.openssl_leaf, one.openssl_key))
    leaf = one.leaf
    assert one.serial_hex == format(leaf.serial_number, "x")
    assert (one.not_before, one.not_after) == (leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    assert one.issuer == leaf.issuer.rfc4514_string()
    assert one.fullchain_pem() == chain_pem
    assert one.key_matches
    assert parse_pem(one.fullchain_pem(), one.key_pem(), "again").serial_hex == one.serial_hex
    mixed = LoadedCertificate(key=other.key, chain=one.chain, source="mixed")
    assert not mixed.key_matches


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


def test_certs_dir_files_parse_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second load of a --certs-dir (SIGHUP) parses only the files added or rewritten,
    forgets the files removed, and keeps the order by file name."""
    intermediate = make_hierarchy(1).intermediates[0]

    def write(name: str, host: str) -> None:
        chain_pem, key_pem = intermediate.issue(host)
        (tmp_path / name).write_bytes(key_pem + chain_pem)

    for name in ("a", "b", "c"):
        write(f"{name}.pem", f"{name}.example.com")
    (tmp_path / "notes.txt").write_text("not a certificate")
    parsed: list[str] = []
    real = certificates.load_combined

    def counted(path: Path) -> LoadedCertificate:
        parsed.append(path.name)
        return real(path)

    monkeypatch.setattr(certificates, "load_combined", counted)
    files = certificates.CertsDirFiles()
    first = files.load(tmp_path)
    assert parsed == ["a.pem", "b.pem", "c.pem"]
    parsed.clear()
    write("d.pem", "d.example.com")
    write("b.pem", "b2.example.com")  # rewritten in place: a new modification time
    (tmp_path / "c.pem").unlink()
    second = files.load(tmp_path)
    assert sorted(parsed) == ["b.pem", "d.pem"]
    assert [c.names for c in second] == [("a.example.com",), ("b2.example.com",),
                                         ("d.example.com",)]
    assert second[0] is first[0]
    parsed.clear()
    assert files.load(tmp_path) == second and parsed == []


@pytest.mark.parametrize("encoding", ["pkcs8", "traditional", "with-parameters", "in-front"])
def test_key_encodings_read_by_openssl_as_by_cryptography(encoding: str) -> None:
    """Whatever PEM the key comes in (PKCS#8, traditional ``EC PRIVATE KEY``, after an
    ``EC PARAMETERS`` block, in front of the chain in one file), the OpenSSL key the
    handshakes use is the key that was checked against the leaf."""
    key = ec.generate_private_key(ec.SECP256R1())
    chain_pem, pkcs8 = make_hierarchy(1).intermediates[0].issue("a.example.com", key=key)
    traditional = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    key_pem = {"pkcs8": pkcs8, "traditional": traditional, "with-parameters": params + traditional,
               "in-front": pkcs8 + chain_pem}[encoding]
    cert = parse_pem(chain_pem if encoding != "in-front" else key_pem, key_pem, encoding)
    assert cert.key_matches
    assert cert.key.private_numbers() == key.private_numbers()
    assert cert.fullchain_pem() == chain_pem


def test_encrypted_key_is_refused_without_asking_for_a_passphrase() -> None:
    """An encrypted key is one clear error; nothing waits for a passphrase on a terminal."""
    key = ec.generate_private_key(ec.SECP256R1())
    chain_pem, _ = make_hierarchy(1).intermediates[0].issue("a.example.com", key=key)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(ConfigError, match="no unencrypted PEM private key"):
        parse_pem(chain_pem, encrypted, "encrypted")
