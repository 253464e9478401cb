"""Certificate values: parsing PEM (key + chain), checking them, and which names they cover.

Nothing here touches the network or keeps state; file reading is limited to the two ``load_*``
helpers used at start-up (and on reload), never per request or per handshake.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from trackingproxy.domains import covers
from trackingproxy.errors import ConfigError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@frozen
class LoadedCertificate:
    """A private key and its certificate chain (leaf first), as served to TLS clients."""

    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    source: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def names(self) -> tuple[str, ...]:
        """DNS names of the leaf (subjectAltName, else the common name)."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            cns = self.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            return tuple(str(cn.value).lower() for cn in cns)
        return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial_hex(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def issuer(self) -> str:
        return self.leaf.issuer.rfc4514_string()

    def covers(self, name: str) -> bool:
        return any(covers(pattern, name) for pattern in self.names)

    def covered(self, domains: Iterable[str]) -> tuple[str, ...]:
        return tuple(d for d in domains if self.covers(d))

    def expired_at(self, now: datetime.datetime) -> bool:
        return now >= self.not_after

    def fullchain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def parse_pem(cert_pem: bytes, key_pem: bytes, source: str) -> LoadedCertificate:
    """Build a LoadedCertificate from PEM data; raise ConfigError naming ``source`` on problems."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError:
        raise ConfigError(
            f"{source}: no PEM certificate found; give the full chain file (e.g. fullchain.pem)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: no unencrypted PEM private key found; give the key file (e.g. privkey.pem)"
        ) from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ConfigError(f"{source}: unsupported key type; use an ECDSA or RSA key")
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(
            f"{source}: the private key does not match the certificate; pass the key that was "
            "issued with this certificate"
        )
    return LoadedCertificate(key=key, chain=chain, source=source)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{what} {path}: cannot read it ({e.strerror}); check the path and its permissions"
        ) from None


def load_pair(cert_path: Path, key_path: Path) -> LoadedCertificate:
    """Load ``--cert`` and ``--key`` files."""
    cert_pem = _read(cert_path, "--cert")
    key_pem = _read(key_path, "--key")
    return parse_pem(cert_pem, key_pem, f"--cert {cert_path}")


def load_combined(path: Path) -> LoadedCertificate:
    """Load one ``--certs-dir`` file that holds both the key and the chain."""
    data = _read(path, "--certs-dir file")
    return parse_pem(data, data, f"--certs-dir file {path}")


def load_certs_dir(directory: Path) -> list[LoadedCertificate]:
    """Load every ``*.pem`` file of a ``--certs-dir`` (sorted by name, for a stable order)."""
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".pem" and p.is_file())
    except OSError as e:
        raise ConfigError(
            f"--certs-dir {directory}: cannot list it ({e.strerror}); check path and permissions"
        ) from None
    return [load_combined(p) for p in files]


def check_usable(
    certs: Sequence[LoadedCertificate], domains: Sequence[str], now: datetime.datetime
) -> None:
    """Refuse expired certificates and certificates that cover none of the configured domains."""
    for cert in certs:
        if cert.expired_at(now):
            raise ConfigError(
                f"{cert.source}: the certificate expired on {cert.not_after:%Y-%m-%d %H:%M} UTC; "
                "renew it, or drop it and let ACME obtain one"
            )
        if not cert.covered(domains):
            raise ConfigError(
                f"{cert.source}: the certificate is for {', '.join(cert.names) or 'no DNS name'}, "
                f"which covers none of the configured domains ({', '.join(domains)}); add the "
                "matching --domain or pass the right certificate"
            )
