"""Many certificates, made cheaply: a root, a few intermediates and leaf certificates signed by
them, for the tests (and the memory measurement) of serving thousands of domains.

Keys are ECDSA P-256; ``shared_key`` lets every leaf use one key, made once, when only the
names matter (signing a leaf then costs well under a millisecond).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trackingproxy.tls.certificates import LoadedCertificate, parse_pem

# Certificates are checked by real clients too: valid around the real time (like trustme's).
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@frozen
class Issuer:
    """A CA certificate and its key; ``chain`` is what a server sends after the leaf."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def chain_pem(self) -> bytes:
        return b"".join(_pem(c) for c in self.chain)

    def issue(
        self,
        *names: str,
        key: ec.EllipticCurvePrivateKey | None = None,
        serial: int | None = None,
        not_after: datetime.datetime | None = None,
        san: bool = True,
    ) -> tuple[bytes, bytes]:
        """(full chain PEM, key PEM) of a leaf for ``names`` (the first one is the CN; without
        ``san``, the only one)."""
        key = key or _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(NOW - _DAY)
            .not_valid_after(not_after or NOW + 90 * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        )
        if san:
            alt = x509.SubjectAlternativeName([x509.DNSName(n) for n in names])
            builder = builder.add_extension(alt, False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem(cert) + self.chain_pem, key_pem(key)

    def loaded(
        self, *names: str, key: ec.EllipticCurvePrivateKey | None = None, source: str = "test"
    ) -> LoadedCertificate:
        chain_pem, private_pem = self.issue(*names, key=key)
        return parse_pem(chain_pem, private_pem, source)


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 30 * _DAY)
        .not_valid_after(NOW + 3650 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(_CA_USAGE, True)
        .sign(issuer_key, hashes.SHA256())
    )


@frozen
class Hierarchy:
    """A root CA and intermediates under it (what a client trusts: ``root_pem``)."""

    root: Issuer
    intermediates: tuple[Issuer, ...]

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root.cert)


def make_hierarchy(intermediates: int = 2) -> Hierarchy:
    """A root and ``intermediates`` intermediate CAs, each sending itself as the chain."""
    root_key = _key()
    root_cert = _ca_cert("Test Root", root_key, None, root_key)
    root = Issuer(root_key, root_cert, ())
    cas = []
    for i in range(intermediates):
        key = _key()
        cert = _ca_cert(f"Test Intermediate {i + 1}", key, root_cert, root_key)
        cas.append(Issuer(key, cert, (cert,)))
    return Hierarchy(root, tuple(cas))


def many_loaded(
    issuers: Sequence[Issuer], names: Sequence[str], shared_key: bool = True
) -> list[LoadedCertificate]:
    """One certificate per name, signed in turn by each issuer (a shared leaf key by default)."""
    key = _key() if shared_key else None
    return [
        issuers[i % len(issuers)].loaded(name, key=key, source=f"cert {i}")
        for i, name in enumerate(names)
    ]


def domain_names(count: int) -> list[str]:
    """``count`` distinct tracking domains under 97 parents (``click7.example7.com``)."""
    return [f"click{i}.example{i % 97}.com" for i in range(count)]


_MANY: dict[int, tuple[Hierarchy, list[str], list[LoadedCertificate]]] = {}


def many(count: int = 10_000) -> tuple[Hierarchy, list[str], list[LoadedCertificate]]:
    """``count`` names and one certificate for each, under two intermediates (one shared leaf
    key), made once per test run: about 2 s for 10,000."""
    if count not in _MANY:
        hierarchy = make_hierarchy(2)
        names = domain_names(count)
        _MANY[count] = hierarchy, names, many_loaded(hierarchy.intermediates, names)
    return _MANY[count]
