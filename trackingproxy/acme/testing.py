"""In-memory doubles of the ACME seams, shipped as product code for tests (ours and yours).

``FakeObtainer`` records ``obtain`` calls and lets the test fire them; the memory store is
``trackingproxy.store.memory.MemoryStore``.
"""

from __future__ import annotations

import datetime
import random

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

from trackingproxy.acme.obtainer import ObtainRequest
from trackingproxy.store.contract import (
    AriWindow,
)
from trackingproxy.tls.certificates import LoadedCertificate, PrivateKey

__all__ = ["FakeObtainer", "FixedRandom", "LogCapture", "self_signed"]


@define
class FakeObtainer:
    """An ``Obtainer`` whose ``obtain`` calls wait for the test to fire them."""

    description: str = "fake CA"
    calls: list[tuple[ObtainRequest, Deferred[bytes]]] = field(factory=list)
    ari: dict[str, AriWindow | None] = field(factory=dict)
    started: bool = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> Deferred[None]:
        self.started = False
        return succeed(None)

    def obtain(self, request: ObtainRequest) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.calls.append((request, d))
        return d

    def renewal_info(self, name: str, fullchain_pem: bytes) -> Deferred[AriWindow | None]:
        return succeed(self.ari.get(name))


def self_signed(
    name: str,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    key: PrivateKey | None = None,
) -> LoadedCertificate:
    """A self-signed certificate for ``name`` (ECDSA P-256 unless ``key`` is given)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return LoadedCertificate(key=key, chain=(cert,), source=f"self-signed {name}")


@implementer(ILogObserver)
class LogCapture:
    """A log observer that keeps events; ``lines()`` formats them."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self, level: LogLevel | None = None) -> list[str]:
        return [
            formatEvent(e) for e in self.events if level is None or e.get("log_level") == level
        ]


class FixedRandom(random.Random):
    """``uniform(a, b)`` returns the point at ``fraction`` of the way from ``a`` to ``b``."""

    def __init__(self, fraction: float = 0.5) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction
