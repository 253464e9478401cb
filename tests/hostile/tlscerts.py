"""Certificates shaped like a public CA's (for TLS scanners): a CA and a 90-day leaf.

trustme's leaves carry a critical subjectAltName next to a non-empty subject, which strict path
validators (sslyze's) reject; a scanner would then report the test certificate, not the server.
These are built with `cryptography` the way Let's Encrypt issues them: ECDSA P-256 (or RSA 2048)
leaf, SHA-256 signature, non-critical SAN, serverAuth EKU, authority/subject key identifiers, a CRL distribution point.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# Like Let's Encrypt's since 2025: a CRL URL, no OCSP (never fetched: nothing leaves loopback).
CRL_URL = "http://crl.test.invalid/1.crl"


@frozen
class Issued:
    """A CA file, a leaf chain file and its key file, written to one directory."""

    ca: Path
    chain: Path
    key: Path


def _key(kind: str) -> PrivateKey:
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_public_like(directory: Path, names: list[str], kind: str = "ecdsa-p256") -> Issued:
    """A fresh CA and a leaf for `names`, valid from yesterday for 90 days; PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trackingproxy test root")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    leaf_key = _key(kind)
    is_rsa = isinstance(leaf_key, rsa.RSAPrivateKey)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=89))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .add_extension(
            x509.CRLDistributionPoints([
                x509.DistributionPoint(
                    [x509.UniformResourceIdentifier(CRL_URL)], None, None, None
                )
            ]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    issued = Issued(directory / "ca.pem", directory / "chain.pem", directory / "key.pem")
    issued.ca.write_bytes(ca.public_bytes(pem))
    issued.chain.write_bytes(leaf.public_bytes(pem))  # the root is never sent
    issued.key.write_bytes(_pem_key(leaf_key))
    issued.key.chmod(0o600)
    return issued
