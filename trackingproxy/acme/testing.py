"""In-memory doubles of the ACME seams, shipped as product code for tests (ours and yours).

``MemoryStore`` is a complete ``CertificateStore`` (the same contract tests run against it and
``FileStore``); ``FakeObtainer`` records ``obtain`` calls and lets the test fire them.
"""

from __future__ import annotations

import datetime
import random
import secrets

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

from trackingproxy.acme.obtainer import ObtainRequest
from trackingproxy.acme.store import (
    AccountRecord,
    AriWindow,
    Lock,
    LockLost,
    PendingOrder,
    StoredCertificate,
)
from trackingproxy.tls.certificates import LoadedCertificate, PrivateKey

__all__ = ["FakeObtainer", "FixedRandom", "LogCapture", "MemoryStore", "self_signed"]


class MemoryStore:
    """A ``CertificateStore`` in dictionaries; ``clock`` gives lock expiry times."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.certs: dict[str, StoredCertificate] = {}
        self.errors: dict[str, tuple[str, datetime.datetime]] = {}
        self.orders: dict[str, PendingOrder] = {}
        self.locks: dict[str, Lock] = {}
        self.accounts: dict[str, AccountRecord] = {}

    def _check(self, lock: Lock) -> None:
        held = self.locks.get(lock.name)
        if held is None or held.token != lock.token:
            raise LockLost(f"the lock on {lock.name} was taken over")
        if held.expires <= self._clock.seconds():
            raise LockLost(f"the lock on {lock.name} expired")

    def load(self, name: str) -> Deferred[StoredCertificate | None]:
        return succeed(self.certs.get(name))

    def save(self, lock: Lock, cert: StoredCertificate) -> Deferred[None]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        self.certs[lock.name] = cert
        self.orders.pop(lock.name, None)
        self.errors.pop(lock.name, None)
        return succeed(None)

    def save_ari(self, name: str, serial_hex: str, ari: AriWindow) -> Deferred[None]:
        current = self.certs.get(name)
        if current is not None and current.cert.serial_hex == serial_hex:
            self.certs[name] = StoredCertificate(cert=current.cert, ari=ari)
        return succeed(None)

    def record_error(self, name: str, message: str, when: datetime.datetime) -> Deferred[None]:
        self.errors[name] = (message, when)
        return succeed(None)

    def load_order(self, name: str) -> Deferred[PendingOrder | None]:
        return succeed(self.orders.get(name))

    def save_order(self, lock: Lock, order: PendingOrder) -> Deferred[None]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        self.orders[lock.name] = order
        return succeed(None)

    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        now = self._clock.seconds()
        held = self.locks.get(name)
        if held is not None and held.expires > now:
            return succeed(None)
        lock = Lock(name=name, token=secrets.token_hex(16), expires=now + ttl)
        self.locks[name] = lock
        return succeed(lock)

    def refresh(self, lock: Lock, ttl: float) -> Deferred[Lock]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        new = Lock(name=lock.name, token=lock.token, expires=self._clock.seconds() + ttl)
        self.locks[lock.name] = new
        return succeed(new)

    def release(self, lock: Lock) -> Deferred[None]:
        held = self.locks.get(lock.name)
        if held is not None and held.token == lock.token:
            del self.locks[lock.name]
        return succeed(None)

    def load_account(self, directory_url: str) -> Deferred[AccountRecord | None]:
        return succeed(self.accounts.get(directory_url))

    def save_account(self, directory_url: str, account: AccountRecord) -> Deferred[None]:
        self.accounts[directory_url] = account
        return succeed(None)


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
