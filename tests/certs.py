"""Test certificates made with trustme: a CA, leaf certificates for given names, and helpers to
write them as PEM files."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from trackingproxy.tls.certificates import LoadedCertificate, parse_pem


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


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A server TLS context for ``leaf``, built from ``cryptography`` objects (pyOpenSSL's own
    X509/PKey are deprecated): a connection creator for TLSMemoryBIOFactory, and a context
    factory (``getContext``) for ``reactor.listenSSL``."""

    def __init__(self, leaf: trustme.LeafCert) -> None:
        chain = [x509.load_pem_x509_certificate(pem.bytes()) for pem in leaf.cert_chain_pems]
        key: Any = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.context.use_certificate(chain[0])
        for extra in chain[1:]:
            self.context.add_extra_chain_cert(extra)
        self.context.use_privatekey(key)

    def getContext(self) -> SSL.Context:
        return self.context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection
