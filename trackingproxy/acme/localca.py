"""``--acme-directory local``: a built-in CA in the state directory that signs directly.

For trying the proxy on a laptop (``--domain click.localhost``) and for air-gapped tests. The
root is created on first start (``STATE/local-ca/root-key.pem`` 0600, ``STATE/local-ca.pem``
for clients to trust) and is NOT publicly trusted, which the log says at start.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from trackingproxy.acme.obtainer import ObtainFailed, ObtainRequest
from trackingproxy.store.contract import AriWindow
from trackingproxy.store.files import atomic_write, ensure_private_dir

__all__ = ["LocalCA"]

log = Logger()


class LocalCA:
    """An ``Obtainer`` backed by a self-made root kept in ``state_dir``."""

    description = "the built-in local CA (NOT publicly trusted)"

    def __init__(
        self,
        state_dir: Path,
        clock: IReactorTime,
        lifetime: datetime.timedelta = datetime.timedelta(days=30),
    ) -> None:
        self._state = state_dir
        self._clock = clock
        self._lifetime = lifetime
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._root: x509.Certificate | None = None

    @property
    def root_path(self) -> Path:
        return self._state / "local-ca.pem"

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def start(self) -> None:
        self._load_or_create()
        log.warn(
            "Using the built-in local CA: its certificates are NOT publicly trusted; clients "
            "must trust {root}",
            root=str(self.root_path),
        )

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def _load_or_create(self) -> None:
        ca_dir = ensure_private_dir(self._state / "local-ca")
        key_path, root_path = ca_dir / "root-key.pem", self._state / "local-ca.pem"
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            root = x509.load_pem_x509_certificate(root_path.read_bytes())
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("not an EC key")
            if root.not_valid_after_utc < self._now() + datetime.timedelta(days=365):
                raise ValueError("the root expires within a year")
            self._key, self._root = key, root
            return
        except FileNotFoundError:
            pass
        except ValueError as e:
            log.warn("Local CA in {dir} is unusable ({error}); making a new root",
                     dir=str(ca_dir), error=e)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trackingproxy local CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, "trackingproxy local root (not trusted)"),
        ])
        now = self._now()
        root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        atomic_write(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        atomic_write(root_path, root.public_bytes(serialization.Encoding.PEM))
        self._key, self._root = key, root

    def obtain(self, request: ObtainRequest) -> Deferred[bytes]:
        if self._key is None or self._root is None:
            return fail(ObtainFailed(f"{request.name}: the local CA was not started"))
        now = self._now()
        ski = self._root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.name)]))
            .issuer_name(self._root.subject)
            .public_key(request.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + self._lifetime)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(request.name)]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return succeed(leaf.public_bytes(serialization.Encoding.PEM))

    def renewal_info(self, name: str, fullchain_pem: bytes) -> Deferred[AriWindow | None]:
        return succeed(None)
