"""Test certificates made with trustme: a CA, leaf certificates for given names, and helpers to
write them as PEM files."""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme
from cryptography.hazmat.primitives.asymmetric import ec

from trackingproxy.certificates import LoadedCertificate, parse_pem


def make_ca() -> trustme.CA:
    return trustme.CA(key_type=trustme.KeyType.ECDSA)


def issue(
    ca: trustme.CA,
    *names: str,
    not_after: datetime.datetime | None = None,
) -> trustme.LeafCert:
    return ca.issue_cert(
        *names, common_name=names[0], not_after=not_after, key_type=trustme.KeyType.ECDSA
    )


def loaded(leaf: trustme.LeafCert, source: str = "test") -> LoadedCertificate:
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return parse_pem(chain, leaf.private_key_pem.bytes(), source)


def write_pair(leaf: trustme.LeafCert, directory: Path, stem: str) -> tuple[Path, Path]:
    cert = directory / f"{stem}.crt"
    key = directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def write_combined(leaf: trustme.LeafCert, path: Path) -> Path:
    path.write_bytes(
        leaf.private_key_pem.bytes() + b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    )
    return path


def other_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
